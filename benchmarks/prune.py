"""Pruning benchmark: the bundled model, its pruned copy before recovery and after it, side by side.

    .venv/bin/python benchmarks/prune.py                # the committed results: all 256 golden prompts, 1 timed pass

The pruned model is `shapes-pruned` (made by `vidiffuse prune shapes --out src/vidiffuse/weights/shapes-pruned
--ratio 0.3 --heads 3`); its starting point before recovery is rebuilt exactly from the units its
training/prune.json lists as kept. Speed, peak memory, adherence and FVD come from `vidiffuse bench`
(`compress/bench.py`: same golden prompts, seeds and sampling settings for every variant, interleaved passes);
this script adds parameter counts, sizes on disk and the recovery curve. Writes benchmarks/results/prune/
prune.json, prune.md and prune.png (and the bench's own report in bench/).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import torch

from vidiffuse.compress import prune
from vidiffuse.compress.bench import run_bench
from vidiffuse.data import shapes
from vidiffuse.files import write_atomic
from vidiffuse.pipeline import VideoPipeline, resolve_model_path

OUT = Path(__file__).parent / "results" / "prune"
LABELS = {"fp32": "unpruned (fp32)", "before": "pruned, before recovery", "pruned": "pruned + recovery"}


def rebuild_unrecovered(source: str, pruned: Path, out: Path) -> Path:
    """The pruned model as it was before its recovery fine-tune: the source's weights, the kept units only."""
    pipe = VideoPipeline.from_pretrained(source)
    record = json.loads((pruned / "training" / prune.PRUNE_RECORD).read_text())
    shape = prune.PruneShape(record["heads"], record["mlp_hidden_size"])
    student = prune.prune_transformer(pipe.transformer, shape, prune.scores_from_kept(record["kept"], pipe.transformer))
    return prune.save_pruned(pipe, student, out, {**record, "recovery": {**record["recovery"], "steps_done": 0}})


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def summarize(bench: dict, source: Path, pruned: Path, before_name: str) -> dict:
    rows = {r["name"]: r for r in bench["variants"]}
    names = {"fp32": "fp32", "before": before_name, "pruned": "pruned"}
    full = VideoPipeline.from_pretrained(source).transformer
    small = VideoPipeline.from_pretrained(pruned).transformer
    params = {"fp32": prune.parameter_count(full), "before": prune.parameter_count(small), "pruned": prune.parameter_count(small)}
    disk = {"fp32": _bytes(source / "transformer"), "before": _bytes(pruned / "transformer"),
            "pruned": _bytes(pruned / "transformer")}
    out = {}
    for key, name in names.items():
        row = rows[name]
        if row["status"] != "ok":
            out[key] = {"label": LABELS[key], "status": row["status"], "reason": row["reason"]}
            continue
        out[key] = {"label": LABELS[key], "status": "ok", "parameters": params[key], "denoiser_disk_bytes": disk[key],
                    "seconds_per_video": row["seconds_per_video"], "timed_batches": row["timed_batches"],
                    "speedup_vs_fp32": row["speedup_vs_fp32"], "peak_memory_mb": row["peak_memory_mb"],
                    "metrics": row["metrics"], "adherence_change_vs_fp32_pts": row["adherence_change_vs_fp32_pts"]}
    record = json.loads((pruned / "training" / prune.PRUNE_RECORD).read_text())
    recovery = _read_jsonl(pruned / "training" / prune.RECOVERY_LOG)
    after = out["pruned"]
    fewer = 1 - params["pruned"] / params["fp32"]
    return {
        "n": bench["n"], "golden_set": bench["golden_set"], "settings": bench["settings"], "machine": bench["machine"],
        "created": bench["created"], "shape": {"heads": record["heads"], "mlp_hidden_size": record["mlp_hidden_size"]},
        "variants": out, "fewer_parameters": fewer,
        "recovery": {k: record["recovery"][k] for k in ("method", "steps", "batch_size", "lr", "ema_decay")},
        "recovery_curve": [{"step": r["step"], **r["eval"]} for r in recovery if "eval" in r],
        "recovery_loss": [{"step": r["step"], "loss": r["loss"]} for r in recovery if "loss" in r],
        "targets": [{"target": ">= 25% fewer denoiser parameters", "value": fewer, "passed": fewer >= 0.25},
                    {"target": "adherence within 3 points of the unpruned model after recovery",
                     "value": after.get("adherence_change_vs_fp32_pts"),
                     "passed": after.get("status") == "ok" and after["adherence_change_vs_fp32_pts"] >= -3.0}],
    }


def format_md(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    attrs = shapes.ATTRIBUTES
    lines = [
        "# Structured pruning — shapes → shapes-pruned",
        "",
        f"Every DiT block keeps {report['shape']['heads']} of 4 attention heads (self- and cross-attention) and "
        f"{report['shape']['mlp_hidden_size']} of 1024 MLP channels, chosen by output energy on calibration batches; "
        f"recovery: {report['recovery']['steps']} steps × batch {report['recovery']['batch_size']} of "
        f"{report['recovery']['method']} (EMA {report['recovery']['ema_decay']}).",
        "",
        f"n = {report['n']} golden prompts ({report['golden_set']}), the same prompts and seeds for every row; "
        f"{s['sampler']} {s['steps']} steps, guidance {s['guidance']}, batch {s['batch_size']}, {s['repeats']} timed "
        f"pass(es) after a warm-up (`vidiffuse bench`). s/video is the median over the timed batches, on a "
        f"{m['cpus']}-CPU machine shared with other jobs while it ran (timings wander by tens of percent). "
        "Adherence: analyzer reading vs asked attribute, %; FVD: shapes-world encoder vs real clips (95% bootstrap CI).",
        "",
        "| model | parameters | denoiser on disk | s/video | × vs unpruned | peak MB | adherence | Δ pts | "
        + " | ".join(attrs) + " | FVD (95% CI) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(attrs) + "---:|",
    ]
    for row in report["variants"].values():
        if row["status"] != "ok":
            lines.append(f"| {row['label']} | {row['status']}: {row['reason']} |")
            continue
        mt = row["metrics"]
        ci = mt["fvd_shapes_ci95"]
        lines.append(
            f"| {row['label']} | {row['parameters']:,} | {row['denoiser_disk_bytes'] / 1e6:.1f} MB | "
            f"{row['seconds_per_video']:.3g} | {row['speedup_vs_fp32']:.2f} | {row['peak_memory_mb']:.0f} | "
            f"{100 * mt['adherence_mean']:.1f} | {row['adherence_change_vs_fp32_pts']:+.1f} | "
            + " | ".join(f"{100 * mt[f'adherence_{a}']:.1f}" for a in attrs)
            + f" | {mt['fvd_shapes']:.1f} ({ci[0]:.1f}–{ci[1]:.1f}) |")
    lines += ["", "## Targets (issue #4)", ""]
    for t in report["targets"]:
        value = f"{t['value']:.1%}" if "fewer" in t["target"] else (
            "–" if t["value"] is None else f"{t['value']:+.1f} points")
        lines.append(f"- {'pass' if t['passed'] else 'FAIL'}: {t['target']} ({value})")
    curve = report["recovery_curve"]
    if curve:
        lines += ["", f"## Recovery (analyzer on the {len(attrs)} attributes of the fixed watch-set prompts, EMA weights)",
                  "", "| step | " + " | ".join(attrs) + " | mean |", "|---:|" + "---:|" * (len(attrs) + 1)]
        for r in curve:
            lines.append(f"| {r['step']} | " + " | ".join(f"{r[f'acc_{a}']:.2f}" for a in attrs) + f" | {r['acc_mean']:.3f} |")
    lines += ["", "Reproduce: `.venv/bin/python benchmarks/prune.py` (and `vidiffuse prune` for the model itself).", ""]
    return "\n".join(lines)


def plot(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attrs = list(shapes.ATTRIBUTES) + ["mean"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    rows = [r for r in report["variants"].values() if r["status"] == "ok"]
    width = 0.8 / max(1, len(rows))
    for k, row in enumerate(rows):
        values = [100 * row["metrics"][f"adherence_{a}"] for a in attrs]
        left.bar(np.arange(len(attrs)) + (k - (len(rows) - 1) / 2) * width, values, width, label=row["label"])
    left.set_xticks(range(len(attrs)), attrs)
    left.set_ylabel("adherence (%)")
    left.set_ylim(0, 105)
    left.set_title(f"{report['n']} golden prompts, same seeds")
    left.legend(fontsize=8, loc="lower left")
    curve = report["recovery_curve"]
    if curve:
        steps = [r["step"] for r in curve]
        for a in shapes.ATTRIBUTES:
            right.plot(steps, [r[f"acc_{a}"] for r in curve], alpha=0.5, label=a)
        right.plot(steps, [r["acc_mean"] for r in curve], color="black", linewidth=2, label="mean")
        right.set_xlabel("recovery step")
        right.set_ylabel("watch-set adherence")
        right.set_title("recovery: analyzer on the watch-set prompts (EMA)")
        right.legend(fontsize=8, loc="lower right")
        right.grid(alpha=0.3)
        loss = report["recovery_loss"]
        if loss:
            twin = right.twinx()
            twin.plot([r["step"] for r in loss], [r["loss"] for r in loss], color="gray", linewidth=0.6, alpha=0.6)
            twin.set_ylabel("distillation loss (gray)")
            twin.set_yscale("log")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--pruned", default=prune.BUNDLED_PRUNED)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    source, pruned = resolve_model_path(args.model), resolve_model_path(args.pruned)
    with tempfile.TemporaryDirectory() as tmp:
        before = rebuild_unrecovered(args.model, pruned, Path(tmp) / "unrecovered")
        before_name = f"pruned:{before}"
        bench = run_bench(args.model, ["fp32", before_name, f"pruned:{pruned}" if args.pruned != prune.BUNDLED_PRUNED
                                       else "pruned"], n_prompts=args.n, batch_size=args.batch_size,
                          repeats=args.repeats, out_dir=args.out / "bench")
    if args.pruned != prune.BUNDLED_PRUNED:  # the summary looks the row up by its plain name
        for row in bench["variants"]:
            if row["name"] == f"pruned:{pruned}":
                row["name"] = "pruned"
    report = summarize(bench, source, pruned, before_name)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "prune.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out / "prune.md", format_md(report))
    write_atomic(args.out / "prune.png", plot(report))
    print(format_md(report))
    print(f"wrote {args.out}/prune.json, prune.md and prune.png; the full bench table is in {args.out / 'bench'}")


if __name__ == "__main__":
    main()
