"""How much of a prompt's motion the text encoder's output gives away, and from how few captions.

A small reader, trained on training captions alone with the true direction as its label, predicts the direction
of held-out prompts (sets 1 and 2 of benchmarks/heldout_prompts.py) from MiniLM's outputs:
- `pooled`: a linear softmax classifier on the pooled sentence embedding (what the denoiser's adaLN sees);
- `tokens`: attention pooling (4 learned queries) over the token embeddings, then a linear layer (the kind of
  reading the denoiser's cross-attention can do), at several numbers of training captions.
If the reader gets a held-out set right and the denoiser does not, the words are not the limit: the denoiser's
training is.

Then the bundled model's own prompt reader (text/reader.py; what the pipeline rewrites prompts with) on both sets
and their rare-word variants, per attribute.

    .venv/bin/python benchmarks/text_reading.py          # ~2 min on 2 cores

Writes benchmarks/results/text_reading.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from heldout_prompts import heldout_prompts  # noqa: E402

from vidiffuse.data import shapes  # noqa: E402
from vidiffuse.pipeline import VideoPipeline  # noqa: E402
from vidiffuse.text.encoders import load_text_encoder  # noqa: E402

OUT = Path(__file__).parent / "results"
DIRECTIONS = list(shapes.DIRECTIONS)


class TokenReader(torch.nn.Module):
    def __init__(self, dim: int, classes: int, queries: int = 4):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(queries, dim) * 0.05)
        self.key, self.value = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        self.out = torch.nn.Linear(queries * dim, classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("qd,bld->bql", self.queries, self.key(tokens)) / tokens.shape[-1] ** 0.5
        weights = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        return self.out(torch.einsum("bql,bld->bqd", weights, self.value(tokens)).flatten(1))


def encode(encoder, prompts: list[str]):
    parts = [encoder.encode(prompts[i:i + 256]) for i in range(0, len(prompts), 256)]
    return (torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]),
            torch.cat([p.pooled for p in parts]))


def training_captions(n: int, version: int, seed: int = 1) -> tuple[list[str], torch.Tensor]:
    rng = np.random.default_rng(seed)
    captions, labels = [], []
    for _ in range(n):
        attrs = shapes.sample_clip_spec(rng).attributes()
        captions.append(shapes.make_caption(attrs, rng, version=version))
        labels.append(DIRECTIONS.index(attrs["direction"]))
    return captions, torch.tensor(labels)


def main() -> None:
    torch.manual_seed(0)
    encoder = load_text_encoder()
    heldout = {f"set {s}": heldout_prompts(200, seed=2026 if s == 1 else 2027, phrasing=s) for s in (1, 2)}
    heldout = {k: (encode(encoder, p), torch.tensor([DIRECTIONS.index(t["direction"]) for t in truth]))
               for k, (p, truth) in heldout.items()}
    rows = []
    for version in (1, 2):
        captions, labels = training_captions(6000, version)
        tokens, mask, pooled = encode(encoder, captions)
        linear = torch.nn.Linear(encoder.dim, len(DIRECTIONS))
        opt = torch.optim.AdamW(linear.parameters(), 1e-2, weight_decay=1e-4)
        for _ in range(500):  # full batch: a converged multinomial logistic regression
            loss = torch.nn.functional.cross_entropy(linear(pooled), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            rows.append({"captions": f"version {version}", "reader": "pooled, linear", "seen": 6000,
                         **{k: float((linear(x[2]).argmax(-1) == y).float().mean()) for k, (x, y) in heldout.items()}})
        for seen in (3200, 9600, 32000):
            reader = TokenReader(encoder.dim, len(DIRECTIONS))
            opt = torch.optim.AdamW(reader.parameters(), 1e-3, weight_decay=0.05)
            gen = torch.Generator().manual_seed(version)
            for _ in range(seen // 32):
                i = torch.randint(len(labels), (32,), generator=gen)
                loss = torch.nn.functional.cross_entropy(reader(tokens[i], mask[i]), labels[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                rows.append({"captions": f"version {version}", "reader": "tokens, attention pooling", "seen": seen,
                             **{k: float((reader(x[0], x[1]).argmax(-1) == y).float().mean())
                                for k, (x, y) in heldout.items()}})
        print(rows[-4:])
    bundled = bundled_reader_accuracy()
    OUT.mkdir(exist_ok=True)
    (OUT / "text_reading.json").write_text(json.dumps({"direction_readers": rows, "bundled_reader": bundled}, indent=2) + "\n")
    lines = ["# Direction read from MiniLM's outputs by a small supervised reader (200 held-out prompts per set)", "",
             "| training captions | reader | captions seen | set 1 | set 2 |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['captions']} | {r['reader']} | {r['seen']} | {r['set 1']:.3f} | {r['set 2']:.3f} |" for r in rows]
    lines += ["", "# The bundled model's prompt reader, per attribute", "",
              "| held-out prompts | " + " | ".join(shapes.ATTRIBUTES) + " |", "|---|" + "---:|" * len(shapes.ATTRIBUTES)]
    lines += [f"| {name} | " + " | ".join(f"{acc[a]:.3f}" for a in shapes.ATTRIBUTES) + " |" for name, acc in bundled.items()]
    (OUT / "text_reading.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def bundled_reader_accuracy() -> dict[str, dict[str, float]]:
    pipe = VideoPipeline.from_pretrained("shapes")
    sets = {"set 1": heldout_prompts(200, seed=2026), "set 2": heldout_prompts(200, seed=2027, phrasing=2),
            "set 1, rare words": heldout_prompts(50, seed=7, rare_words=True),
            "set 2, rare words": heldout_prompts(50, seed=8, rare_words=True, phrasing=2)}  # engine.py --n 200
    result = {}
    for name, (prompts, truth) in sets.items():
        readings = pipe.prompt_reader.read(pipe.text_encoder, prompts)
        result[name] = {a: float(np.mean([r[a] == t[a] for r, t in zip(readings, truth)])) for a in shapes.ATTRIBUTES}
    return result


if __name__ == "__main__":
    main()
