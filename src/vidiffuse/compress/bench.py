"""`vidiffuse bench`: every speed-up variant on the same golden prompts and seeds, in one process, side by
side with the plain diffusers loop (`reference.py`) that is the yardstick.

A variant is a name from `MODIFIERS` (fp32, bf16, int8, compile, cache, pruned, distilled), optionally with an argument after
a colon (`cache:0.05`, `int8:weight-only`, `pruned:DIR`), or several joined with `+` (`int8+cache`, applied in that order).
Each vidiffuse variant gets its own copy of the model, transformed once (quantize, compile) and/or wrapped
around every generation (step caching, precision), or swapped for a pruned one; the text encoder is shared, since no variant changes it.
Every variant computes in fp32 unless it names bf16, so a variant means the same on every CPU. A variant
whose module is missing, or that cannot run on this machine (bf16 without native bf16), is reported as
unavailable with the reason; one that raises is reported as failed, and the others still run.

Measurement, per variant:
- speed: every batch is one timed `pipe(...)` call, prompt to uint8 frames; untimed warm-up first, one
  batch of each batch size (it absorbs compilation and first-call allocation); then `repeats` passes over
  all prompts, interleaved batch by batch (batch 1 of every variant, then batch 2, ...) so that drift in a
  shared machine's speed hits all variants alike: timed pass after pass, the same code measured int8 at
  1.64x and 1.35x fp32 on two runs of one day. Reported: the median seconds per video over the timed
  batches, and the speed-up against the reference loop and against the fp32 variant.
- peak memory: `PeakMemory` around each batch's generation (resident memory above the level at its start;
  the weights, loaded before, and the videos already made are not in it), the largest batch.
- weights: the bytes of `torch.save` of the denoiser's and the autoencoder's state dicts, in memory,
  which counts quantized and packed weights at their real size (the text encoder is shared, left out).
- quality: analyzer adherence per attribute and shapes-encoder FVD against real clips of the same
  attributes, on the first pass's videos (`evaluate.suite` and `evaluate.fvd`), and the mean absolute
  difference from the reference loop's frames in uint8 levels. Each variant's change against fp32, per
  attribute and on the mean, comes with a paired 95% interval (`paired_change`): the targets ask for
  2-3 points, less than the interval's half-width on the hardest attribute at 256 prompts (shape: ~4).

Videos are made without the invisible watermark: the reference loop has none, so only the sampling is
compared (embedding it costs ~6 ms a video, under 1% of a video's time).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import gc
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import shapes
from ..errors import ConfigError
from ..evaluate.fvd import fvd_from_features
from ..evaluate.suite import GOLDEN_SET, PeakMemory, adherence, load_golden, real_clips
from ..files import write_atomic
from ..precision import native_bf16
from .reference import ReferenceLoop

logger = logging.getLogger(__name__)

BENCH_VERSION = 1
REFERENCE = "diffusers"
BASELINE = "fp32"  # what the issue's targets compare against
DEFAULT_VARIANTS = ("fp32", "bf16", "int8", "cache", "compile", "int8+cache", "int8+compile", "pruned", "distilled",
                    "distilled+int8")
DEFAULT_CACHE_THRESHOLD = 0.3  # the sweep in the step-cache note: 12 of 20 UniPC steps cached, adherence within 2 points
FVD_BOOTSTRAP = 100
WEIGHTS_MEASURE = "torch.save size of the denoiser + autoencoder state dicts, in memory (text encoder shared, excluded)"
# (variant, minimum speed-up vs fp32, largest adherence drop vs fp32 in points): issue #4's targets
TARGETS = (("int8", 1.5, 2.0), ("cache", 1.5, 2.0))
# (variant, minimum share of fewer denoiser parameters, largest adherence drop vs fp32 in points)
SIZE_TARGETS = (("pruned", 0.25, 3.0),)
# (variant, minimum speed-up vs fp32, largest drop on any one attribute in points, largest FVD ratio vs fp32)
DISTILL_TARGETS = (("distilled", 10.0, 3.0, 1.25),)
BEST_SECONDS = 0.25  # the fastest variant makes a video in at most this
VERDICTS = {True: "pass", False: "FAIL", None: "not run"}


# ---------------------------------------------------------------- variants


@dataclass
class Prepared:
    """What a modifier did to a pipeline: a context entered around every generation (its yielded
    value is collected per batch), and how to summarise those values for the report."""

    around: Callable[[], contextlib.AbstractContextManager] | None = None
    summarize: Callable[[list], dict] | None = None
    details: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # sampling settings this variant runs at instead of the run's


@dataclass(frozen=True)
class Modifier:
    name: str
    summary: str
    apply: Callable[[object, str | None], Prepared]  # (pipeline, argument) -> Prepared; may change the pipeline
    missing: Callable[[], str | None] = lambda: None  # why it cannot run here, or None
    check_arg: Callable[[str | None], None] | None = None  # None: takes no argument


def _module_missing(module: str, *names: str) -> str | None:
    """None when `vidiffuse.compress.<module>` exists and has `names`; else the reason."""
    full = f"{__package__}.{module}"
    if importlib.util.find_spec(full) is None:
        return f"{full} is not in this installation"
    mod = importlib.import_module(full)  # a module that exists but fails to import is a bug: let it raise
    absent = [n for n in names if not hasattr(mod, n)]
    return f"{full} has no {', '.join(absent)}" if absent else None


@contextlib.contextmanager
def _precision(value: str) -> Iterator[None]:
    """The pipeline picks its float type from VIDIFFUSE_PRECISION at each call (see `precision.py`)."""
    old = os.environ.get("VIDIFFUSE_PRECISION")
    os.environ["VIDIFFUSE_PRECISION"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VIDIFFUSE_PRECISION", None)
        else:
            os.environ["VIDIFFUSE_PRECISION"] = old


def _apply_fp32(pipe, arg):
    return Prepared(around=lambda: _precision("fp32"))


def _apply_bf16(pipe, arg):
    from . import quantize

    with _precision("bf16"):  # quantize keeps bf16 weights only where the precision in force is bf16
        quantize.quantize(pipe, "bf16")
    return Prepared(around=lambda: _precision("bf16"), details={"weights": "bf16"})


def _bf16_missing() -> str | None:
    if not native_bf16():
        return "no native bf16 on this CPU: emulated bf16 runs about 100x slower than fp32, not worth timing"
    return _module_missing("quantize", "quantize")


INT8_MODES = {"dynamic": "int8-dynamic", "weight-only": "int8-weight-only"}


def _check_int8_arg(arg: str | None) -> None:
    if arg is not None and arg not in INT8_MODES:
        raise ConfigError(f"int8 takes {' or '.join(INT8_MODES)} (e.g. int8:weight-only), got {arg!r}")


def _apply_int8(pipe, arg):
    from . import quantize

    mode = INT8_MODES[arg or "dynamic"]
    quantize.quantize(pipe, mode)
    return Prepared(details={"mode": mode})


def _apply_compile(pipe, arg):
    from . import compile as compiling

    compiling.compile_transformer(pipe)
    return Prepared(details={"compile": "static shapes"})


def _check_cache_arg(arg: str | None) -> None:
    if arg is None:
        return
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError(f"cache threshold must be a number, got {arg!r} (e.g. cache:0.1)") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"cache threshold must be a finite number >= 0, got {arg!r}")


def _summarize_cache(stats: list) -> dict:
    full = sum(s.full_steps for s in stats)
    cached = sum(s.cached_steps for s in stats)
    depth = stats[0].depth if stats else 0
    calls = full + cached
    return {"full_steps": full, "cached_steps": cached,
            "skipped_block_share": cached * (depth - 1) / (calls * depth) if calls and depth else 0.0}


def _apply_cache(pipe, arg):
    from . import cache

    threshold = DEFAULT_CACHE_THRESHOLD if arg is None else float(arg)
    return Prepared(around=lambda: cache.step_cache(pipe.transformer, threshold), summarize=_summarize_cache,
                    details={"threshold": threshold})


def _apply_pruned(pipe, arg):
    from . import prune

    pipe.transformer, details = prune.pruned_transformer_for(pipe, arg)  # checks it was pruned from this model
    return Prepared(details=details)


def _apply_distilled(pipe, arg):
    from . import distill

    pipe.transformer, pipe.decoder, settings, details = distill.distilled_parts_for(pipe, arg)
    return Prepared(details=details, settings=settings)


MODIFIERS: dict[str, Modifier] = {m.name: m for m in (
    Modifier("fp32", "vidiffuse's pipeline in fp32 (batched CFG, channels-last decoding)", _apply_fp32),
    Modifier("bf16", "bf16 weights, bf16 autocast", _apply_bf16, _bf16_missing),
    Modifier("int8", "int8 weights and activations in the denoiser's linear layers and the decoder's wide "
             "convolutions (int8:weight-only: the denoiser's weights only)",
             _apply_int8, lambda: _module_missing("quantize", "quantize"), _check_int8_arg),
    Modifier("compile", "torch.compile on the denoiser", _apply_compile,
             lambda: _module_missing("compile", "compile_transformer")),
    Modifier("cache", f"first-block step caching, threshold {DEFAULT_CACHE_THRESHOLD} (cache:T sets it)", _apply_cache,
             lambda: _module_missing("cache", "step_cache"), _check_cache_arg),
    Modifier("pruned", "the structurally pruned denoiser of shapes-pruned (pruned:DIR: another pruned model of this one)",
             _apply_pruned, lambda: _module_missing("prune", "pruned_transformer_for"), lambda arg: None),
    Modifier("distilled", "the few-step student and tiny decoder of shapes-distilled, at its own steps and guidance "
             "(distilled:DIR: another student of this model)",
             _apply_distilled, lambda: _module_missing("distill", "distilled_parts_for"), lambda arg: None),
)}
PRECISIONS = ("fp32", "bf16")
VARIANT_HELP = {REFERENCE: "the same weights through a plain diffusers sampling loop (the yardstick)",
                **{name: m.summary for name, m in MODIFIERS.items()}}


@dataclass(frozen=True)
class VariantPlan:
    name: str
    parts: tuple[tuple[Modifier, str | None], ...]  # empty for the reference

    @property
    def missing(self) -> str | None:
        for modifier, _ in self.parts:
            reason = modifier.missing()
            if reason:
                return f"{modifier.name}: {reason}"
        return None


def parse_variants(spec: str | Sequence[str] | None) -> list[VariantPlan]:
    """'fp32,int8,cache:0.05,int8+cache' → plans; the reference loop always comes first.

    Unknown names and bad arguments raise ConfigError before anything is loaded.
    """
    names = list(DEFAULT_VARIANTS) if spec is None else (
        [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec])
    names = [n for n in names if n]
    if not names:
        raise ConfigError("no variants given")
    plans, seen = [VariantPlan(REFERENCE, ())], {REFERENCE}
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        parts = []
        for token in name.split("+"):
            base, _, arg = token.partition(":")
            modifier = MODIFIERS.get(base.strip())
            if modifier is None:
                known = ", ".join([REFERENCE, *MODIFIERS])
                raise ConfigError(f"unknown variant {token.strip()!r} in {name!r}; known: {known} "
                                  f"(join with '+', e.g. int8+cache)")
            arg = arg.strip() or None
            if arg is not None and modifier.check_arg is None:
                raise ConfigError(f"variant {modifier.name!r} takes no argument, got {token!r}")
            if modifier.check_arg is not None:
                modifier.check_arg(arg)
            parts.append((modifier, arg))
        if len({m.name for m, _ in parts}) != len(parts):
            raise ConfigError(f"variant {name!r} names the same modifier twice")
        precisions = [m.name for m, _ in parts if m.name in PRECISIONS]
        if len(precisions) > 1:
            raise ConfigError(f"variant {name!r} asks for two precisions: {' and '.join(precisions)}")
        if not precisions:  # fp32 unless told otherwise: 'auto' would make a variant's meaning depend on the CPU
            parts.insert(0, (MODIFIERS[BASELINE], None))
        plans.append(VariantPlan(name, tuple(parts)))
    return plans


# ---------------------------------------------------------------- runners


class _Runner:
    """Generates one batch of uint8 videos with fixed settings; knows its weights' size."""

    prepared: list[Prepared]

    def generate(self, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        raise NotImplementedError

    def weights_bytes(self) -> int:
        raise NotImplementedError


def _serialized_bytes(*modules: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    for module in modules:
        torch.save(module.state_dict(), buffer)
    return buffer.tell()


def _files_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for folder in folders for p in Path(folder).rglob("*") if p.is_file())


class _ReferenceRunner(_Runner):
    def __init__(self, loop: ReferenceLoop, settings: dict, pipe):
        self.loop, self.settings, self.prepared = loop, settings, []
        self.pipe = pipe  # the model's own pipeline: the loop gets the prompts its denoiser gets (its reader's rewrite)

    def generate(self, prompts, seeds):
        prompts = self.pipe.denoiser_prompts(prompts) or prompts
        return self.loop(prompts, seeds, batch_size=len(prompts), **self.settings).frames

    def weights_bytes(self):
        return _serialized_bytes(self.loop.transformer, self.loop.vae)


class _PipelineRunner(_Runner):
    def __init__(self, pipe, prepared: list[Prepared], settings: dict):
        self.pipe, self.prepared = pipe, prepared
        self.settings = {**settings, **{k: v for p in prepared for k, v in p.settings.items()}}
        self.yielded: list[list] = [[] for _ in prepared]
        self.collect = False

    def generate(self, prompts, seeds):
        with contextlib.ExitStack() as stack:
            values = [stack.enter_context(p.around()) if p.around else None for p in self.prepared]
            frames = self.pipe(prompts, seed=seeds, batch_size=len(prompts), progress=False, watermark=False,
                               **self.settings).frames
        if self.collect:
            for store, value in zip(self.yielded, values):
                store.append(value)
        return frames

    def weights_bytes(self):
        return _serialized_bytes(*(m for m in (self.pipe.transformer, self.pipe.vae, self.pipe.decoder) if m is not None))

    def details(self) -> dict:
        out = {}
        for (p, values) in zip(self.prepared, self.yielded):
            out.update(p.details)
            if p.summarize is not None:
                out.update(p.summarize(values))
        return out


def _copy_pipeline(base):
    """A pipeline with its own denoiser and autoencoder, sharing the text encoder and the prompt reader."""
    pipe = type(base)(copy.deepcopy(base.transformer), copy.deepcopy(base.vae), base.text_encoder, frames=base.frames,
                      size=base.size, fps=base.fps, defaults=base.defaults, name=base.name)
    pipe.path, pipe.index, pipe.decoder = base.path, base.index, copy.deepcopy(base.decoder)
    pipe.prompt_reader = base.prompt_reader
    return pipe


def _release_memory() -> None:
    """Hand freed heap back to the OS so the next peak-memory reading starts from what is in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _quiet_watermark_warning() -> Iterator[None]:
    """The bench turns the watermark off on purpose; one warning per batch would bury the progress."""
    pipeline_logger = logging.getLogger("vidiffuse.pipeline")
    level = pipeline_logger.level
    pipeline_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pipeline_logger.setLevel(level)


# ---------------------------------------------------------------- the bench


@dataclass
class _Result:
    plan: VariantPlan
    runner: _Runner | None = None
    status: str = "ok"
    reason: str | None = None
    prepare_s: float = 0.0
    warmup_s: float = 0.0
    batch_seconds_per_video: list[float] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    frames: list[np.ndarray] | None = None
    reproducible: bool = True

    def fail(self, stage: str, error: Exception) -> None:
        logger.debug("variant %s failed while %s", self.plan.name, stage, exc_info=True)
        self.status, self.runner = "failed", None
        first_line = (str(error).strip().splitlines() or [""])[0]
        self.reason = f"{stage}: {type(error).__name__}: {first_line}"


def _progress_bar(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def run_bench(model: str | os.PathLike | None = "shapes", variants: str | Sequence[str] | None = None, n_prompts: int = 32,
              steps: int | None = None, guidance: float | None = None, sampler: str | None = None, batch_size: int = 8,
              out_dir: str | os.PathLike = "bench", repeats: int = 2, golden: str = GOLDEN_SET,
              progress: bool = True, seed_offset: int = 0) -> dict:
    """Run the reference loop and every variant on `n_prompts` golden prompts; write bench.json, bench.md
    and bench.png to `out_dir` and return the report. Sampling settings left None are the model's defaults.
    `seed_offset` moves every prompt's seed: the same prompts on other noise, to see whether a quality gap
    between variants holds beyond the golden seeds."""
    from ..pipeline import VideoPipeline

    plans = parse_variants(variants)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    items = [dataclasses.replace(i, seed=i.seed + seed_offset) for i in load_golden(golden, n_prompts)]
    prompts, seeds = [i.prompt for i in items], [i.seed for i in items]
    base = VideoPipeline.from_pretrained(model)
    settings = {"steps": int(base.defaults["steps"] if steps is None else steps),
                "guidance": float(base.defaults["guidance"] if guidance is None else guidance),
                "sampler": str(base.defaults["sampler"] if sampler is None else sampler)}
    base._validate(prompts, settings["steps"], settings["guidance"], base.frames, settings["sampler"])
    batches = [(prompts[i : i + batch_size], seeds[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]

    results = [_Result(plan) for plan in plans]
    for result in results:
        result.reason = result.plan.missing
        if result.reason:
            result.status = "unavailable"
            continue
        start = time.perf_counter()
        if result.plan.name == REFERENCE:  # the yardstick: without it there is nothing to compare, so no try
            result.runner = _ReferenceRunner(ReferenceLoop.from_pretrained(base.path, text_encoder=base.text_encoder),
                                             settings, base)
        else:
            try:
                pipe = _copy_pipeline(base)
                result.runner = _PipelineRunner(pipe, [m.apply(pipe, arg) for m, arg in result.plan.parts], settings)
            except Exception as e:  # noqa: BLE001 — one broken variant must not cost the others' results
                result.fail("preparing", e)
        result.prepare_s = time.perf_counter() - start
    model_label = {"name": base.name, "version": base.version, "path": str(base.path),
                   "disk_mb": _files_bytes(base.path / "transformer", base.path / "vae") / 2**20}
    del base

    running = [r for r in results if r.runner is not None]
    # one warm-up batch of each batch size: a compiled denoiser compiles again for a new shape
    warmups = [batches[0]] + [batches[-1]] * (len(batches[-1][0]) != len(batches[0][0]))
    total = len(running) * (len(warmups) + repeats * len(batches))
    with _quiet_watermark_warning(), _progress_bar(progress) as bar:
        task = bar.add_task("bench", total=total) if bar is not None else None

        def tick(description: str) -> None:
            if bar is not None:
                bar.update(task, advance=1, description=description)

        for result in running:
            _warm_up(result, warmups, tick)
        for rep in range(repeats):
            frames = {id(r): [] for r in running}
            for result in running:
                if isinstance(result.runner, _PipelineRunner):
                    result.runner.collect = rep == 0  # per-generation details (cache hits) from one pass, like the quality
            # batch by batch, every variant in turn: a shared VM's speed drifts over minutes, and this way a
            # drift lands on every variant alike, not on whichever variant's pass it falls in
            for prompts, seeds in batches:
                for result in running:
                    if result.runner is not None:
                        _timed_batch(result, prompts, seeds, frames[id(result)], rep, tick)
            for result in running:
                if result.runner is not None:
                    _end_pass(result, frames[id(result)])

    report = _report(results, items, settings, batch_size, repeats, golden, model_label)
    report["settings"]["seed_offset"] = seed_offset
    write_outputs(report, out_dir)
    return report


def _warm_up(result: _Result, batches, tick) -> None:
    start = time.perf_counter()
    for prompts, seeds in batches:
        try:
            result.runner.generate(prompts, seeds)
        except Exception as e:  # noqa: BLE001
            if result.plan.name == REFERENCE:
                raise
            result.fail("warming up", e)
            return
        tick(f"warm-up {result.plan.name}")
    result.warmup_s = time.perf_counter() - start


def _timed_batch(result: _Result, prompts, seeds, frames: list, rep: int, tick) -> None:
    _release_memory()
    try:
        with PeakMemory() as memory:
            start = time.perf_counter()
            frames += result.runner.generate(prompts, seeds)
            seconds = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001
        if result.plan.name == REFERENCE:
            raise
        result.fail(f"generating (pass {rep + 1})", e)
        return
    result.batch_seconds_per_video.append(seconds / len(prompts))
    result.peak_memory_mb = max(result.peak_memory_mb, memory.peak_mb)
    tick(f"{result.plan.name} (pass {rep + 1})")


def _end_pass(result: _Result, frames: list[np.ndarray]) -> None:
    if result.frames is None:
        result.frames = frames
    else:
        result.reproducible &= all(np.array_equal(a, b) for a, b in zip(result.frames, frames))


def _quality(frames: list[np.ndarray], items, real_features: np.ndarray, encoder) -> tuple[dict, np.ndarray]:
    """The variant's metrics, and its hits per video and attribute (n, attributes) for the paired comparisons."""
    from ..evaluate.shapes_encoder import shapes_video_features

    scores, per_video = adherence(frames, [i.attributes for i in items])
    fvd = fvd_from_features(real_features, shapes_video_features(frames, encoder), bootstrap=FVD_BOOTSTRAP)
    hits = np.array([[v[a] for a in shapes.ATTRIBUTES] for v in per_video], dtype=float)
    return {"fvd_shapes": fvd["fvd"], "fvd_shapes_ci95": fvd["ci95"], **scores}, hits


def paired_change(hits: np.ndarray, base_hits: np.ndarray) -> dict:
    """Change in adherence points against the baseline on the same prompts and seeds, with its 95% interval
    (normal approximation on the per-video differences). Both make a video per prompt, so the difference is
    paired: the interval is narrower than two independent proportions' but still wide at a few hundred
    prompts (one video changing its reading moves a 256-prompt score by 0.4 points)."""
    diff = 100 * (np.asarray(hits, dtype=float) - np.asarray(base_hits, dtype=float))
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
    return {"change": float(diff.mean()), "ci95": [float(diff.mean() - half), float(diff.mean() + half)]}


def _pixel_mae(frames: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() for a, b in zip(frames, reference)]))


def _report(results: list[_Result], items, settings: dict, batch_size: int, repeats: int, golden: str, model) -> dict:
    from ..evaluate.shapes_encoder import load_shapes_video_encoder, shapes_video_features

    encoder = load_shapes_video_encoder()
    real_features = shapes_video_features(real_clips(items), encoder)
    reference = next(r for r in results if r.plan.name == REFERENCE)
    rows, hits = [], {}
    for r in results:
        row = {"name": r.plan.name, "status": r.status, "reason": r.reason,
               "summary": " + ".join(m.summary for m, _ in r.plan.parts) or VARIANT_HELP[REFERENCE]}
        if r.status == "ok":
            timings = r.batch_seconds_per_video
            metrics, hits[r.plan.name] = _quality(r.frames, items, real_features, encoder)
            row.update({
                "seconds_per_video": statistics.median(timings),
                "seconds_per_video_per_batch": timings,
                "timed_batches": len(timings),
                "prepare_s": r.prepare_s,
                "warmup_s": r.warmup_s,
                "peak_memory_mb": r.peak_memory_mb,
                "weights_mb": r.runner.weights_bytes() / 2**20,
                "metrics": metrics,
                "pixel_mae_vs_diffusers": _pixel_mae(r.frames, reference.frames),
                "reproducible": r.reproducible,
                "details": r.runner.details() if isinstance(r.runner, _PipelineRunner) else {},
            })
        rows.append(row)
    _add_comparisons(rows, hits)
    return {
        "version": BENCH_VERSION,
        "model": model,
        "golden_set": golden,
        "n": len(items),
        "settings": {**settings, "batch_size": batch_size, "repeats": repeats, "watermark": False},
        "weights_measure": WEIGHTS_MEASURE,
        "variants": rows,
        "targets": _targets(rows),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "native_bf16": native_bf16()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _add_comparisons(rows: list[dict], hits: dict[str, np.ndarray]) -> None:
    by_name = {r["name"]: r for r in rows if r["status"] == "ok"}
    ref, base = by_name.get(REFERENCE), by_name.get(BASELINE)
    for row in by_name.values():
        row["speedup_vs_diffusers"] = ref["seconds_per_video"] / row["seconds_per_video"]
        row["speedup_vs_fp32"] = base["seconds_per_video"] / row["seconds_per_video"] if base else None
        row["adherence_change_vs_fp32_pts"] = (
            100 * (row["metrics"]["adherence_mean"] - base["metrics"]["adherence_mean"]) if base else None)
        if base:
            mine, theirs = hits[row["name"]], hits[BASELINE]
            row["adherence_change_vs_fp32_ci95"] = paired_change(mine.mean(axis=1), theirs.mean(axis=1))["ci95"]
            row["attribute_change_vs_fp32_pts"] = {a: paired_change(mine[:, k], theirs[:, k])
                                                   for k, a in enumerate(shapes.ATTRIBUTES)}


def _change(change: dict) -> str:
    lo, hi = change["ci95"]
    return f"{change['change']:+.1f} pts (95% CI {lo:+.1f} to {hi:+.1f})"


def _measured(row: dict, speed: bool = False) -> str:
    """What a target was judged on, with the paired interval of the adherence change."""
    change = _change({"change": row["adherence_change_vs_fp32_pts"], "ci95": row["adherence_change_vs_fp32_ci95"]})
    return (f"{row['speedup_vs_fp32']:.2f}x; " if speed else "") + f"adherence {change}"


def _targets(rows: list[dict]) -> list[dict]:
    """Issue #4's acceptance targets, checked on this run's numbers (None where a variant did not run)."""
    by_name = {r["name"]: r for r in rows}
    out = []
    for name, min_speedup, max_drop in TARGETS:
        row = by_name.get(name)
        ok = row is not None and row["status"] == "ok" and row["speedup_vs_fp32"] is not None
        out.append({"target": f"{name}: >= {min_speedup}x faster than fp32, adherence at most {max_drop} points lower",
                    "variant": name,
                    "passed": (row["speedup_vs_fp32"] >= min_speedup and row["adherence_change_vs_fp32_pts"] >= -max_drop)
                    if ok else None, "measured": _measured(row, speed=True) if ok else None})
    for name, min_fewer, max_drop in SIZE_TARGETS:
        row = by_name.get(name)
        ok = row is not None and row["status"] == "ok" and row["adherence_change_vs_fp32_pts"] is not None
        out.append({"target": f"{name}: >= {min_fewer:.0%} fewer denoiser parameters, adherence at most {max_drop} points "
                              "lower than fp32", "variant": name,
                    "passed": (row["details"]["fewer_parameters"] >= min_fewer
                               and row["adherence_change_vs_fp32_pts"] >= -max_drop) if ok else None,
                    "measured": f"{row['details']['fewer_parameters']:.1%} fewer; " + _measured(row) if ok else None})
    base = by_name.get(BASELINE)
    for name, min_speedup, max_drop, max_fvd in DISTILL_TARGETS:
        row = by_name.get(name)
        ok = row is not None and row["status"] == "ok" and base is not None and base["status"] == "ok"
        passed = measured = None
        if ok:
            worst = min(row["attribute_change_vs_fp32_pts"].items(), key=lambda kv: kv[1]["change"])
            passed = (row["speedup_vs_fp32"] >= min_speedup and -worst[1]["change"] <= max_drop
                      and row["metrics"]["fvd_shapes"] <= max_fvd * base["metrics"]["fvd_shapes"])
            measured = (f"{row['speedup_vs_fp32']:.1f}x; largest drop {worst[0]} {_change(worst[1])}; FVD "
                        f"{row['metrics']['fvd_shapes']:.1f} vs {base['metrics']['fvd_shapes']:.1f}")
        out.append({"target": f"{name}: >= {min_speedup:g}x faster than fp32, no attribute more than {max_drop:g} points "
                              f"lower, FVD at most {max_fvd:g}x fp32's", "variant": name, "passed": passed,
                    "measured": measured})
    timed = [r for r in rows if r["status"] == "ok" and r["name"] != REFERENCE]
    fastest = min(timed, key=lambda r: r["seconds_per_video"]) if timed else None
    out.append({"target": f"the fastest variant makes a video in <= {BEST_SECONDS} s", "variant": fastest and fastest["name"],
                "passed": fastest["seconds_per_video"] <= BEST_SECONDS if fastest else None})
    slower = [r["name"] for r in rows if r["status"] == "ok" and r["name"] != REFERENCE and r["speedup_vs_diffusers"] < 1]
    out.append({"target": "no variant slower than the plain diffusers loop", "variant": "*",
                "passed": not slower, "slower": slower})
    return out


# ---------------------------------------------------------------- outputs


def _fmt(value, spec: str = ".3g", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def format_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# vidiffuse bench — {report['model']['name']} ({report['model']['version']})",
        "",
        f"{report['n']} golden prompts ({report['golden_set']}"
        + (f", seeds + {s['seed_offset']}" if s.get("seed_offset") else "") + f"), {s['sampler']} {s['steps']} steps, guidance "
        f"{s['guidance']}, batch {s['batch_size']}, {s['repeats']} timed pass(es) after a warm-up; "
        f"{report['machine']['cpus']} CPUs, {report['machine']['threads']} torch threads, torch {report['machine']['torch']}. "
        f"Speed-up = the reference's median seconds per video / the variant's. Adherence in % (analyzer vs asked "
        f"attributes); FVD on the shapes-world encoder vs real clips (95% bootstrap CI); pixel MAE = mean |difference| "
        f"from the diffusers loop's frames, in uint8 levels. Weights: {report['weights_measure']}; the model's "
        f"denoiser and autoencoder files take {report['model']['disk_mb']:.1f} MB on disk.",
        "",
        "| variant | s/video | × vs diffusers | × vs fp32 | peak MB | weights MB | adherence | Δ vs fp32 (pts) | "
        + " | ".join(shapes.ATTRIBUTES) + " | FVD (95% CI) | pixel MAE | notes |",
        "|---|" + "---:|" * (9 + len(shapes.ATTRIBUTES)) + "---|",
    ]
    for row in report["variants"]:
        if row["status"] != "ok":
            blanks = " | ".join(["–"] * (9 + len(shapes.ATTRIBUTES)))
            lines.append(f"| {row['name']} | {blanks} | {row['status']}: {row['reason']} |")
            continue
        m = row["metrics"]
        ci = m["fvd_shapes_ci95"]
        fvd = f"{m['fvd_shapes']:.1f}" + (f" ({ci[0]:.1f}–{ci[1]:.1f})" if ci else "")
        notes = ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in row["details"].items())
        if not row["reproducible"]:
            notes = (notes + ", " if notes else "") + "passes differ"
        lines.append(
            f"| {row['name']} | {row['seconds_per_video']:.3g} | {row['speedup_vs_diffusers']:.2f} | "
            f"{_fmt(row['speedup_vs_fp32'], '.2f')} | {row['peak_memory_mb']:.0f} | {row['weights_mb']:.1f} | "
            f"{100 * m['adherence_mean']:.1f} | {_fmt(row['adherence_change_vs_fp32_pts'], '+.1f')} | "
            + " | ".join(f"{100 * m[f'adherence_{a}']:.0f}" for a in shapes.ATTRIBUTES)
            + f" | {fvd} | {row['pixel_mae_vs_diffusers']:.2f} | {notes} |")
    lines += ["", "## Targets", ""]
    for t in report["targets"]:
        mark = VERDICTS[t["passed"]]
        extra = f" (slower: {', '.join(t['slower'])})" if t.get("slower") else ""
        extra += f" — measured: {t['measured']}" if t.get("measured") else ""
        lines.append(f"- {mark}: {t['target']}{extra}")
    lines += ["", f"Adherence changes are paired over the {report['n']} prompts (same prompts and seeds as fp32); "
              "the 95% intervals are normal approximations on the per-video differences."]
    return "\n".join(lines) + "\n"


def format_summary(report: dict) -> str:
    """A few columns per variant and the targets, for a terminal."""
    lines = [f"{'variant':<16} {'s/video':>8} {'x diffusers':>11} {'adherence':>9} {'FVD':>8}  status"]
    for row in report["variants"]:
        if row["status"] != "ok":
            lines.append(f"{row['name']:<16} {'':>8} {'':>11} {'':>9} {'':>8}  {row['status']}: {row['reason']}")
            continue
        m = row["metrics"]
        lines.append(f"{row['name']:<16} {row['seconds_per_video']:>8.3g} {row['speedup_vs_diffusers']:>11.2f} "
                     f"{100 * m['adherence_mean']:>8.1f}% {m['fvd_shapes']:>8.1f}  ok")
    for t in report["targets"]:
        lines.append(f"{VERDICTS[t['passed']]}: {t['target']}" + (f" — {t['measured']}" if t.get("measured") else ""))
    return "\n".join(lines)


def plot_png(report: dict) -> bytes:
    """Speed against quality, one point per variant: adherence (left) and FVD (right) vs seconds per video."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["variants"] if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    panels = ((axes[0], lambda r: 100 * r["metrics"]["adherence_mean"], "adherence, mean over attributes (%) ↑"),
              (axes[1], lambda r: r["metrics"]["fvd_shapes"], "FVD, shapes encoder ↓"))
    for ax, value, label in panels:
        for r in rows:
            is_ref = r["name"] == REFERENCE
            ax.scatter(r["seconds_per_video"], value(r), s=60, marker="s" if is_ref else "o",
                       color="black" if is_ref else None, zorder=3)
            ax.annotate(r["name"], (r["seconds_per_video"], value(r)), textcoords="offset points", xytext=(6, 4),
                        fontsize=9)
        ref = next((r for r in rows if r["name"] == REFERENCE), None)
        if ref is not None:
            ax.axvline(ref["seconds_per_video"], color="gray", linestyle="--", linewidth=1, label="diffusers loop")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("median seconds per video ← faster")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    s = report["settings"]
    fig.suptitle(f"{report['model']['name']}: {report['n']} prompts, {s['sampler']} {s['steps']} steps, guidance {s['guidance']}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"json": write_atomic(out / "bench.json", json.dumps(report, indent=2) + "\n"),
            "md": write_atomic(out / "bench.md", format_markdown(report)),
            "png": write_atomic(out / "bench.png", plot_png(report))}
