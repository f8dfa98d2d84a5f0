"""Record the training-data manifest of a model trained on the procedural shapes world.

    .venv/bin/python scripts/add_data_manifest.py src/vidiffuse/weights/shapes

Reads the `[data]` section of every `training/<stage>_config.json` in the model directory (all must be
`kind = "shapes"`), writes `training/data_manifest.json` (the generator, its seeds and the data's licence,
Apache-2.0) and adds its SHA-256 to `model_index.json` as `training_data_manifest_sha256`. Models trained
by `vidiffuse train` get both at export; this is for models exported before that existed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from vidiffuse.data.manifest import canonical_json, shapes_world_manifest
from vidiffuse.files import write_atomic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    args = ap.parse_args()
    training = args.model_dir / "training"
    index_path = args.model_dir / "model_index.json"
    configs = {p.name.removesuffix("_config.json"): json.loads(p.read_text())
               for p in sorted(training.glob("*_config.json"))}
    if not index_path.is_file() or not configs:
        sys.exit(f"error: {args.model_dir} needs model_index.json and training/<stage>_config.json files")
    # the autoencoder is trained first: list the stages in the order they ran
    order = {"autoencoder": 0, "denoiser": 1}
    sources = {stage: cfg["data"] for stage, cfg in sorted(configs.items(), key=lambda kv: order.get(kv[0], 9))}
    other = [s for s, d in sources.items() if d.get("kind", "shapes") != "shapes"]
    if other:
        sys.exit(f"error: stages {other} were not trained on the shapes world; use `vidiffuse data manifest`")
    index = json.loads(index_path.read_text())
    manifest = shapes_world_manifest(sources, frames=index["frames"], size=index["size"], fps=index.get("fps", 8))
    data = canonical_json(manifest)
    write_atomic(training / "data_manifest.json", data)
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(index_path, json.dumps({**index, "training_data_manifest_sha256": digest}, indent=2) + "\n")
    print(f"wrote {training / 'data_manifest.json'}; training_data_manifest_sha256 = {digest}")


if __name__ == "__main__":
    main()
