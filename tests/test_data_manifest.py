import hashlib
import json
import logging
import shutil

import pytest

from conftest import ROOT, run_cli
from vidiffuse.data.manifest import (
    build_manifest, check_licenses, license_status, manifest_sha256, model_data_manifest_sha256,
    shapes_world_manifest, videos, write_manifest,
)
from vidiffuse.data.shapes import synthesize
from vidiffuse.errors import ConfigError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four clips with a licence from each place, one denied, plus a corrupt file."""
    root = synthesize(tmp_path_factory.mktemp("ds") / "clips", 4, seed=3, progress=False)
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    for row in rows:  # like footage from elsewhere: no licence unless a sidecar or a column below says so
        row.pop("license")
    rows[1].update(license="MIT", source="https://example.org/clip1")
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "000000.mp4.license").write_text("\nSPDX-License-Identifier: CC-BY-4.0\n")
    (root / "000003.mp4.license").write_text("LicenseRef-All-Rights-Reserved\n")
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    return root


def entries(manifest):
    return {f["name"]: f for f in videos(manifest)}


def test_files_are_measured_and_hashed(dataset):
    manifest = build_manifest(dataset, default_license="CC0-1.0")
    files = entries(manifest)
    assert sorted(files) == ["000000.mp4", "000001.mp4", "000002.mp4", "000003.mp4"]
    for name, f in files.items():
        assert f["sha256"] == hashlib.sha256((dataset / name).read_bytes()).hexdigest()
        assert (f["frames"], f["width"], f["height"], f["fps"]) == (16, 64, 64, 8)
        assert f["duration_s"] == pytest.approx(2.0)
        assert f["@type"] == "cr:FileObject" and f["contentUrl"] == name and f["encodingFormat"] == "video/mp4"
    assert manifest["@type"] == "sc:Dataset" and "cr" in manifest["@context"]
    captions = [d for d in manifest["distribution"] if d["name"] == "captions.jsonl"]
    assert captions[0]["sha256"] == hashlib.sha256((dataset / "captions.jsonl").read_bytes()).hexdigest()
    assert [e["file"] for e in manifest["errors"]] == ["corrupt.mp4"]
    assert manifest["errors"][0]["sha256"] == hashlib.sha256((dataset / "corrupt.mp4").read_bytes()).hexdigest()


def test_licence_sources_and_statuses(dataset):
    files = entries(build_manifest(dataset, default_license="CC0-1.0"))
    got = {n: (f["license"], f["license_from"], f["license_status"]) for n, f in files.items()}
    assert got == {"000000.mp4": ("CC-BY-4.0", "sidecar", "ok"), "000001.mp4": ("MIT", "captions", "ok"),
                   "000002.mp4": ("CC0-1.0", "default", "ok"),
                   "000003.mp4": ("LicenseRef-All-Rights-Reserved", "sidecar", "denied")}
    assert files["000001.mp4"]["source"] == "https://example.org/clip1"
    no_default = entries(build_manifest(dataset))
    assert no_default["000002.mp4"]["license"] is None and no_default["000002.mp4"]["license_status"] == "missing"
    with pytest.raises(ConfigError, match="SPDX"):
        build_manifest(dataset, default_license="Creative Commons")


@pytest.mark.parametrize("expression, status", [
    ("Apache-2.0", "ok"), ("MIT OR LicenseRef-Proprietary", "ok"), ("(MIT AND NONE)", "denied"),
    ("GPL-2.0-or-later WITH Classpath-exception-2.0", "ok"), ("LicenseRef-Studio-Terms", "ok"),
    ("NOASSERTION", "missing"), ("", "missing"), ("Creative Commons", "invalid"), ("(MIT", "invalid"),
    ("MIT AND", "invalid"),
])
def test_spdx_expressions(expression, status):
    assert license_status(expression) == status


def test_training_refuses_missing_and_denied_licences_unless_allowed(dataset, caplog):
    manifest = build_manifest(dataset)
    with pytest.raises(ConfigError, match=r"1 file\(s\) without a valid SPDX licence: 000002.mp4.*denied licence: 000003"):
        check_licenses(manifest)
    assert check_licenses(manifest, files=["000000.mp4", "000001.mp4"]) == []  # only what training reads counts
    with pytest.raises(ConfigError, match="denied"):
        check_licenses(manifest, allow_unlicensed=True)
    with caplog.at_level(logging.WARNING):
        allowed = check_licenses(manifest, allow_unlicensed=True, allow_denied=True)
    assert sorted(f["name"] for f in allowed) == ["000002.mp4", "000003.mp4"]
    assert "LICENCE OVERRIDE" in caplog.text and "000003.mp4" in caplog.text


def test_manifest_hash_is_stable_and_is_the_file_hash(dataset, tmp_path):
    manifest, digest, path = write_manifest(dataset, tmp_path / "a", default_license="CC0-1.0")
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == manifest_sha256(json.loads(path.read_text()))
    assert manifest_sha256(build_manifest(dataset, default_license="CC0-1.0")) == digest
    copy = shutil.copytree(dataset, tmp_path / "clips")  # same content elsewhere: same hash
    assert manifest_sha256(build_manifest(copy, default_license="CC0-1.0")) == digest
    (copy / "000002.mp4").write_bytes((copy / "000002.mp4").read_bytes() + b"\0")
    assert manifest_sha256(build_manifest(copy, default_license="CC0-1.0")) != digest
    card = (tmp_path / "a" / "DATASET_CARD.md").read_text()
    for section in ("Motivation", "Composition", "Collection process", "Preprocessing", "Uses", "Distribution",
                    "Maintenance"):
        assert f"## {section}" in card
    assert "**4** readable, **1** unreadable (corrupt.mp4)" in card and digest in card
    assert "64x64 ×4" in card and "TODO (owner)" in card and "denied 1" in card


def test_shapes_world_manifest_and_bundled_model():
    m = shapes_world_manifest({"denoiser": {"num_clips": 10, "seed": 4}})
    assert m["license"] == ["Apache-2.0"] and m["generator"][0]["seed"] == 4
    model = ROOT / "src" / "vidiffuse" / "weights" / "shapes"
    recorded = model_data_manifest_sha256(model)
    assert recorded == hashlib.sha256((model / "training" / "data_manifest.json").read_bytes()).hexdigest()
    stages = json.loads((model / "training" / "data_manifest.json").read_text())["generator"]
    assert [(s["stage"], s["seed"], s["num_clips"]) for s in stages] == [("autoencoder", 0, 3000), ("denoiser", 1, 40000)]


def test_trainer_refuses_unlicensed_folder_before_building_data(dataset, tmp_path):
    from vidiffuse.train.trainer import train

    config = tmp_path / "t.toml"
    config.write_text(f'[run]\ntask = "denoiser"\nout_dir = "{tmp_path / "run"}"\nsteps = 1\n'
                      f'[autoencoder]\npath = "{tmp_path / "no-vae"}"\n'
                      f'[data]\nkind = "folder"\nroot = "{dataset}"\nnum_clips = 4\n')
    with pytest.raises(ConfigError, match="training data refused"):
        train(config)


def test_trained_model_records_its_data_manifest(dataset, tmp_path):
    from conftest import tiny_vae
    from vidiffuse.train.trainer import train

    root = shutil.copytree(dataset, tmp_path / "clips")
    (root / "000003.mp4.license").write_text("CC-BY-SA-4.0\n")
    vae_dir = tmp_path / "vae"
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(vae_dir)
    config = tmp_path / "d.toml"
    config.write_text(f'[run]\ntask = "denoiser"\nout_dir = "{tmp_path / "run"}"\nsteps = 2\nbatch_size = 2\n'
                      'eval_prompts = 1\n'
                      f'[autoencoder]\npath = "{vae_dir}"\n'
                      f'[data]\nkind = "folder"\nroot = "{root}"\nnum_clips = 4\nlicense = "CC0-1.0"\n'
                      '[model]\nhidden_size = 32\ndepth = 1\nnum_heads = 2\n[sampling]\nsteps = 1\n')
    bundle = train(config)
    digest = model_data_manifest_sha256(bundle)
    written = (bundle / "training" / "data_manifest.json").read_bytes()
    assert digest == hashlib.sha256(written).hexdigest() == hashlib.sha256((tmp_path / "run" / "data_manifest.json").read_bytes()).hexdigest()
    assert len(videos(json.loads(written))) == 4
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["training_data_manifest_sha256"] == digest
    # a resumed run must read the same data
    (root / "000002.mp4").write_bytes((root / "000002.mp4").read_bytes() + b"\0")
    with pytest.raises(ConfigError, match="changed since this run started"):
        train(config, resume=True)


def test_cli_manifest(dataset, tmp_path):
    proc = run_cli("data", "manifest", dataset, "--license", "CC0-1.0", "--out", tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    assert "4 videos, 1 unreadable" in proc.stderr and "licence denied: 000003.mp4" in proc.stderr
    digest = hashlib.sha256((tmp_path / "m" / "manifest.json").read_bytes()).hexdigest()
    assert f"sha256 {digest}" in proc.stderr
    bad = run_cli("data", "manifest", tmp_path / "does-not-exist")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: dataset folder not found")
