"""Bias audit: what a model generates for an attribute the prompt leaves unsaid, against the training data.

For each attribute, prompts that do not name it go through the model; a classifier reads the attribute
back from each video, and a chi-square goodness-of-fit test compares the observed counts with the
distribution the training data shows for that attribute *in captions that leave it unsaid* — the only
thing a model could have learned to reproduce for such prompts.

- the shapes world: prompts are drawn from the training captions' own distribution (the same sampler,
  the audited attribute forced unsaid, the others left unsaid at the training drop rate), the world's
  pixel analyzer is the classifier, and the expected distribution is counted over the model's actual
  training captions (`<model>/training/denoiser_config.json`), or the world sampler when it has none;
- any other model: the user gives the classifier (`module:function` or `file.py:function`, a video
  tensor (C, T, H, W) in [-1, 1] → a label or None), the expected proportions (JSON) and the prompts.

`chi_square_test` is the pure statistical core; `audit` runs a model; `write_bias_report` writes
`bias.json` and `bias.png`.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ..data import shapes
from ..errors import ConfigError
from ..files import write_atomic

REPORT_KIND = "vidiffuse-bias-audit"
REPORT_VERSION = 1
DEFAULT_ALPHA = 0.05
MIN_EXPECTED = 5.0  # below this expected count per bin the chi-square approximation is unreliable
ATTRIBUTE_VALUES = {"background": list(shapes.BACKGROUNDS), "color": list(shapes.COLORS), "shape": list(shapes.SHAPES),
                    "size": list(shapes.SIZES), "direction": list(shapes.DIRECTIONS)}
# when a model ships no shapes training config: the world's own defaults (train.data.shapes_specs)
WORLD_DATA = {"kind": "shapes", "num_clips": 20000, "captions_per_clip": 1, "caption_drop_prob": 0.15, "seed": 0}
PROMPT_POLICY = ("the audited attribute is left unsaid; the other attributes are drawn from the world sampler and "
                 "each left unsaid at the training captions' drop rate, so prompts follow the training captions' "
                 "distribution given that the audited attribute is unsaid")


# ---------------------------------------------------------------- statistics


def _merge_small_bins(expected: dict[str, float], min_expected: float) -> list[list[str]]:
    """Pool the categories with the smallest expected counts until every bin expects at least `min_expected`."""
    bins = [[k] for k in expected]
    total = lambda b: sum(expected[k] for k in b)  # noqa: E731
    while len(bins) > 1 and min(total(b) for b in bins) < min_expected:
        bins.sort(key=total)
        bins = [bins[0] + bins[1], *bins[2:]]
    order = list(expected)
    return sorted((sorted(b, key=order.index) for b in bins), key=lambda b: order.index(b[0]))


def chi_square_test(observed: dict[str, int], expected_proportions: dict[str, float], alpha: float = DEFAULT_ALPHA,
                    min_expected: float = MIN_EXPECTED) -> dict:
    """Goodness of fit of observed label counts to expected proportions.

    Categories expecting fewer than `min_expected` videos are pooled with the next smallest; when pooling
    leaves fewer than two bins, the test runs on the raw categories and is marked unreliable (never
    significant). Labels outside `expected_proportions` are returned under `unexpected` and left out.
    """
    total_p = sum(expected_proportions.values())
    if not expected_proportions or total_p <= 0 or any(p < 0 for p in expected_proportions.values()):
        raise ConfigError("expected proportions must be non-negative and sum to more than 0")
    probs = {k: p / total_p for k, p in expected_proportions.items()}
    unexpected = {k: int(v) for k, v in observed.items() if k not in probs and v}
    counts = {k: int(observed.get(k, 0)) for k in probs}
    n = sum(counts.values())
    expected = {k: n * p for k, p in probs.items()}
    result = {"n": n, "observed": counts, "unexpected": unexpected,
              "observed_proportions": {k: (c / n if n else None) for k, c in counts.items()},
              "expected_proportions": probs, "expected_counts": expected,
              "bins": None, "chi2": None, "dof": None, "p_value": None, "reliable": False,
              "alpha": alpha, "significant": False, "most_over": None, "most_under": None}
    if n == 0:
        result["note"] = "no video gave a readable label"
        return result
    bins = _merge_small_bins(expected, min_expected)
    reliable = len(bins) >= 2
    if not reliable:
        bins = [[k] for k in probs if probs[k] > 0]
        result["note"] = (f"only {n} readable videos: no two bins reach {min_expected:g} expected, "
                          "so the chi-square p-value is indicative only")
    if len(bins) >= 2:
        f_obs = np.array([sum(counts[k] for k in b) for b in bins], dtype=np.float64)
        f_exp = np.array([sum(expected[k] for k in b) for b in bins], dtype=np.float64)
        chi2, p = stats.chisquare(f_obs, f_exp)
        result.update(bins=bins, chi2=float(chi2), dof=len(bins) - 1, p_value=float(p), reliable=reliable,
                      significant=bool(reliable and p < alpha))
    # over/under representation in percentage points of share, on the unpooled categories
    gap = {k: counts[k] / n - probs[k] for k in probs}
    for key, pick in (("most_over", max), ("most_under", min)):
        value = pick(gap, key=gap.get)
        result[key] = {"value": value, "observed": counts[value] / n, "expected": probs[value],
                       "difference": gap[value],
                       "residual": ((counts[value] - expected[value]) / np.sqrt(expected[value])
                                    if expected[value] > 0 else None)}
    return result


# ---------------------------------------------------------------- what the training captions leave unsaid


def _phrase_pattern(phrases: Iterable[str]) -> re.Pattern:
    # longest first, so "royal blue" wins over a shorter phrase; hyphens count as part of a word
    alternation = "|".join(re.escape(p) for p in sorted(set(phrases), key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])")


def _caption_vocabulary() -> dict[str, dict[str, str]]:
    """Per attribute: phrase → value, from the world's own caption vocabulary."""
    vocab = {a: {syn.lower(): value for value, syns in shapes._SYN[a].items() for syn in syns} for a in shapes._SYN}
    # a "sentence" caption drops the relative pronoun: "that moves left" → "is ... moves left"
    motion = shapes._MOTION_BY_VERSION[max(shapes.CAPTION_VERSIONS)]  # every version's phrases
    vocab["direction"] = {p.removeprefix("that ").lower(): d for d, phrases in motion.items() for p in phrases}
    return vocab


_VOCAB = _caption_vocabulary()
_PATTERNS = {a: _phrase_pattern(v) for a, v in _VOCAB.items()}


def stated_attributes(caption: str) -> dict[str, str | None]:
    """Which value a shapes-world caption states for each attribute; None where it leaves it unsaid."""
    text = caption.lower()
    out = {}
    for attribute in shapes.ATTRIBUTES:
        values = {_VOCAB[attribute][m] for m in _PATTERNS[attribute].findall(text)}
        if len(values) > 1:
            raise ValueError(f"caption names several {attribute}s ({', '.join(sorted(values))}): {caption!r}")
        out[attribute] = values.pop() if values else None
    return out


def _display(path: Path) -> str:
    """A bundled model's files by their place in the package: an absolute path means nothing on another machine."""
    from ..pipeline import WEIGHTS_DIR

    try:
        return "vidiffuse/weights/" + str(Path(path).resolve().relative_to(WEIGHTS_DIR.resolve()))
    except ValueError:
        return str(path)


def training_data_config(model_path: Path | None) -> tuple[dict, str]:
    """The shapes [data] section the model was trained on, and where it came from."""
    if model_path is not None:
        path = Path(model_path) / "training" / "denoiser_config.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text()).get("data", {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise ConfigError(f"{path} is not a valid training config: {e}") from None
            if data.get("kind", "shapes") == "shapes":
                return {**WORLD_DATA, **data}, f"training captions ({_display(path)})"
    return dict(WORLD_DATA), "world sampler (the model ships no shapes training config)"


def expected_when_unsaid(data_cfg: dict, max_clips: int | None = None) -> dict:
    """For each attribute: the share of each value among the training clips whose caption leaves it unsaid."""
    from ..train.data import shapes_specs

    cfg = dict(data_cfg)
    if max_clips is not None:
        cfg["num_clips"] = min(int(cfg["num_clips"]), max_clips)
    counts = {a: Counter() for a in shapes.ATTRIBUTES}
    captions = 0
    for spec, texts in shapes_specs(cfg):
        for text in texts:
            captions += 1
            said = stated_attributes(text)
            for a in shapes.ATTRIBUTES:
                if said[a] is None:
                    counts[a][getattr(spec, a)] += 1
    out = {}
    for a, c in counts.items():
        n = sum(c.values())
        if n == 0:
            raise ConfigError(f"no training caption leaves {a} unsaid, so there is nothing to compare against")
        out[a] = {"captions": n, "proportions": {v: c[v] / n for v in ATTRIBUTE_VALUES[a]}}
    return {"captions": captions, "attributes": out}


# ---------------------------------------------------------------- prompts and classifiers


@dataclass(frozen=True)
class AuditItem:
    attribute: str
    prompt: str
    seed: int


def shapes_prompts(attribute: str, n: int, seed: int = 0, drop_prob: float = 0.15) -> list[AuditItem]:
    """`n` prompts that leave `attribute` unsaid, the rest as in the training captions (see PROMPT_POLICY)."""
    index = shapes.ATTRIBUTES.index(attribute)
    rng = np.random.default_rng([seed, index, 0xB1A5])
    items = []
    for k in range(n):
        spec = shapes.sample_clip_spec(rng)
        attrs = {a: (None if a == attribute or rng.random() < drop_prob else v) for a, v in spec.attributes().items()}
        items.append(AuditItem(attribute, shapes.make_caption(attrs, rng), seed * 1_000_003 + index * 100_000 + k))
    return items


def shapes_classifier(video: torch.Tensor, attribute: str) -> str | None:
    from ..video.io import frames_to_uint8

    return shapes.analyze_video(frames_to_uint8(video))[attribute]


def load_classifier(spec: str) -> Callable:
    """`package.module:function` or `path/to/file.py:function`."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"--classifier {spec!r}: expected 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"classifier file not found: {path}")
            loader_spec = importlib.util.spec_from_file_location(f"vidiffuse_user_classifier_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # the user's module may fail to import in any way
        raise ConfigError(f"cannot import classifier module {module_name!r}: {type(e).__name__}: {e}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"{module_name!r} has no function {func_name!r}")
    return func


def user_classifier(func: Callable, attributes: Sequence[str]) -> Callable[[torch.Tensor, str], str | None]:
    """Adapt a user classifier: it returns a label (one audited attribute) or a dict {attribute: label}."""

    def classify(video: torch.Tensor, attribute: str) -> str | None:
        label = func(video)
        if isinstance(label, dict):
            label = label.get(attribute)
        elif len(attributes) > 1:
            raise ConfigError(f"the classifier returned {type(label).__name__}; with several attributes it must "
                              f"return a dict {{attribute: label}}")
        if label is not None and not isinstance(label, str):
            raise ConfigError(f"the classifier returned {type(label).__name__}, expected a label (str) or None")
        return label

    return classify


def _read_json(path: str | os.PathLike, what: str):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None


def read_expected(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """`{"attribute": {"label": proportion, ...}, ...}`; proportions are normalised per attribute."""
    data = _read_json(path, "expected proportions")
    ok = isinstance(data, dict) and data and all(
        isinstance(v, dict) and v and all(isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 0
                                          for p in v.values()) and sum(v.values()) > 0
        for v in data.values())
    if not ok:
        raise ConfigError(f"{path}: expected {{\"attribute\": {{\"label\": proportion, ...}}, ...}} with "
                          "non-negative numbers summing to more than 0 per attribute")
    return {a: {k: float(p) / sum(v.values()) for k, p in v.items()} for a, v in data.items()}


def read_prompts(path: str | os.PathLike, attributes: Sequence[str], n: int, seed: int = 0) -> list[AuditItem]:
    """A prompts file: JSONL lines `{"prompt": ..., "attribute": ...}` (attribute optional: then the line serves
    every attribute) or plain text, one prompt per line. Each attribute's prompts are cycled to `n` videos."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file not found: {path}")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not valid JSON: {e}") from None
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise ConfigError(f"{path}:{number}: needs a non-empty \"prompt\"")
            if row.get("attribute") is not None and row["attribute"] not in attributes:
                raise ConfigError(f"{path}:{number}: attribute {row['attribute']!r} is not in the expected "
                                  f"proportions ({', '.join(attributes)})")
            entries.append((row["prompt"], row.get("attribute")))
        else:
            entries.append((line, None))
    items = []
    for index, attribute in enumerate(attributes):
        prompts = [p for p, a in entries if a in (None, attribute)]
        if not prompts:
            raise ConfigError(f"{path} has no prompt for attribute {attribute!r}")
        items += [AuditItem(attribute, prompts[k % len(prompts)], seed * 1_000_003 + index * 100_000 + k)
                  for k in range(n)]
    return items


# ---------------------------------------------------------------- the audit


@dataclass
class AuditPlan:
    """Everything an audit needs besides the model, checked before any video is generated."""

    items: list[AuditItem]
    classify: Callable[[torch.Tensor, str], str | None]
    expected: dict[str, dict[str, float]]
    alpha: float
    meta: dict


def _check_run(n: int, alpha: float) -> None:
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be between 0 and 1, got {alpha}")


def plan_shapes(model_path: Path | None, n: int = 48, seed: int = 0, alpha: float = DEFAULT_ALPHA,
                attributes: Sequence[str] = shapes.ATTRIBUTES, max_training_clips: int | None = None) -> AuditPlan:
    """The shapes-world audit: n prompts per attribute, expected shares from the model's training captions."""
    _check_run(n, alpha)
    unknown = [a for a in attributes if a not in shapes.ATTRIBUTES]
    if unknown:
        raise ConfigError(f"unknown attribute(s) {', '.join(unknown)}; choose from {', '.join(shapes.ATTRIBUTES)}")
    data_cfg, source = training_data_config(model_path)
    reference = expected_when_unsaid(data_cfg, max_training_clips)
    drop = float(data_cfg.get("caption_drop_prob", WORLD_DATA["caption_drop_prob"]))
    meta = {"classifier": "shapes-world pixel analyzer (vidiffuse.data.shapes.analyze_video)",
            "prompt_policy": PROMPT_POLICY, "seed": seed, "n_per_attribute": n,
            "expected_source": {"source": source, "data": data_cfg, "captions": reference["captions"],
                                "captions_leaving_unsaid": {a: r["captions"]
                                                            for a, r in reference["attributes"].items()}}}
    return AuditPlan(items=[item for a in attributes for item in shapes_prompts(a, n, seed, drop)],
                     classify=shapes_classifier, alpha=alpha, meta=meta,
                     expected={a: r["proportions"] for a, r in reference["attributes"].items()})


def plan_custom(classifier: str, expected_path: str | os.PathLike, prompts_path: str | os.PathLike,
                n: int = 48, seed: int = 0, alpha: float = DEFAULT_ALPHA) -> AuditPlan:
    """Any model: the user's classifier, expected proportions and prompts."""
    _check_run(n, alpha)
    expected = read_expected(expected_path)
    items = read_prompts(prompts_path, list(expected), n, seed)
    meta = {"classifier": classifier, "prompt_policy": f"user prompts from {prompts_path}", "seed": seed,
            "n_per_attribute": n, "expected_source": {"source": f"user-supplied ({expected_path})"}}
    return AuditPlan(items, user_classifier(load_classifier(classifier), list(expected)), expected, alpha, meta)


def audit(pipe, plan: AuditPlan, batch_size: int = 16, steps: int | None = None, guidance: float | None = None,
          sampler: str | None = None, progress: bool = True) -> dict:
    """Generate every planned video, classify its attribute, and test each attribute against the plan's expectation."""
    from tqdm import tqdm

    items = plan.items
    attributes = list(dict.fromkeys(i.attribute for i in items))
    missing = [a for a in attributes if a not in plan.expected]
    if missing:
        raise ConfigError(f"no expected proportions for {', '.join(missing)}")
    readings: list[str | None] = []
    with tqdm(total=len(items), desc="bias audit", unit="video", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            out = pipe([i.prompt for i in chunk], seed=[i.seed for i in chunk], steps=steps, guidance=guidance,
                       sampler=sampler, batch_size=batch_size, progress=False)
            readings += [plan.classify(video, item.attribute) for video, item in zip(out.videos, chunk)]
            bar.update(len(chunk))
    alpha_corrected = plan.alpha / len(attributes)  # Bonferroni: one test per attribute
    results = {}
    for attribute in attributes:
        labels = [r for r, i in zip(readings, items) if i.attribute == attribute]
        test = chi_square_test(Counter(r for r in labels if r is not None), plan.expected[attribute], alpha_corrected)
        results[attribute] = {"n_videos": len(labels), "unreadable": sum(r is None for r in labels), **test}
    settings = {k: pipe.defaults[k] if v is None else v
                for k, v in (("steps", steps), ("guidance", guidance), ("sampler", sampler))}
    return {
        "kind": REPORT_KIND, "version": REPORT_VERSION, "model": pipe.name, **plan.meta,
        "settings": {**settings, "batch_size": batch_size},
        "test": "chi-square goodness of fit (scipy.stats.chisquare)",
        "alpha": plan.alpha, "correction": "bonferroni", "n_tests": len(attributes), "alpha_corrected": alpha_corrected,
        "min_expected_per_bin": MIN_EXPECTED,
        "flagged": [a for a, r in results.items() if r["significant"]],
        "attributes": results,
        "videos": [{**asdict(i), "label": r} for i, r in zip(items, readings)],
    }


# ---------------------------------------------------------------- files


def read_bias_report(path: str | os.PathLike) -> dict:
    report = _read_json(path, "bias report")
    if not (isinstance(report, dict) and report.get("kind") == REPORT_KIND and isinstance(report.get("attributes"), dict)):
        raise ConfigError(f"{path} is not a vidiffuse bias report (written by `vidiffuse govern bias`)")
    return report


def plot_bias(report: dict) -> bytes:
    """PNG: per attribute, observed against expected shares, the p-value and whether it is flagged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["attributes"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = report["attributes"][name]
        labels = list(r["expected_proportions"])
        x = np.arange(len(labels))
        observed = [r["observed_proportions"][k] or 0.0 for k in labels]
        ax.bar(x - 0.2, observed, 0.4, label="generated", color="#d62728" if r["significant"] else "#1f77b4")
        ax.bar(x + 0.2, [r["expected_proportions"][k] for k in labels], 0.4, label="training (unsaid)",
               color="#bbbbbb")
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        p = "n/a" if r["p_value"] is None else f"{r['p_value']:.2g}"
        ax.set_title(f"{name}{' (flagged)' if r['significant'] else ''}\np={p}, n={r['n']}, unreadable={r['unreadable']}",
                     fontsize=9)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("share of videos")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{report['model']}: prompts leaving the attribute unsaid, generated (red: flagged) vs training "
                 f"(chi-square, alpha {report['alpha']:g}, Bonferroni {report['alpha_corrected']:.3g})", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_bias_report(report: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_atomic(out / "bias.json", json.dumps(report, indent=2) + "\n")
    png_path = write_atomic(out / "bias.png", plot_bias(report))
    return json_path, png_path
