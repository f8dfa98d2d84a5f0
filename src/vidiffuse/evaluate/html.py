"""The evaluation report as files people look at: report.json, report.html with plots, a strip of frames."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..data import shapes  # noqa: E402
from ..files import write_atomic  # noqa: E402

TEMPLATE = jinja2.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vidiffuse eval: {{ r.model }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } img { max-width: 100%; }
.worse { color: #b00; } .better { color: #070; } .note { color: #666; font-size: 90%; }
</style></head><body>
<h1>vidiffuse eval — {{ r.model }}</h1>
<p>{{ r.n }} prompts of golden set <b>{{ r.golden_set }}</b>; sampler {{ r.settings.sampler }},
{{ r.settings.steps }} steps, guidance {{ r.settings.guidance }}.
<span class="note">{{ r.machine.processor or r.machine.platform }}, {{ r.machine.threads }} threads, torch {{ r.machine.torch }}</span></p>
{% if gate is not none %}
<h2>Regression gate: {{ "PASSED" if not gate else "FAILED" }}</h2>
{% if gate %}<ul>{% for line in gate %}<li class="worse">{{ line }}</li>{% endfor %}</ul>{% endif %}
{% endif %}
<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th>{% if baseline %}<th>baseline</th><th>change</th>{% endif %}</tr>
{% for row in rows %}<tr><td>{{ row.metric }}</td><td class="num">{{ "%.4g"|format(row.new) if row.new is not none else "—" }}</td>
{% if baseline %}<td class="num">{{ "%.4g"|format(row.old) if row.old is not none else "—" }}</td>
<td class="num {{ row.verdict }}">{{ "%+.4g"|format(row.change) if row.change is not none else "" }}</td>{% endif %}</tr>
{% endfor %}</table>
<p class="note">FVD on the shapes-world video encoder, 95% bootstrap interval {{ ci }}. Adherence: the share of
videos whose pixels show the asked attribute (shapes-world analyzer). Temporal metrics follow VBench's dimensions of
the same name (docs: vidiffuse.evaluate.temporal).</p>
{% for title, img in plots %}<h2>{{ title }}</h2><img src="data:image/png;base64,{{ img }}" alt="{{ title }}">{% endfor %}
<h2>Out-of-distribution prompts</h2>
<table><tr><th>group</th><th>n</th><th>adherence (mean of attributes)</th></tr>
{% for name, g in r.ood.by_phrasing.items() %}<tr><td>phrasing: {{ name }}</td><td class="num">{{ g.n }}</td><td class="num">{{ "%.3f"|format(g.adherence_mean) }}</td></tr>{% endfor %}
{% for g in r.ood.by_ood_tercile or [] %}<tr><td>OOD score {{ "%.3f"|format(g.score_range[0]) }}–{{ "%.3f"|format(g.score_range[1]) }}</td><td class="num">{{ g.n }}</td><td class="num">{{ "%.3f"|format(g.adherence_mean) }}</td></tr>{% endfor %}
</table>
{% if r.ood.threshold is defined %}<p class="note">{{ r.ood.flagged }} of {{ r.n }} prompts score above the model's OOD threshold {{ "%.3f"|format(r.ood.threshold) }}.</p>{% endif %}
{% if strip %}<h2>Samples</h2><p class="note">Every other frame of the first videos; ✓/✗ per attribute as read from the pixels.</p>
<img src="data:image/png;base64,{{ strip }}" alt="sample frames">{% endif %}
</body></html>
""")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _adherence_plot(report: dict) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    attrs = list(shapes.ATTRIBUTES)
    groups = sorted({v["phrasing"] for v in report["videos"]})
    width = 0.8 / (len(groups) + 1)
    all_vals = [report["metrics"][f"adherence_{a}"] for a in attrs]
    ax.bar(np.arange(len(attrs)) - 0.4 + width / 2, all_vals, width, label="all")
    for g_i, group in enumerate(groups, 1):
        vids = [v for v in report["videos"] if v["phrasing"] == group]
        vals = [np.mean([v["correct"][a] for v in vids]) for a in attrs]
        ax.bar(np.arange(len(attrs)) - 0.4 + width * (g_i + 0.5), vals, width, label=group)
    ax.set_xticks(range(len(attrs)), attrs)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of videos correct")
    ax.legend(fontsize=8, ncol=len(groups) + 1, loc="lower right")
    return _png(fig)


def _sweep_plots(report: dict) -> list[tuple[str, str]]:
    sweep = report.get("sweep") or []
    if not sweep:
        return []
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 3.4))
    for name in dict.fromkeys(s["sampler"] for s in sweep):
        rows = sorted((s for s in sweep if s["sampler"] == name), key=lambda s: s["steps"])
        steps = [s["steps"] for s in rows]
        ax1.plot(steps, [s["adherence_mean"] for s in rows], "o-", label=name)
        ax2.plot(steps, [s["fvd_shapes"] for s in rows], "o-", label=name)
        ax3.plot([s["seconds_per_video"] for s in rows], [s["adherence_mean"] for s in rows], "o-", label=name)
    ax1.set(xlabel="sampling steps", ylabel="adherence (mean)", title="quality vs steps")
    ax2.set(xlabel="sampling steps", ylabel=f"FVD (shapes encoder, n={sweep[0]['n']})", title="FVD vs steps")
    ax3.set(xlabel="seconds per video", ylabel="adherence (mean)", title="quality vs latency")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return [("Quality, steps and latency", _png(fig))]


def _strip(videos: Sequence[np.ndarray], report: dict, rows: int = 8) -> str | None:
    if not videos:
        return None
    rows = min(rows, len(videos))
    t = videos[0].shape[0]
    picks = list(range(0, t, 2))
    fig, axes = plt.subplots(rows, len(picks), figsize=(len(picks) * 0.9, rows * 1.05), squeeze=False)
    for r in range(rows):
        info = report["videos"][r]
        for c, f in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(videos[r][f])
            ax.set_axis_off()
        marks = " ".join(f"{a[:3]}{'✓' if ok else '✗'}" for a, ok in info["correct"].items())
        axes[r][0].set_title(f"{info['prompt'][:70]}   [{marks}]", fontsize=7, loc="left")
    fig.subplots_adjust(wspace=0.02, hspace=0.45)
    return _png(fig)


def write_report(out_dir: Path, report: dict, videos: Sequence[np.ndarray] = (), baseline: dict | None = None,
                 gate: list[str] | None = None) -> Path:
    """report.json and report.html in `out_dir`; returns the HTML path."""
    from .suite import compare

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    rows = compare(report, baseline or {"metrics": {}})
    ci = report.get("fvd_shapes_ci95")
    plots = [("Prompt adherence per attribute", _adherence_plot(report)), *_sweep_plots(report)]
    html = TEMPLATE.render(r=report, rows=rows, baseline=baseline, gate=gate, plots=plots,
                           strip=_strip(videos, report), ci=f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "n/a")
    write_atomic(out_dir / "report.html", html)
    return out_dir / "report.html"
