"""`vidiffuse eval`: one model, a fixed golden set of prompts and seeds, every yardstick, one report.

golden prompts → pipeline → videos → {shapes-encoder FVD against real clips, analyzer adherence,
temporal metrics, OOD scores} + a latency/memory sweep over samplers and step counts → report.json.

Quality numbers depend only on the model, the golden set and the settings, so two runs give the same
report (timings aside); `gate` compares a report with a baseline, metric by metric, in each metric's
own direction.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from ..data import shapes
from ..errors import ConfigError
from .fvd import fvd_from_features
from .temporal import temporal_metrics

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_SET = "shapes_v1"
REAL_CLIP_SEED = 500_000  # the real clips FVD compares against; far from any training seed
REPORT_VERSION = 1

# metric → direction: +1 higher is better, -1 lower is better. Only these are gated.
DIRECTIONS = {
    "fvd_shapes": -1,
    **{f"adherence_{a}": +1 for a in shapes.ATTRIBUTES},
    "adherence_mean": +1,
    "object_stability": +1,
    "clip_score": +1,
    "temporal_flicker": +1,
    "motion_smoothness": +1,
    "subject_consistency": +1,
    "background_consistency": +1,
    "seconds_per_video": -1,
    "peak_memory_mb": -1,
}
# relative tolerances: quality is deterministic, so a small margin only absorbs float noise across
# machines; timings on a shared CPU wander by tens of percent
DEFAULT_TOLERANCE = 0.05
DEFAULT_TOLERANCES = {"seconds_per_video": 0.5, "peak_memory_mb": 0.5}
SWEEP = {"euler": (4, 10, 20), "unipc": (2, 4, 10), "dpm++": (4, 10, 20)}


@dataclass(frozen=True)
class GoldenPrompt:
    id: int
    prompt: str
    seed: int
    phrasing: str
    attributes: dict


def load_golden(name: str = GOLDEN_SET, n: int | None = None) -> list[GoldenPrompt]:
    path = GOLDEN_DIR / f"{name}.jsonl"
    if not path.is_file():
        known = ", ".join(p.stem for p in GOLDEN_DIR.glob("*.jsonl"))
        raise ConfigError(f"no golden set {name!r}; known: {known}")
    items = [GoldenPrompt(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if n is not None:
        if not 2 <= n <= len(items):
            raise ConfigError(f"n must be between 2 and {len(items)} (the golden set's size), got {n}")
        # an evenly spaced subset keeps every phrasing group represented
        items = [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]
    return items


def real_clips(items: Sequence[GoldenPrompt], seed: int = REAL_CLIP_SEED) -> list[np.ndarray]:
    """A real shapes-world clip for each golden prompt, with the attributes it asks for and a random
    position and speed: what a perfect model could have made. Matching the prompts' attribute mix keeps
    FVD on a few dozen clips about quality, not about which colours happened to be drawn."""
    return [shapes.render_clip(shapes.sample_clip_spec(np.random.default_rng([seed, i.id]), attributes=i.attributes))
            for i in items]


class PeakMemory:
    """Peak resident memory of this process while the block runs, sampled every few ms, in MiB above
    the level at entry (CPU allocations are invisible to torch's own counters)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb = interval, 0.0
        self._proc, self._stop = psutil.Process(), threading.Event()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._base = self._peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = (self._peak - self._base) / 2**20
        if torch.cuda.is_available():
            self.peak_mb += torch.cuda.max_memory_allocated() / 2**20


def _timed_generate(pipe, prompts: Sequence[str], seeds: Sequence[int], batch_size: int, **settings):
    with PeakMemory() as memory:
        start = time.perf_counter()
        out = pipe(list(prompts), seed=list(seeds), batch_size=batch_size, progress=False, **settings)
        seconds = time.perf_counter() - start
    return out, {"seconds_per_video": seconds / len(prompts), "peak_memory_mb": memory.peak_mb}


def adherence(videos: Sequence[np.ndarray], asked: Sequence[dict]) -> tuple[dict, list[dict]]:
    readings = [shapes.analyze_video(v) for v in videos]
    hits = {a: [r[a] == want[a] for r, want in zip(readings, asked)] for a in shapes.ATTRIBUTES}
    scores = {f"adherence_{a}": float(np.mean(h)) for a, h in hits.items()}
    scores["adherence_mean"] = float(np.mean(list(scores.values())))
    scores["object_stability"] = float(np.mean([np.mean(list(r["stability"].values())) for r in readings]))
    per_video = [{a: bool(hits[a][i]) for a in shapes.ATTRIBUTES} for i in range(len(videos))]
    return scores, per_video


def _mean_temporal(videos: Sequence[np.ndarray]) -> dict:
    rows = [temporal_metrics(v) for v in videos]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _ood_breakdown(items: Sequence[GoldenPrompt], per_video: list[dict], ood: list[dict] | None) -> dict:
    """Adherence per phrasing group and per OOD-score tercile: how quality falls as prompts drift."""
    mean_hit = [float(np.mean(list(v.values()))) for v in per_video]
    groups = {}
    for phrasing in dict.fromkeys(i.phrasing for i in items):
        idx = [k for k, i in enumerate(items) if i.phrasing == phrasing]
        groups[phrasing] = {"n": len(idx), "adherence_mean": float(np.mean([mean_hit[k] for k in idx]))}
    out = {"by_phrasing": groups}
    if ood is not None:
        scores = np.array([o["score"] for o in ood])
        edges = np.quantile(scores, [0, 1 / 3, 2 / 3, 1])
        bins = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, 2)
        out["threshold"] = float(ood[0]["threshold"])
        out["flagged"] = int(sum(o["ood"] for o in ood))
        out["by_ood_tercile"] = [
            {"score_range": [float(edges[b]), float(edges[b + 1])], "n": int((bins == b).sum()),
             "adherence_mean": float(np.mean([mean_hit[k] for k in np.flatnonzero(bins == b)]))}
            for b in range(3) if (bins == b).any()]
    return out


def evaluate_model(pipe, n: int = 256, steps: int | None = None, guidance: float | None = None,
                   sampler: str | None = None, batch_size: int = 16, sweep: dict | None = None,
                   sweep_n: int = 16, golden: str = GOLDEN_SET, clip_path: str | os.PathLike | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[dict, list[np.ndarray]]:
    """Evaluate `pipe` on `n` golden prompts; returns the report and the generated videos.

    `clip_path`, a local CLIP model folder, adds `clip_score` (prompt–frame similarity), the adherence
    measure for models whose videos the shapes-world analyzer cannot read.
    """
    from .shapes_encoder import load_shapes_video_encoder, shapes_video_features

    say = progress or (lambda message: None)
    items = load_golden(golden, n)
    clip = None
    if clip_path is not None:  # a bad path fails now, not after minutes of generation
        from .clip_score import CLIPScorer

        clip = CLIPScorer(clip_path)
    settings = {"steps": steps, "guidance": guidance, "sampler": sampler}
    resolved = {k: pipe.defaults[k] if v is None else v for k, v in settings.items()}
    say(f"generating {len(items)} videos ({resolved['sampler']}, {resolved['steps']} steps, "
        f"guidance {resolved['guidance']})")
    out, performance = _timed_generate(pipe, [i.prompt for i in items], [i.seed for i in items], batch_size, **settings)
    videos = out.frames
    say("scoring adherence, temporal metrics and FVD")
    scores, per_video = adherence(videos, [i.attributes for i in items])
    encoder = load_shapes_video_encoder()
    real = shapes_video_features(real_clips(items), encoder)
    fvd = fvd_from_features(real, shapes_video_features(videos, encoder), bootstrap=100)
    ood = pipe.prompt_ood([i.prompt for i in items])
    metrics = {"fvd_shapes": fvd["fvd"], **scores, **_mean_temporal(videos), **performance}
    if clip is not None:
        metrics["clip_score"] = float(np.mean(clip(videos, [i.prompt for i in items])))
    report = {
        "version": REPORT_VERSION,
        "model": pipe.name,
        "golden_set": golden,
        "n": len(items),
        "settings": {**resolved, "batch_size": batch_size},
        "metrics": metrics,
        "fvd_shapes_ci95": fvd["ci95"],
        "ood": _ood_breakdown(items, per_video, ood),
        "sweep": [],
        "videos": [{"id": i.id, "prompt": i.prompt, "seed": i.seed, "phrasing": i.phrasing, "asked": i.attributes,
                    "correct": pv, **({"ood_score": o["score"]} if ood else {})}
                   for i, pv, o in zip(items, per_video, ood or [None] * len(items))],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    picks = list(range(0, len(items), max(1, len(items) // sweep_n)))[:sweep_n] if sweep else []
    sub = [items[k] for k in picks]
    # FVD on a handful of clips is biased upwards, but alike across the sweep's points
    sub_real = real[picks]
    for name, step_counts in (sweep or {}).items():
        for k in step_counts:
            say(f"sweep: {name}, {k} steps, {len(sub)} videos")
            o, perf = _timed_generate(pipe, [i.prompt for i in sub], [i.seed for i in sub], batch_size,
                                      steps=k, guidance=guidance, sampler=name)
            s, _ = adherence(o.frames, [i.attributes for i in sub])
            fvd_k = fvd_from_features(sub_real, shapes_video_features(o.frames, encoder), bootstrap=0)["fvd"]
            report["sweep"].append({"sampler": name, "steps": k, "n": len(sub), "adherence_mean": s["adherence_mean"],
                                    "fvd_shapes": fvd_k, **perf})
    return report, videos


def _check_report(report: dict, what: str) -> dict:
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        raise ConfigError(f"{what} is not a vidiffuse eval report (no 'metrics')")
    return report


def read_report(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return _check_report(json.loads(path.read_text()), str(path))
    except FileNotFoundError:
        raise ConfigError(f"report not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def parse_tolerances(specs: Sequence[str]) -> dict[str, float]:
    """'0.1' sets the default; 'fvd_shapes=0.2' one metric's relative tolerance."""
    tolerances = {}
    for spec in specs:
        name, _, value = spec.rpartition("=")
        name = name.strip() or "*"
        if name != "*" and name not in DIRECTIONS:
            raise ConfigError(f"unknown metric {name!r} in --tolerance; gated metrics: {', '.join(DIRECTIONS)}")
        try:
            tol = float(value)
        except ValueError:
            raise ConfigError(f"--tolerance {spec!r}: {value!r} is not a number") from None
        if not 0 <= tol < 10:
            raise ConfigError(f"--tolerance {spec!r}: must be a fraction between 0 and 10")
        tolerances[name] = tol
    return tolerances


def compare(new: dict, old: dict) -> list[dict]:
    """Metric by metric: both values, the change, and whether it is better or worse."""
    rows = []
    for name in sorted(set(new["metrics"]) | set(old["metrics"]), key=lambda k: (k not in DIRECTIONS, k)):
        a, b = old["metrics"].get(name), new["metrics"].get(name)
        row = {"metric": name, "old": a, "new": b, "change": None, "relative": None, "verdict": "n/a"}
        if a is not None and b is not None:
            row["change"] = b - a
            row["relative"] = (b - a) / abs(a) if a else (0.0 if b == a else float("inf"))
            direction = DIRECTIONS.get(name, 0)
            row["verdict"] = ("same" if b == a else "changed" if direction == 0
                              else "better" if (b - a) * direction > 0 else "worse")
        rows.append(row)
    return rows


def gate(new: dict, baseline: dict, tolerances: dict[str, float] | None = None) -> list[str]:
    """Each gated metric that got worse than the baseline by more than its relative tolerance."""
    tolerances = tolerances or {}
    default = tolerances.get("*", DEFAULT_TOLERANCE)
    failures = []
    for name, direction in DIRECTIONS.items():
        old, value = baseline["metrics"].get(name), new["metrics"].get(name)
        if old is None or value is None:
            continue
        tol = tolerances.get(name, DEFAULT_TOLERANCES.get(name, default))
        worse_by = (old - value) * direction
        if worse_by > tol * abs(old) + 1e-12:
            failures.append(f"{name}: {value:.4g} vs baseline {old:.4g} "
                            f"({'-' if direction > 0 else '+'}{worse_by / abs(old) if old else float('inf'):.1%}, "
                            f"tolerance {tol:.0%})")
    return failures


def settings_mismatch(new: dict, baseline: dict) -> list[str]:
    """Reports are only comparable on the same golden prompts and sampling settings."""
    keys = ("golden_set", "n")
    out = [f"{k}: {baseline.get(k)} → {new.get(k)}" for k in keys if new.get(k) != baseline.get(k)]
    for k in ("steps", "guidance", "sampler"):
        if new["settings"].get(k) != baseline.get("settings", {}).get(k):
            out.append(f"{k}: {baseline.get('settings', {}).get(k)} → {new['settings'].get(k)}")
    return out
