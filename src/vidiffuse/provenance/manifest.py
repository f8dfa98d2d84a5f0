"""Signed C2PA manifests inside generated MP4s, and reading them back.

A signed video carries:

* ``c2pa.actions``: one ``c2pa.created`` action whose digital source type says "made by a trained model"
  (IPTC ``trainedAlgorithmicMedia``), with vidiffuse as the software agent;
* ``org.vidiffuse.generation``: model name and version, generation settings, the SHA-256 of the prompt
  (never the prompt itself), the SHA-256 of the training-data manifest and the watermark payload;
* c2pa's own hard binding (``c2pa.hash.bmff``), so that changing any byte of the video breaks validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from vidiffuse.errors import VideoReadError, VidiffuseError
from vidiffuse.provenance.signing import SigningCredential, load_credential

__all__ = [
    "DIGITAL_SOURCE_TYPE",
    "GENERATION_LABEL",
    "MANIFEST_UNREADABLE",
    "TRUST_ANCHORS_ENV",
    "ManifestError",
    "build_manifest_definition",
    "prompt_sha256",
    "read_manifest",
    "sign_video",
    "summarize_store",
    "validate_generation",
]

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_LABEL = "org.vidiffuse.generation"
TRUST_ANCHORS_ENV = "VIDIFFUSE_TRUST_ANCHORS"
MP4_MIME = "video/mp4"
# The ISO BMFF uuid box type that carries a C2PA manifest store (C2PA spec, "Embedding manifests into BMFF").
C2PA_BOX_UUID = bytes.fromhex("d8fec3d61b0e483c92975828877ec481")

_UNTRUSTED = "signingCredential.untrusted"
# Not a C2PA status code: the file holds C2PA data that c2pa could not even decode (see read_manifest).
MANIFEST_UNREADABLE = "vidiffuse.manifest.unreadable"
# Keys that would carry the raw prompt text into a manifest that travels with the video.
_FORBIDDEN_KEYS = frozenset({"prompt", "prompts", "negative_prompt", "caption"})
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ManifestError(VidiffuseError):
    """A manifest cannot be built or embedded: incomplete generation record, or c2pa refused to sign."""


def prompt_sha256(prompt: str) -> str:
    """Hex SHA-256 of the prompt's UTF-8 bytes: proves which prompt made a video without revealing it."""
    if not isinstance(prompt, str):
        raise ManifestError(f"prompt must be a string, got {type(prompt).__name__}")
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def validate_generation(generation: dict[str, Any]) -> dict[str, Any]:
    """Check the generation record has what the manifest promises; return it as plain JSON data."""
    if not isinstance(generation, dict):
        raise ManifestError(f"generation record must be a dict, got {type(generation).__name__}")
    problems = []
    missing = [k for k in ("model", "settings", "prompt_sha256", "training_data_manifest_sha256", "watermark")
               if k not in generation]
    if missing:
        problems.append(f"missing keys {missing}")
    model = generation.get("model")
    if "model" in generation and not (isinstance(model, dict) and isinstance(model.get("name"), str)
                                      and isinstance(model.get("version"), str)):
        problems.append("model must be {'name': str, 'version': str}")
    if "settings" in generation and not isinstance(generation["settings"], dict):
        problems.append("settings must be a dict")
    if "prompt_sha256" in generation and not _is_sha256(generation["prompt_sha256"]):
        problems.append("prompt_sha256 must be 64 lowercase hex digits (use prompt_sha256(prompt))")
    data_hash = generation.get("training_data_manifest_sha256")
    if data_hash is not None and not _is_sha256(data_hash):
        problems.append("training_data_manifest_sha256 must be 64 lowercase hex digits or None")
    watermark = generation.get("watermark")
    if "watermark" in generation and not (isinstance(watermark, dict) and isinstance(watermark.get("enabled"), bool)):
        problems.append("watermark must be a dict with a bool 'enabled'")
    leaked = sorted(_find_keys(generation, _FORBIDDEN_KEYS))
    if leaked:
        problems.append(f"raw prompt text must not go into the manifest (found keys {leaked}); store prompt_sha256")
    if problems:
        raise ManifestError("invalid generation record: " + "; ".join(problems))
    try:
        return json.loads(json.dumps(generation, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ManifestError(f"generation record is not plain JSON data: {e}") from e


def build_manifest_definition(title: str, generation: dict[str, Any]) -> dict[str, Any]:
    """The c2pa Builder definition for a freshly generated video (``generation`` already validated)."""
    version = _vidiffuse_version()
    return {
        "claim_generator_info": [{"name": "vidiffuse", "version": version}],
        "title": title,
        "format": MP4_MIME,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created",
                "digitalSourceType": DIGITAL_SOURCE_TYPE,
                "softwareAgent": {"name": "vidiffuse", "version": version},
            }]}},
            {"label": GENERATION_LABEL, "data": generation},
        ],
    }


def sign_video(path: str | os.PathLike, generation: dict[str, Any],
               credential: SigningCredential | None = None, title: str | None = None) -> None:
    """Embed a signed C2PA manifest into the MP4 at ``path``, replacing the file in one rename.

    ``title`` is the file name the manifest records (default: ``path``'s own; a staging file passes the final one).
    ``credential`` defaults to :func:`vidiffuse.provenance.signing.load_credential`. On any failure the
    original file is left as it was and no temporary file remains.
    """
    import c2pa

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"cannot sign {path}: no such file")
    definition = build_manifest_definition(title or path.name, validate_generation(generation))
    credential = credential or load_credential()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".signing")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as dest, open(path, "rb") as source:
            with credential.c2pa_signer() as signer, c2pa.Builder(definition) as builder:
                builder.sign(signer, MP4_MIME, source, dest)
            dest.flush()
            os.fsync(dest.fileno())
        # mkstemp makes 0600 files; the signed video should keep the permissions the unsigned one had.
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except c2pa.C2paError as e:
        raise ManifestError(f"could not sign {path} with {credential.origin}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(path: str | os.PathLike, trust_anchors: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read and validate the C2PA manifest of a video, as JSON-ready data.

    ``trust_anchors`` (default ``$VIDIFFUSE_TRUST_ANCHORS``) is a PEM file of root certificates to trust;
    without one no signer is trusted and ``trusted`` is False. A file without a manifest gives
    ``present: False`` and None elsewhere; a file that cannot be read raises :class:`VideoReadError`.
    """
    import c2pa

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"cannot verify {path}: no such file")
    context = _trust_context(trust_anchors or os.environ.get(TRUST_ANCHORS_ENV))
    try:
        with open(path, "rb") as stream:
            reader = c2pa.Reader.try_create(MP4_MIME, stream, None, context)
            if reader is None:
                return _absent()
            with reader:
                store = json.loads(reader.json())
    except OSError as e:
        raise VideoReadError(f"cannot read {path}: {e.strerror or e}") from e
    except c2pa.C2paError as e:
        # The container holds C2PA data that c2pa can no longer decode: of the single-bit flips inside a signed
        # manifest that c2pa notices, about a third end here rather than in validation codes. That is the same
        # finding as a hash mismatch — the signed data was altered — not an unreadable file.
        if _has_c2pa_box(path):
            return _damaged(str(e))
        raise VideoReadError(f"cannot read {path} as an MP4 with C2PA data: {e}") from e
    return summarize_store(store)


def summarize_store(store: dict[str, Any]) -> dict[str, Any]:
    """Reduce c2pa's manifest-store JSON to the verdict and the facts vidiffuse cares about."""
    active = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    failures = _codes(results.get("failure")) or _codes(store.get("validation_status"))
    successes = _codes(results.get("success"))
    state = store.get("validation_state")
    tampered = any(code.endswith(".mismatch") for code in failures)
    serious = [code for code in failures if code != _UNTRUSTED]
    assertions = {a.get("label"): a.get("data") for a in active.get("assertions", [])}
    signature = active.get("signature_info") or {}
    return {
        "present": True,
        "valid": bool(active) and not serious and state != "Invalid",
        "tampered": tampered,
        "trusted": "signingCredential.trusted" in successes,
        "validation_state": state,
        "issues": failures,
        "signer": {k: signature[k] for k in ("common_name", "issuer", "alg", "cert_serial_number", "time")
                   if k in signature},
        "generation": assertions.get(GENERATION_LABEL),
        "digital_source_type": _created_source_type(assertions),
        "claim_generator": _claim_generator(active),
        "title": active.get("title"),
        "error": None,
    }


def _has_c2pa_box(path: Path, max_boxes: int = 4096) -> bool:
    """Whether the file is ISO BMFF (MP4) with a top-level C2PA ``uuid`` box, walking box headers only."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos = 0
            for _ in range(max_boxes):
                if pos + 8 > end:
                    return False
                f.seek(pos)
                header = f.read(8)
                size, kind = int.from_bytes(header[:4], "big"), header[4:]
                body = pos + 8
                if size == 1:
                    size, body = int.from_bytes(f.read(8), "big"), pos + 16
                elif size == 0:
                    size = end - pos
                if size < body - pos:
                    return False
                if kind == b"uuid" and f.read(16) == C2PA_BOX_UUID:
                    return True
                pos += size
    except OSError:
        return False
    return False


def _absent() -> dict[str, Any]:
    return {"present": False, "valid": None, "tampered": None, "trusted": None, "validation_state": None,
            "issues": [], "signer": None, "generation": None, "digital_source_type": None,
            "claim_generator": None, "title": None, "error": None}


def _damaged(message: str) -> dict[str, Any]:
    return {**_absent(), "present": True, "valid": False, "tampered": True, "trusted": False,
            "validation_state": "Invalid", "issues": [MANIFEST_UNREADABLE], "error": message}


def _trust_context(anchors_path):
    if not anchors_path:
        return None  # c2pa's shared default context: no trust anchors
    import c2pa

    try:
        pem = Path(anchors_path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise VidiffuseError(f"cannot read trust anchors {anchors_path}: {getattr(e, 'strerror', None) or e}") from e
    return c2pa.Context.from_dict({"trust": {"trust_anchors": pem}})


def _codes(statuses) -> list[str]:
    seen: dict[str, None] = {}
    for status in statuses or []:
        if isinstance(status, dict) and status.get("code"):
            seen.setdefault(status["code"], None)
    return list(seen)


def _created_source_type(assertions: dict[str, Any]) -> str | None:
    # claim v2 stores actions as c2pa.actions.v2; older manifests use c2pa.actions
    for label in ("c2pa.actions.v2", "c2pa.actions"):
        for action in (assertions.get(label) or {}).get("actions", []):
            if action.get("action") == "c2pa.created":
                return action.get("digitalSourceType")
    return None


def _claim_generator(manifest: dict[str, Any]) -> str | None:
    if manifest.get("claim_generator"):
        return manifest["claim_generator"]
    info = (manifest.get("claim_generator_info") or [{}])[0]
    if not info.get("name"):
        return None
    return f"{info['name']}/{info['version']}" if info.get("version") else info["name"]


def _find_keys(data, keys: frozenset[str]) -> set[str]:
    if isinstance(data, dict):
        found = {k for k in data if k in keys}
        for value in data.values():
            found |= _find_keys(value, keys)
        return found
    if isinstance(data, list):
        return set().union(*(_find_keys(v, keys) for v in data)) if data else set()
    return set()


def _is_sha256(value) -> bool:
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def _vidiffuse_version() -> str:
    import vidiffuse

    version = getattr(vidiffuse, "__version__", None)
    if version:
        return version
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("vidiffuse")
    except PackageNotFoundError:
        return "unknown"
