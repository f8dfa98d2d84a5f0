"""Write the shapes world's golden evaluation set: fixed prompts, seeds and the attributes each prompt asks for.

The set is a file, not a function call, so that a change to the caption generator can never silently
change what an old report was measured on. Half the prompts use the training captions' phrasing, half the
held-out phrasings of benchmarks/heldout_prompts.py (a quarter with words training never used).

    .venv/bin/python scripts/make_golden_set.py   # rewrites src/vidiffuse/evaluate/golden/shapes_v1.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.heldout_prompts import heldout_prompts  # noqa: E402
from vidiffuse.data import shapes  # noqa: E402
from vidiffuse.files import write_atomic  # noqa: E402

N = 256


def main() -> None:
    rng = np.random.default_rng(20261126)
    items = []
    for i in range(N // 2):
        spec = shapes.sample_clip_spec(rng)
        items.append({"prompt": shapes.make_caption(spec.attributes(), rng), "phrasing": "training",
                      "attributes": spec.attributes()})
    for rare in (False, True):
        prompts, truth = heldout_prompts(N // 4, seed=3000 + rare, rare_words=rare)
        items += [{"prompt": p, "phrasing": "heldout-rare" if rare else "heldout", "attributes": a}
                  for p, a in zip(prompts, truth)]
    out = ROOT / "src/vidiffuse/evaluate/golden/shapes_v1.jsonl"
    write_atomic(out, "".join(json.dumps({"id": i, "seed": 1000 + i, **item}) + "\n" for i, item in enumerate(items)))
    print(f"wrote {len(items)} prompts to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
