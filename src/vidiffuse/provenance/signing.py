"""The certificate and key that sign C2PA manifests.

Resolution order:

1. ``$VIDIFFUSE_SIGNING_CERT`` (PEM certificate chain, signing certificate first) and
   ``$VIDIFFUSE_SIGNING_KEY`` (PEM private key of that certificate): the user's own credential.
2. Otherwise a local development credential under ``vidiffuse_home() / "signing"``, created on first use:
   a throwaway root CA and a signing certificate it issues. Nobody else trusts that CA, so manifests it
   signs read back as ``signingCredential.untrusted`` — which is exactly what they are.

c2pa rejects a bare self-signed signing certificate, hence the two-level chain; the CA's private key is
discarded right after it signs the leaf, so the development CA can never vouch for anything else.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vidiffuse.errors import VidiffuseError
from vidiffuse.files import vidiffuse_home

__all__ = [
    "CERT_ENV",
    "KEY_ENV",
    "SigningCredential",
    "SigningError",
    "create_development_credential",
    "credential_from_files",
    "credential_from_pem",
    "development_credential",
    "development_credential_dir",
    "load_credential",
]

CERT_ENV = "VIDIFFUSE_SIGNING_CERT"
KEY_ENV = "VIDIFFUSE_SIGNING_KEY"

DEV_CHAIN_FILE = "dev-chain.pem"
DEV_KEY_FILE = "dev-key.pem"
DEV_ORGANIZATION = "vidiffuse local development (untrusted)"
DEV_SIGNER_NAME = "vidiffuse development signer"
DEV_CA_NAME = "vidiffuse development root CA"
DEV_VALIDITY = dt.timedelta(days=3650)

# c2pa's algorithm names, keyed by what the private key is.
_EC_CURVE_ALGS = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}


class SigningError(VidiffuseError):
    """No usable signing credential: missing or unreadable files, a key that does not match, an expired certificate."""


@dataclass(frozen=True)
class SigningCredential:
    """A certificate chain and its private key, ready to hand to c2pa."""

    cert_chain_pem: bytes
    private_key_pem: bytes  # always PKCS#8, whatever the user's file used
    alg: str  # c2pa's name: es256, es384, es512, ps256, ed25519
    is_development: bool
    origin: str  # where it came from, for messages
    subject: str  # the signing certificate's common name
    issuer: str

    def c2pa_signer(self):
        """A fresh ``c2pa.Signer`` (a native resource: use it as a context manager)."""
        import c2pa

        info = c2pa.C2paSignerInfo(alg=self.alg.encode(), sign_cert=self.cert_chain_pem,
                                   private_key=self.private_key_pem, ta_url=None)
        try:
            return c2pa.Signer.from_info(info)
        except c2pa.C2paError as e:
            raise SigningError(f"c2pa refused the signing credential from {self.origin}: {e}") from e


def load_credential() -> SigningCredential:
    """The user's credential if ``$VIDIFFUSE_SIGNING_CERT``/``$VIDIFFUSE_SIGNING_KEY`` are set, else the dev one."""
    cert_path, key_path = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if cert_path or key_path:
        if not (cert_path and key_path):
            missing = KEY_ENV if cert_path else CERT_ENV
            raise SigningError(f"{CERT_ENV} and {KEY_ENV} must be set together; {missing} is not set")
        return credential_from_files(Path(cert_path), Path(key_path))
    return development_credential()


def credential_from_files(cert_path: Path, key_path: Path, *, is_development: bool = False) -> SigningCredential:
    return credential_from_pem(_read_pem(cert_path, "certificate chain"), _read_pem(key_path, "private key"),
                               origin=f"{cert_path} + {key_path}", is_development=is_development)


def credential_from_pem(cert_chain_pem: bytes, private_key_pem: bytes, *, origin: str,
                        is_development: bool = False) -> SigningCredential:
    """Check that the chain parses, its first certificate is current and belongs to the key; pick the algorithm."""
    try:
        chain = x509.load_pem_x509_certificates(cert_chain_pem)
    except ValueError as e:
        raise SigningError(f"{origin}: the certificate file holds no readable PEM certificate ({e})") from e
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except TypeError as e:
        raise SigningError(f"{origin}: the private key is password-protected; give an unencrypted PEM key") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SigningError(f"{origin}: the key file holds no readable PEM private key ({e})") from e

    leaf = chain[0]
    if _public_bytes(leaf.public_key()) != _public_bytes(key.public_key()):
        raise SigningError(f"{origin}: the private key does not belong to the first certificate in the chain")
    now = dt.datetime.now(dt.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise SigningError(f"{origin}: the signing certificate is valid only from {leaf.not_valid_before_utc:%Y-%m-%d} "
                           f"to {leaf.not_valid_after_utc:%Y-%m-%d}")
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    return SigningCredential(cert_chain_pem=cert_chain_pem, private_key_pem=pkcs8, alg=_c2pa_alg(key, origin),
                             is_development=is_development, origin=origin, subject=_common_name(leaf.subject),
                             issuer=_common_name(leaf.issuer))


def development_credential_dir() -> Path:
    return vidiffuse_home() / "signing"


def development_credential() -> SigningCredential:
    """The local development credential, created on first use and reused afterwards."""
    folder = development_credential_dir()
    if not folder.exists():
        create_development_credential(folder)
    chain, key = folder / DEV_CHAIN_FILE, folder / DEV_KEY_FILE
    if not (chain.is_file() and key.is_file()):
        raise SigningError(f"{folder} is incomplete (expected {DEV_CHAIN_FILE} and {DEV_KEY_FILE}); "
                           "delete that folder to get a new development certificate")
    try:
        return credential_from_files(chain, key, is_development=True)
    except SigningError as e:
        raise SigningError(f"{e}; delete {folder} to get a new development certificate") from e


def create_development_credential(folder: Path) -> None:
    """Write a fresh dev CA + signing certificate into ``folder``, unless another process got there first.

    Everything is written into a private temporary folder that is then renamed into place in one step, so
    readers never see a half-written credential and two concurrent first uses agree on one winner.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))  # mode 0700
    try:
        chain_pem, key_pem = _make_development_chain()
        (staging / DEV_CHAIN_FILE).write_bytes(chain_pem)
        fd = os.open(staging / DEV_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():  # a real failure, not a lost race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_development_chain() -> tuple[bytes, bytes]:
    """(leaf + root PEM chain, leaf PKCS#8 key): the extensions c2pa insists on for each level."""
    now = dt.datetime.now(dt.timezone.utc)
    # Backdated a little so a signer whose clock lags the creator's does not see a not-yet-valid certificate.
    not_before, not_after = now - dt.timedelta(hours=1), now + DEV_VALIDITY
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name, leaf_name = _dev_name(DEV_CA_NAME), _dev_name(DEV_SIGNER_NAME)
    no_usage = dict.fromkeys(["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                              "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"], False)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(**{**no_usage, "key_cert_sign": True, "crl_sign": True}), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(leaf_name).issuer_name(ca_name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(**{**no_usage, "digital_signature": True}), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    key = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return chain, key


def _dev_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_ORGANIZATION)])


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise SigningError(f"signing {what} not found: {path}") from e
    except OSError as e:
        raise SigningError(f"cannot read signing {what} {path}: {e.strerror or e}") from e


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _c2pa_alg(key, origin: str) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_CURVE_ALGS:
        return _EC_CURVE_ALGS[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"  # C2PA allows RSA only with PSS padding
    raise SigningError(f"{origin}: unsupported key type {type(key).__name__}; "
                       "C2PA signs with EC P-256/P-384/P-521, Ed25519 or RSA keys")


def _common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME) or name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(attrs[0].value) if attrs else name.rfc4514_string()
