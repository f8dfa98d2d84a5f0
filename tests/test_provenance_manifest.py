"""Signed C2PA manifests: embedded with c2pa-python, read back by its own Reader, tamper-evident."""

import datetime as dt
import hashlib
import json
import os
import stat

import c2pa
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import vidiffuse
from vidiffuse.errors import VideoReadError, VidiffuseError
from vidiffuse.provenance import signing
from vidiffuse.provenance.manifest import (
    DIGITAL_SOURCE_TYPE,
    GENERATION_LABEL,
    MANIFEST_UNREADABLE,
    ManifestError,
    prompt_sha256,
    read_manifest,
    sign_video,
)
from vidiffuse.video.io import frames_to_uint8, read_video, write_video

PROMPT = "a large red circle moving left on a black background"


@pytest.fixture(autouse=True)
def no_user_credential(monkeypatch):
    for var in (signing.CERT_ENV, signing.KEY_ENV, "VIDIFFUSE_TRUST_ANCHORS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("VIDIFFUSE_HOME", str(home))
    return home


def generation_record(**overrides):
    record = {
        "model": {"name": "shapes", "version": "2024.1"},
        "settings": {"seed": 7, "steps": 12, "guidance": 4.5, "sampler": "euler", "frames": 8},
        "prompt_sha256": prompt_sha256(PROMPT),
        "training_data_manifest_sha256": hashlib.sha256(b"captions.jsonl").hexdigest(),
        "watermark": {"enabled": True, "payload": "00ff10ab"},
    }
    record.update(overrides)
    return record


def make_clip(path, frames=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    write_video(path, torch.rand(3, frames, size, size, generator=g) * 2 - 1)
    return path


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def make_ca_and_leaf(signer_name, org="Test Studio"):
    """A root CA and a signing certificate it issues, with the extensions C2PA requires."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{org} root"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, signer_name),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])
    usage = dict.fromkeys(["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"], False)

    def base(subject, key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))

    ca = (base(ca_name, ca_key).add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(**{**usage, "key_cert_sign": True, "crl_sign": True}), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (base(leaf_name, leaf_key).add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(**{**usage, "digital_signature": True}), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    # SEC1 ("EC PRIVATE KEY"), as openssl ecparam writes it: the loader must accept it, not just PKCS#8
    key_pem = leaf_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())
    return leaf.public_bytes(pem) + ca.public_bytes(pem), key_pem, ca.public_bytes(pem)


@pytest.fixture
def user_credential(tmp_path, monkeypatch):
    chain, key, ca = make_ca_and_leaf("Test Studio render farm")
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "ca.pem").write_bytes(ca)
    monkeypatch.setenv(signing.CERT_ENV, str(tmp_path / "chain.pem"))
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "key.pem"))
    return tmp_path


@pytest.fixture
def signed_clip(tmp_path):
    path = make_clip(tmp_path / "clip.mp4")
    sign_video(path, generation_record())
    return path


def test_c2pa_reader_sees_created_action_and_generation_record(signed_clip):
    with open(signed_clip, "rb") as f, c2pa.Reader("video/mp4", f) as reader:
        store = json.loads(reader.json())
        state = reader.get_validation_state()
    manifest = store["manifests"][store["active_manifest"]]
    assertions = {a["label"]: a["data"] for a in manifest["assertions"]}
    actions = (assertions.get("c2pa.actions.v2") or assertions["c2pa.actions"])["actions"]

    assert state == "Valid"
    assert [a["action"] for a in actions] == ["c2pa.created"]
    assert actions[0]["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert actions[0]["softwareAgent"]["name"] == "vidiffuse"
    assert assertions[GENERATION_LABEL] == generation_record()
    assert manifest["title"] == "clip.mp4"
    assert [s["code"] for s in store["validation_status"]] == ["signingCredential.untrusted"]


def test_read_manifest_reports_a_valid_untrusted_dev_signature(signed_clip):
    report = read_manifest(signed_clip)

    assert report["present"] is True and report["valid"] is True
    assert report["tampered"] is False and report["trusted"] is False
    assert report["validation_state"] == "Valid"
    assert report["issues"] == ["signingCredential.untrusted"]
    assert report["signer"]["common_name"] == signing.DEV_SIGNER_NAME
    assert report["signer"]["issuer"] == signing.DEV_ORGANIZATION
    assert report["generation"] == generation_record()
    assert report["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert report["claim_generator"] == f"vidiffuse/{vidiffuse.__version__}"
    json.dumps(report)  # the CLI and HTTP layers print it as is


def test_prompt_travels_only_as_its_hash(signed_clip):
    report = read_manifest(signed_clip)
    assert report["generation"]["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()
    data = signed_clip.read_bytes()
    assert prompt_sha256(PROMPT).encode() in data
    assert b"red circle" not in data


def test_raw_prompt_in_the_record_is_refused(tmp_path):
    path = make_clip(tmp_path / "clip.mp4")
    before = path.read_bytes()
    with pytest.raises(ManifestError, match="prompt"):
        sign_video(path, generation_record(settings={"seed": 1, "prompt": PROMPT}))
    assert path.read_bytes() == before


@pytest.mark.parametrize("broken, match", [
    ({"model": {"name": "shapes"}}, "model"),
    ({"prompt_sha256": "not-a-hash"}, "prompt_sha256"),
    ({"training_data_manifest_sha256": "abc"}, "training_data_manifest_sha256"),
    ({"settings": {"guidance": float("nan")}}, "JSON"),
])
def test_malformed_generation_record_is_a_clear_error(tmp_path, broken, match):
    path = make_clip(tmp_path / "clip.mp4")
    with pytest.raises(ManifestError, match=match):
        sign_video(path, generation_record(**broken))


def test_missing_generation_keys_are_named(tmp_path):
    record = generation_record()
    del record["watermark"], record["training_data_manifest_sha256"]
    with pytest.raises(ManifestError, match=r"missing keys \['training_data_manifest_sha256', 'watermark'\]"):
        sign_video(make_clip(tmp_path / "clip.mp4"), record)


def test_signing_keeps_the_pictures_and_file_mode(tmp_path):
    path = make_clip(tmp_path / "clip.mp4")
    os.chmod(path, 0o644)
    before, fps = read_video(path)
    sign_video(path, generation_record())
    after, fps_after = read_video(path)
    assert np.array_equal(frames_to_uint8(before), frames_to_uint8(after)) and fps == fps_after
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_one_byte_in_the_video_data_is_tampering(signed_clip):
    data = signed_clip.read_bytes()
    mdat = data.find(b"mdat")
    assert mdat > 0
    flip_byte(signed_clip, mdat + 100)

    report = read_manifest(signed_clip)
    assert report["present"] is True
    assert report["tampered"] is True and report["valid"] is False
    assert report["validation_state"] == "Invalid"
    assert "assertion.bmffHash.mismatch" in report["issues"]


def test_edited_generation_record_is_tampering(signed_clip):
    data = signed_clip.read_bytes()
    # "2024.1" is the model version inside the signed generation assertion
    signed_clip.write_bytes(data.replace(b"2024.1", b"2024.2", 1))
    assert signed_clip.read_bytes() != data

    report = read_manifest(signed_clip)
    assert report["tampered"] is True and report["valid"] is False
    assert "assertion.hashedURI.mismatch" in report["issues"]


def test_undecodable_manifest_is_reported_as_tampered_not_raised(signed_clip):
    data = signed_clip.read_bytes()
    # the label of the store's JUMBF description box: c2pa then finds no manifest store it can decode
    label = data.find(b"jumdc2pa")
    assert label > 0
    flip_byte(signed_clip, label + 4)
    with pytest.raises(c2pa.C2paError), open(signed_clip, "rb") as f:
        c2pa.Reader("video/mp4", f)

    report = read_manifest(signed_clip)
    assert report["present"] is True and report["tampered"] is True and report["valid"] is False
    assert report["issues"] == [MANIFEST_UNREADABLE] and report["error"]


def test_unsigned_video_has_no_manifest(tmp_path):
    report = read_manifest(make_clip(tmp_path / "plain.mp4"))
    assert report["present"] is False
    assert all(report[k] is None for k in ("valid", "tampered", "trusted", "generation", "signer"))


@pytest.mark.parametrize("content", [None, b"", b"this is not a video" * 20])
def test_unreadable_file_is_a_video_read_error(tmp_path, content):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoReadError):
        read_manifest(path)


def test_dev_credential_is_created_once_and_reused(fresh_home, tmp_path):
    first = signing.load_credential()
    folder = fresh_home / "signing"
    chain_bytes = (folder / signing.DEV_CHAIN_FILE).read_bytes()
    second = signing.load_credential()

    assert first.is_development and second.is_development
    assert first.cert_chain_pem == second.cert_chain_pem == chain_bytes
    assert stat.S_IMODE((folder / signing.DEV_KEY_FILE).stat().st_mode) == 0o600
    assert len(x509.load_pem_x509_certificates(chain_bytes)) == 2

    a, b = make_clip(tmp_path / "a.mp4", seed=1), make_clip(tmp_path / "b.mp4", seed=2)
    sign_video(a, generation_record())
    sign_video(b, generation_record())
    assert read_manifest(a)["signer"]["cert_serial_number"] == read_manifest(b)["signer"]["cert_serial_number"]


def test_losing_the_creation_race_keeps_the_winners_credential(fresh_home):
    folder = fresh_home / "signing"
    signing.create_development_credential(folder)
    winner = (folder / signing.DEV_CHAIN_FILE).read_bytes()
    signing.create_development_credential(folder)  # a second process arriving late

    assert (folder / signing.DEV_CHAIN_FILE).read_bytes() == winner
    assert sorted(p.name for p in fresh_home.iterdir()) == ["signing"]  # no staging folder left behind


def test_incomplete_dev_folder_is_a_clear_error(fresh_home):
    (fresh_home / "signing").mkdir(parents=True)
    (fresh_home / "signing" / signing.DEV_CHAIN_FILE).write_text("x")
    with pytest.raises(signing.SigningError, match="delete that folder"):
        signing.load_credential()


def test_user_credential_from_env_signs_and_is_trusted_with_its_root(user_credential, fresh_home, tmp_path):
    credential = signing.load_credential()
    assert not credential.is_development and credential.subject == "Test Studio render farm"

    path = make_clip(tmp_path / "clip.mp4")
    sign_video(path, generation_record())
    report = read_manifest(path)
    assert report["signer"]["common_name"] == "Test Studio render farm"
    assert report["signer"]["issuer"] == "Test Studio"
    assert report["valid"] is True and report["trusted"] is False
    assert not (fresh_home / "signing").exists()  # no dev credential was made

    trusted = read_manifest(path, trust_anchors=user_credential / "ca.pem")
    assert trusted["trusted"] is True and trusted["issues"] == [] and trusted["validation_state"] == "Trusted"


def test_missing_key_file_is_a_vidiffuse_error(user_credential, monkeypatch):
    monkeypatch.setenv(signing.KEY_ENV, str(user_credential / "nope.pem"))
    with pytest.raises(VidiffuseError, match="private key not found: .*nope.pem"):
        signing.load_credential()


def test_cert_without_key_env_is_a_vidiffuse_error(user_credential, monkeypatch):
    monkeypatch.delenv(signing.KEY_ENV)
    with pytest.raises(VidiffuseError, match=f"{signing.KEY_ENV} is not set"):
        signing.load_credential()


def test_key_of_another_certificate_is_refused(user_credential):
    _, other_key, _ = make_ca_and_leaf("someone else")
    (user_credential / "key.pem").write_bytes(other_key)
    with pytest.raises(VidiffuseError, match="does not belong"):
        signing.load_credential()


def test_garbage_certificate_file_is_refused(user_credential):
    (user_credential / "chain.pem").write_text("hello")
    with pytest.raises(VidiffuseError, match="no readable PEM certificate"):
        signing.load_credential()


def _self_signed_leaf():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lonely")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return cert.public_bytes(pem), key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption())


@pytest.mark.parametrize("case", ["not_an_mp4", "rejected_certificate"])
def test_failed_signing_leaves_the_file_untouched_and_no_temp_files(tmp_path, case):
    folder = tmp_path / "out"
    folder.mkdir()
    if case == "not_an_mp4":
        path, credential = folder / "clip.mp4", None
        path.write_bytes(b"definitely not an mp4 file" * 50)
    else:
        path = make_clip(folder / "clip.mp4")
        # c2pa refuses a bare self-signed certificate, so the failure happens inside the native signer
        credential = signing.credential_from_pem(*_self_signed_leaf(), origin="test")
    before = path.read_bytes()

    with pytest.raises(VidiffuseError):
        sign_video(path, generation_record(), credential=credential)
    assert path.read_bytes() == before
    assert [p.name for p in folder.iterdir()] == ["clip.mp4"]


def test_signing_a_missing_file_is_a_video_read_error(tmp_path):
    with pytest.raises(VideoReadError, match="no such file"):
        sign_video(tmp_path / "missing.mp4", generation_record())
