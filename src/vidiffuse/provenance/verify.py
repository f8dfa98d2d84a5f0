"""`vidiffuse verify`: is this video marked as AI-generated, by whom, and has it been changed since?

Two independent signals: the signed C2PA manifest (rich, but lost on re-encoding or screen recording) and the
invisible watermark (a 32-bit payload that survives those).
"""

from __future__ import annotations

from pathlib import Path

from vidiffuse.provenance import watermark as wm
from vidiffuse.provenance.manifest import read_manifest
from vidiffuse.video.io import frames_to_uint8, read_video


def verify_file(path: str | Path) -> dict:
    """{"file", "watermark": {"detected", "p_value", "payload", ...}, "manifest": {"present", "valid", "tampered", ...}}.

    Where the manifest is intact and names the watermark payload, "consistent" says whether the pixels carry it.
    """
    path = Path(path)
    video, _ = read_video(path)  # raises VideoReadError with one clear line for missing/corrupt files
    detection = wm.detect(frames_to_uint8(video))
    manifest = read_manifest(path)
    result = {"file": str(path), "watermark": {**detection.to_dict(), "threshold": wm.DETECTION_P_VALUE},
              "manifest": manifest}
    if detection.detected:
        result["watermark"]["model"] = bundled_model_named_by(detection.model_id)
    claimed = ((manifest.get("generation") or {}).get("watermark") or {}).get("payload")
    if claimed is not None:
        result["consistent"] = detection.payload == claimed
    return result


def bundled_model_named_by(model_id: str) -> str | None:
    """The bundled model whose name and version hash to these 16 payload bits, if any (1 in 65536 collide by chance)."""
    from vidiffuse.pipeline import BUNDLED, model_version, watermark_model_label

    for name, path in BUNDLED.items():
        if (path / "model_index.json").is_file():
            label = watermark_model_label(name, model_version(path))
            if f"{wm.model_id(label):04x}" == model_id:
                return name
    return None
