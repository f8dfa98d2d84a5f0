"""Model card and risk report, generated from measurements rather than written by hand.

Every number in `MODEL_CARD.md` and `risk_report.json` comes from an input: the model directory
(`model_index.json`, configs, safetensors headers, `training/` configs and logs), the `vidiffuse eval`
report, the memorization report, the bias report and the watermark benchmark (`benchmarks/watermark.py`). An input that is not given is written as
"not measured", never guessed. The risk section maps concrete risks to the NIST AI RMF functions
(Govern, Map, Measure, Manage) with what vidiffuse does about each and the evidence, and goes through
the twelve generative-AI risks of NIST AI 600-1, saying for each why it applies to this model or not.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np

from .. import __version__ as vidiffuse_version
from ..errors import ConfigError
from ..files import sha256_file, write_atomic
from ..pipeline import WEIGHTS_DIR

NOT_MEASURED = "not measured"
# issue #2's adherence targets for the shapes world (share of videos showing the asked attribute)
ADHERENCE_TARGETS = {"background": 0.95, "color": 0.95, "shape": 0.85, "size": 0.85, "direction": 0.90}
MEMORIZATION_KEYS = ("metric", "threshold", "n_generated", "n_training", "flagged", "nearest")
RMF_FUNCTIONS = ("Govern", "Map", "Measure", "Manage")
WATERMARK_KEYS = ("method", "n", "threshold_p_value", "psnr_db", "attacks", "unmarked")
ATTACK_RATES = ("bit_accuracy", "detection_rate")
# an edit after which fewer than this share of marked videos is still detected is a listed limitation
WATERMARK_DETECTION_FLOOR = 0.9
PAUSE_SECONDS = 600  # a gap this long between two log lines is a stop, not training time
RISK_REPORT_VERSION = 1


# ---------------------------------------------------------------- reading the inputs


def _load_json(value, what: str) -> tuple[dict | None, dict | None]:
    """A path or an already-loaded dict → (data, {"path", "sha256"}); None → (None, None)."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        return value, {"path": None, "sha256": None}
    path = Path(value)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a JSON object")
    return data, {"path": str(path), "sha256": sha256_file(path)}


def _check_eval(report: dict, source: str) -> dict:
    from ..evaluate.suite import _check_report

    return _check_report(report, source)


def _check_memorization(report: dict, source: str) -> dict:
    missing = [k for k in MEMORIZATION_KEYS if k not in report]
    if missing:
        raise ConfigError(f"{source} is not a memorization report (missing {', '.join(missing)})")
    if not isinstance(report["flagged"], list) or not isinstance(report["nearest"], list):
        raise ConfigError(f"{source}: 'flagged' and 'nearest' must be lists")
    return report


def _check_bias(report: dict, source: str) -> dict:
    from .bias import REPORT_KIND

    if report.get("kind") != REPORT_KIND or not isinstance(report.get("attributes"), dict):
        raise ConfigError(f"{source} is not a vidiffuse bias report (written by `vidiffuse govern bias`)")
    return report


def _is_rate(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_watermark(report: dict, source: str) -> dict:
    """The shape `benchmarks/watermark.py` writes to benchmarks/results/watermark.json."""
    missing = [k for k in WATERMARK_KEYS if k not in report]
    if missing:
        raise ConfigError(f"{source} is not a watermark benchmark result (missing {', '.join(missing)})")
    psnr = report["psnr_db"]
    if not (isinstance(psnr, dict) and all(isinstance(psnr.get(k), (int, float)) for k in ("mean", "min"))):
        raise ConfigError(f"{source}: 'psnr_db' must be an object with numbers 'mean' and 'min'")
    attacks, unmarked = report["attacks"], report["unmarked"]
    if not isinstance(attacks, dict) or not attacks:
        raise ConfigError(f"{source}: 'attacks' must be a non-empty object of attack name → results")
    for name, a in attacks.items():
        if not (isinstance(a, dict) and _is_count(a.get("n")) and all(_is_rate(a.get(k)) for k in ATTACK_RATES)):
            raise ConfigError(f"{source}: attack '{name}' needs a count 'n' and rates (0–1) "
                              f"{' and '.join(repr(k) for k in ATTACK_RATES)}")
    if not isinstance(unmarked, dict) or not unmarked:
        raise ConfigError(f"{source}: 'unmarked' must be a non-empty object of set name → results")
    for name, u in unmarked.items():
        if not (isinstance(u, dict) and _is_count(u.get("n")) and _is_count(u.get("false_positives"))
                and u["false_positives"] <= u["n"]):
            raise ConfigError(f"{source}: unmarked set '{name}' needs counts 'n' and 'false_positives' (at most n)")
    return report


def weakest_attacks(watermark: dict) -> list[tuple[str, dict]]:
    """Edits after which detection falls below the floor, weakest first; the single weakest if none does."""
    ranked = sorted(watermark["attacks"].items(), key=lambda kv: (kv[1]["detection_rate"], kv[1]["bit_accuracy"]))
    below = [(k, a) for k, a in ranked if a["detection_rate"] < WATERMARK_DETECTION_FLOOR]
    return below or ranked[:1]


def _worst_background(attack: dict) -> str:
    by = attack.get("by_background")
    if not isinstance(by, dict) or len(by) < 2 or not all(_is_rate((v or {}).get("detection_rate")) for v in by.values()):
        return ""
    worst = min(by, key=lambda k: by[k]["detection_rate"])
    return f"; lowest on {worst} backgrounds, {by[worst]['detection_rate']:.3f}"


def _false_positives(watermark: dict) -> tuple[int, int]:
    unmarked = watermark["unmarked"].values()
    return sum(u["false_positives"] for u in unmarked), sum(u["n"] for u in unmarked)


def watermark_evidence(watermark: dict | None) -> str:
    if watermark is None:
        return f"watermark robustness {NOT_MEASURED}"
    rates = [a["detection_rate"] for a in watermark["attacks"].values()]
    name, weakest = weakest_attacks(watermark)[0]
    fp, n_unmarked = _false_positives(watermark)
    return (f"watermark detected (p ≤ {watermark['threshold_p_value']:g}) in {min(rates):.3f}–{max(rates):.3f} of "
            f"{watermark['n']} marked videos across {len(rates)} edits (weakest: {name}, "
            f"{weakest['detection_rate']:.3f}); {fp} of {n_unmarked} unmarked videos falsely detected; "
            f"PSNR {watermark['psnr_db']['mean']:.1f} dB")


def _parameters(weights: Path) -> int | None:
    """Parameter count from a safetensors header, without loading the tensors."""
    from safetensors import safe_open

    if not weights.is_file():
        return None
    with safe_open(str(weights), "pt") as f:
        return int(sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()))


def model_facts(path: Path) -> dict:
    index = json.loads((path / "model_index.json").read_text())
    components = {}
    for name in ("transformer", "vae"):
        config_path = path / name / "config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            components[name] = {"class": config.get("_class_name"),
                                "parameters": _parameters(path / name / "diffusion_pytorch_model.safetensors"),
                                "config": {k: v for k, v in config.items() if not k.startswith("_")}}
    weight_files = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                          if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"})
    # a bundled model's absolute path says nothing to a reader on another machine
    shown = f"vidiffuse/weights/{path.name} (bundled)" if path.parent.resolve() == WEIGHTS_DIR.resolve() else str(path)
    return {"name": index.get("name", path.name), "path": shown, "index": index, "components": components,
            "parameters": sum(c["parameters"] or 0 for c in components.values()),
            "weight_files": weight_files,
            "pickle_free": all(f.endswith(".safetensors") for f in weight_files),
            "manifest_sha256": index.get("training_data_manifest_sha256")}


def _metrics_summary(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "step" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    times = np.array([r["time"] for r in rows if "time" in r], dtype=np.float64)
    gaps = np.diff(times)
    evals = [r for r in rows if "eval" in r]
    return {"last_logged_step": max(steps) if steps else None,
            "final_loss": float(np.mean(losses[-10:])) if losses else None,
            "training_seconds": float(gaps[gaps < PAUSE_SECONDS].sum()) if len(times) > 1 else None,
            "pauses": int((gaps >= PAUSE_SECONDS).sum()) if len(times) > 1 else None,
            "last_eval": evals[-1] if evals else None}


def training_facts(path: Path) -> dict:
    """Per training stage found in `<model>/training/`: its config and a summary of its metrics log."""
    folder = path / "training"
    stages = {}
    for config_path in sorted(folder.glob("*_config.json")) if folder.is_dir() else []:
        stage = config_path.name.removesuffix("_config.json")
        try:
            config = json.loads(config_path.read_text())
            metrics_path = folder / f"{stage}_metrics.jsonl"
            metrics = _metrics_summary(metrics_path) if metrics_path.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{folder}: cannot read the {stage} training record: {e}") from None
        stages[stage] = {"config": config, "metrics": metrics}
    return stages


def _manifest_summary(path: Path) -> dict:
    """Name, licence and description of a Croissant-style data manifest (`vidiffuse data manifest`), if it has them."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("name", "license", "description") if k in data}


def _data_kind(training: dict) -> str | None:
    kinds = {s["config"].get("data", {}).get("kind", "shapes") for s in training.values() if s["config"].get("data")}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)


# ---------------------------------------------------------------- deriving findings


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return NOT_MEASURED
    if isinstance(x, float):
        if abs(x) >= 10 ** digits:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def limitations(eval_report: dict | None, bias: dict | None, memorization: dict | None,
                watermark: dict | None = None) -> list[str]:
    out = []
    if eval_report is not None:
        m = eval_report["metrics"]
        for attribute, target in ADHERENCE_TARGETS.items():
            value = m.get(f"adherence_{attribute}")
            if value is not None and value < target:
                out.append(f"Prompt adherence for {attribute} is {value:.3f}, below the target {target:.2f} "
                           f"(n={eval_report.get('n')} golden prompts).")
        phrasing = eval_report.get("ood", {}).get("by_phrasing", {})
        if "training" in phrasing and len(phrasing) > 1:
            worst = min(phrasing, key=lambda k: phrasing[k]["adherence_mean"])
            if worst != "training":
                out.append(f"Adherence falls from {phrasing['training']['adherence_mean']:.3f} on training-style "
                           f"phrasings to {phrasing[worst]['adherence_mean']:.3f} on '{worst}' phrasings.")
        ood = eval_report.get("ood", {})
        if "flagged" in ood:
            out.append(f"{ood['flagged']} of {eval_report.get('n')} golden prompts score as out of distribution "
                       f"(threshold {ood.get('threshold', float('nan')):.3f}); `generate` warns on such prompts.")
    if bias is not None:
        for attribute in bias.get("flagged", []):
            r = bias["attributes"][attribute]
            out.append(f"When a prompt leaves {attribute} unsaid, the generated distribution differs from the training "
                       f"data's (p={r['p_value']:.2g}): '{r['most_over']['value']}' is over-represented "
                       f"({r['most_over']['observed']:.2f} vs {r['most_over']['expected']:.2f}), "
                       f"'{r['most_under']['value']}' under-represented ({r['most_under']['observed']:.2f} vs "
                       f"{r['most_under']['expected']:.2f}).")
        for attribute, r in bias["attributes"].items():
            if r["n_videos"] and r["unreadable"] / r["n_videos"] > 0.1:
                out.append(f"{r['unreadable']} of {r['n_videos']} bias-audit videos for {attribute} had no readable "
                           f"{attribute} (no clear object or motion).")
    if memorization is not None and memorization["flagged"]:
        out.append(f"{len(memorization['flagged'])} of {memorization['n_generated']} generated videos were flagged as "
                   f"near copies of a training clip (metric `{memorization['metric']}`, threshold "
                   f"{memorization['threshold']}); see *Memorization* for the base rate.")
    if watermark is not None:
        for name, a in weakest_attacks(watermark):
            out.append(f"The watermark is detected in only {a['detection_rate']:.3f} of {a['n']} marked videos after "
                       f"'{name}' (bit accuracy {a['bit_accuracy']:.3f}{_worst_background(a)}).")
        for name, u in watermark["unmarked"].items():
            if u["false_positives"]:
                out.append(f"The watermark detector reported {u['false_positives']} of {u['n']} unmarked videos "
                           f"({name}) as marked.")
    return out


def rmf_rows(facts: dict) -> list[dict]:
    """Concrete risks, each under the NIST AI RMF function that addresses it, with vidiffuse's action and evidence."""
    ev, mem, bias, model = facts["eval"], facts["memorization"], facts["bias"], facts["model"]
    m = ev["metrics"] if ev else {}
    manifest = model["manifest_sha256"]
    train_kind = _data_kind(facts["training"])
    rows = [
        {"function": "Govern", "risk": "Training data of unknown origin or licence",
         "action": "the model directory records the training data manifest's SHA-256; a data manifest given to the "
                   "card is checked against it",
         "evidence": (f"training_data_manifest_sha256 = {manifest}" + (
             f"; the manifest file {'matches' if facts['manifest']['matches'] else 'DOES NOT match'}"
             if facts["manifest"].get("matches") is not None else "")) if manifest else
             f"model_index.json has no training_data_manifest_sha256 (not recorded); training data kind: "
             f"{train_kind or 'not documented'}"},
        {"function": "Govern", "risk": "Undocumented model changes reach users",
         "action": "this card and risk_report.json are generated from the measurement files, whose hashes they list",
         "evidence": ", ".join(f"{k}: {v['path'] or 'in memory'}" for k, v in facts["inputs"].items() if v) or
                     "no measurement file given"},
        {"function": "Govern", "risk": "Loading model files executes code (pickle)",
         "action": "weights are stored and loaded as safetensors only",
         "evidence": f"{len(model['weight_files'])} weight files, pickle-free: {model['pickle_free']}"},
        {"function": "Map", "risk": "Use outside the model's intended context",
         "action": "intended and out-of-scope uses are stated in the card; prompts far from the training captions "
                   "get an out-of-distribution warning",
         "evidence": (f"eval: {ev['ood']['flagged']} of {ev['n']} golden prompts flagged as OOD "
                      f"(threshold {ev['ood']['threshold']:.3f})") if ev and "flagged" in ev.get("ood", {}) else
                     f"OOD flagging {NOT_MEASURED}"},
        {"function": "Measure", "risk": "Videos that do not show what the prompt asks (confabulation)",
         "action": "`vidiffuse eval` measures per-attribute adherence, FVD and temporal quality on a fixed golden set",
         "evidence": (f"adherence_mean {m['adherence_mean']:.3f}; " +
                      ", ".join(f"{a} {m[f'adherence_{a}']:.3f}" for a in ADHERENCE_TARGETS if f"adherence_{a}" in m) +
                      (f"; FVD {m['fvd_shapes']:.1f}" if "fvd_shapes" in m else "")) if ev else
                     f"prompt adherence {NOT_MEASURED}"},
        {"function": "Measure", "risk": "Reproducing training clips (memorization)",
         "action": "generated videos are compared with the training set; those closer than a threshold are flagged",
         "evidence": (f"{len(mem['flagged'])} of {mem['n_generated']} generated videos flagged against "
                      f"{mem['n_training']} training clips ({mem['metric']}, threshold {mem['threshold']})")
                     if mem else f"memorization {NOT_MEASURED}"},
        {"function": "Measure", "risk": "Skewed defaults for attributes the prompt leaves unsaid (bias, homogenization)",
         "action": "`vidiffuse govern bias` tests, per attribute, the generated against the training distribution "
                   "(chi-square, Bonferroni-corrected)",
         "evidence": (f"{len(bias['flagged'])} of {bias['n_tests']} attributes flagged at alpha "
                      f"{bias['alpha_corrected']:.3g}" + (f" ({', '.join(bias['flagged'])})" if bias["flagged"] else "")
                      + f"; n={bias.get('n_per_attribute')} per attribute") if bias else f"bias {NOT_MEASURED}"},
        {"function": "Measure", "risk": "Compute cost and latency (environmental impact)",
         "action": "training logs record throughput and time; the eval report records seconds per video and memory",
         "evidence": "; ".join(filter(None, [
             f"training {facts['training_hours']:.2f} h on the logged machine" if facts["training_hours"] else None,
             f"{m['seconds_per_video']:.2f} s/video, peak {m['peak_memory_mb']:.0f} MB" if "seconds_per_video" in m
             else None])) or NOT_MEASURED},
        {"function": "Manage", "risk": "Generated videos passed off as real footage",
         "action": "every MP4 `vidiffuse generate` writes carries a signed C2PA manifest, and its pixels an invisible watermark "
                   "unless `--no-watermark` is given, which the signed manifest records; `vidiffuse verify` checks both",
         "evidence": watermark_evidence(facts["watermark"])},
        {"function": "Manage", "risk": "A retrained model regresses in quality",
         "action": "`vidiffuse eval --baseline` gates a new model metric by metric against this report",
         "evidence": f"baseline report: {facts['inputs']['eval']['path'] or 'in memory'}" if ev else
                     f"no baseline ({NOT_MEASURED})"},
        {"function": "Manage", "risk": "Known failure modes surprise users",
         "action": "limitations derived from the measurements are published in this card",
         "evidence": f"{len(facts['limitations'])} limitation(s) listed"},
    ]
    return rows


def gai_risks(facts: dict) -> list[dict]:
    """The twelve NIST AI 600-1 generative-AI risks: whether each applies to this model, why, and the evidence."""
    procedural = _data_kind(facts["training"]) == "shapes"
    ev, mem, bias = facts["eval"], facts["memorization"], facts["bias"]
    m = ev["metrics"] if ev else {}
    shapes_only = "the model was trained only on procedurally generated coloured shapes (training data kind 'shapes')"
    unknown = "the training data is not the procedural shapes world, so this depends on that data and was not assessed"

    def content_risk(name: str) -> dict:
        return ({"risk": name, "applies": "no", "why": f"{shapes_only}; it can only depict such shapes"}
                if procedural else {"risk": name, "applies": "not assessed", "why": unknown})

    return [
        content_risk("CBRN Information or Capabilities"),
        {"risk": "Confabulation", "applies": "yes",
         "why": "the model produces a plausible video whether or not it matches the prompt, and off-world prompts "
                "still give shapes-world videos",
         "evidence": f"adherence_mean {m['adherence_mean']:.3f}" if "adherence_mean" in m else NOT_MEASURED},
        content_risk("Dangerous, Violent, or Hateful Content"),
        {"risk": "Data Privacy", "applies": "no" if procedural else "yes",
         "why": (f"{shapes_only}: no personal data" if procedural else
                 "trained on user footage that may show people; memorization is the measurable part"),
         "evidence": (f"memorization: {len(mem['flagged'])} of {mem['n_generated']} flagged" if mem
                      else f"memorization {NOT_MEASURED}")},
        {"risk": "Environmental Impacts", "applies": "yes (small)",
         "why": "training and inference use compute; this model is small and runs on a CPU",
         "evidence": (f"{facts['model']['parameters']:,} parameters; training "
                      f"{_fmt(facts['training_hours'])} h; {_fmt(m.get('seconds_per_video'))} s/video")},
        {"risk": "Harmful Bias and Homogenization", "applies": "yes",
         "why": ("no people are depicted, so no group can be harmed, but defaults for unsaid attributes can still "
                 "collapse onto a few values (homogenization)" if procedural else
                 "defaults for unsaid attributes may skew toward some groups or values"),
         "evidence": (f"{len(bias['flagged'])} of {bias['n_tests']} attributes flagged"
                      + (f" ({', '.join(bias['flagged'])})" if bias["flagged"] else "") if bias
                      else f"bias {NOT_MEASURED}")},
        {"risk": "Human-AI Configuration", "applies": "yes",
         "why": "users may trust a generated video as correct; vidiffuse warns on out-of-distribution prompts",
         "evidence": (f"{ev['ood']['flagged']} of {ev['n']} golden prompts flagged OOD"
                      if ev and "flagged" in ev.get("ood", {}) else NOT_MEASURED)},
        {"risk": "Information Integrity", "applies": "yes" if not procedural else "yes (low)",
         "why": ("synthetic video can be mistaken for real footage; shapes-world clips are unlikely to deceive, "
                 "but the marking is the same for every model" if procedural else
                 "synthetic video can be mistaken for real footage"),
         "evidence": "watermark (on by default) + signed C2PA manifest; " + watermark_evidence(facts["watermark"])},
        {"risk": "Information Security", "applies": "yes",
         "why": "model files from others can carry code; the model's prompt interface takes untrusted text",
         "evidence": f"pickle-free weights: {facts['model']['pickle_free']}"},
        {"risk": "Intellectual Property", "applies": "no" if procedural else "yes",
         "why": (f"{shapes_only}, generated by this project: no third-party works" if procedural else
                 "trained on footage whose licences the data manifest must record; generated videos may reproduce it"),
         "evidence": (f"manifest sha256 {facts['model']['manifest_sha256']}" if facts["model"]["manifest_sha256"]
                      else "no training data manifest hash recorded")
                     + (f"; memorization: {len(mem['flagged'])} flagged" if mem else f"; memorization {NOT_MEASURED}")},
        content_risk("Obscene, Degrading, and/or Abusive Content"),
        {"risk": "Value Chain and Component Integration", "applies": "yes",
         "why": "the model depends on third-party components: the text encoder and the diffusers library",
         "evidence": f"text encoder: {facts['model']['index'].get('text_encoder', 'not recorded')}; "
                     f"vidiffuse {vidiffuse_version}"},
    ]


# ---------------------------------------------------------------- rendering


def _display(path: str) -> str:
    """Paths inside the installed package are shown relative to it: absolute ones mean nothing elsewhere."""
    try:
        return "vidiffuse/weights/" + str(Path(path).resolve().relative_to(WEIGHTS_DIR.resolve()))
    except ValueError:
        return path


def _table(header: list[str], rows: list[list]) -> list[str]:
    clean = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(clean(c) for c in row) + " |" for row in rows]


def render_markdown(facts: dict, risk: dict) -> str:
    model, training, ev, mem, bias = facts["model"], facts["training"], facts["eval"], facts["memorization"], facts["bias"]
    procedural = _data_kind(training) == "shapes"
    idx = model["index"]
    L = [f"# Model card: {model['name']}", "",
         f"_Generated by `vidiffuse govern card` (vidiffuse {vidiffuse_version}) from the files listed under "
         "*Inputs*; every number below is measured. Anything not given is marked “{NOT_MEASURED}”._".replace(
             "{NOT_MEASURED}", NOT_MEASURED), "",
         "## Model details", ""]
    rows = [["directory", model["path"]], ["parameters (total)", f"{model['parameters']:,}"]]
    for name, c in model["components"].items():
        rows.append([name, f"{c['class']}, {c['parameters']:,} parameters" if c["parameters"] else c["class"]])
    rows += [["text encoder", idx.get("text_encoder", "not recorded")],
             ["output", f"{idx.get('frames')} frames, {idx.get('size')}×{idx.get('size')} px, {idx.get('fps')} fps"],
             ["sampling defaults", ", ".join(f"{k} {v}" for k, v in idx.get("defaults", {}).items())],
             ["weight files", ", ".join(model["weight_files"]) or "none found"]]
    if "transformer" in model["components"]:
        cfg = model["components"]["transformer"]["config"]
        rows.append(["transformer config", ", ".join(f"{k} {cfg[k]}" for k in ("patch_size", "hidden_size", "depth",
                                                                              "num_heads") if k in cfg)])
    L += _table(["", ""], rows) + [""]

    L += ["## Intended use", ""]
    if procedural:
        L += ["- Intended: generating clips of the procedural shapes world (one coloured circle, square or triangle, "
              "small or large, moving or still, on a plain background); a test bed with measurable ground truth for "
              "evaluation, compression, provenance and serving; teaching and CPU demos.",
              "- Out of scope: anything outside the shapes world — prompts about people, places or events still "
              "give shapes-world videos; any use where the video is taken as evidence of a real event; decisions "
              "about people.", ""]
    else:
        L += ["- Intended use: not recorded for this model's training data; state it before release.",
              "- Out of scope: any use where the video is taken as evidence of a real event; decisions about people; "
              "prompts far from the training captions (vidiffuse warns on them).", ""]

    L += ["## Training data", ""]
    L.append(f"- Manifest SHA-256 (`model_index.json` `training_data_manifest_sha256`): "
             f"{model['manifest_sha256'] or 'not recorded in model_index.json'}")
    if facts["manifest"].get("sha256"):
        state = {True: "matches the model's", False: "does NOT match the model's", None: "cannot be compared (the model records none)"}
        L.append(f"- Data manifest `{_display(facts['manifest']['path'])}`: SHA-256 {facts['manifest']['sha256']}, "
                 f"{state[facts['manifest']['matches']]}")
        summary = facts["manifest"].get("summary", {})
        if summary:
            licence = summary.get("license")
            licence = ", ".join(map(str, licence)) if isinstance(licence, list) else licence
            L.append(f"- Dataset: {summary.get('name', 'unnamed')}; licence: {licence or 'not stated'}"
                     + (f"; {summary['description']}" if summary.get("description") else ""))
    if not training:
        L.append(f"- Training record: {NOT_MEASURED} (no `training/` folder in the model directory)")
    for stage, s in training.items():
        data, run, met = s["config"].get("data", {}), s["config"].get("run", {}), s["metrics"] or {}
        desc = ", ".join(f"{k} {v}" for k, v in data.items())
        L.append(f"- {stage}: data ({desc}); configured {run.get('steps')} steps × batch {run.get('batch_size')}, "
                 f"lr {run.get('lr')}, precision {run.get('precision')}; last logged step "
                 f"{_fmt(met.get('last_logged_step'))}, final loss {_fmt(met.get('final_loss'))}, "
                 f"training time {_fmt(met['training_seconds'] / 3600 if met.get('training_seconds') else None)} h")
        if met.get("last_eval"):
            e = met["last_eval"]
            L.append(f"  - last in-training evaluation (step {e['step']}): " +
                     ", ".join(f"{k} {_fmt(v)}" for k, v in e["eval"].items()))
    L.append("")

    L += ["## Evaluation", ""]
    if ev is None:
        L += [f"Evaluation: {NOT_MEASURED} (no `vidiffuse eval` report given).", ""]
    else:
        m, s = ev["metrics"], ev.get("settings", {})
        L.append(f"`vidiffuse eval` on {ev.get('n')} prompts of golden set `{ev.get('golden_set')}` "
                 f"({', '.join(f'{k} {v}' for k, v in s.items())}).")
        L.append("")
        rows = [[f"adherence {a}", _fmt(m.get(f"adherence_{a}")), f"{t:.2f}",
                 "" if m.get(f"adherence_{a}") is None else ("met" if m[f"adherence_{a}"] >= t else "below")]
                for a, t in ADHERENCE_TARGETS.items()]
        ci = ev.get("fvd_shapes_ci95")
        rows += [["adherence mean", _fmt(m.get("adherence_mean")), "", ""],
                 ["FVD (shapes encoder)", _fmt(m.get("fvd_shapes")) + (f" (95% CI {ci[0]:.1f}–{ci[1]:.1f})" if ci else ""), "", ""]]
        rows += [[k.replace("_", " "), _fmt(m[k]), "", ""] for k in
                 ("object_stability", "temporal_flicker", "motion_smoothness", "subject_consistency",
                  "background_consistency", "clip_score", "seconds_per_video", "peak_memory_mb") if k in m]
        L += _table(["metric", "value", "target", ""], rows) + [""]
        phr = ev.get("ood", {}).get("by_phrasing")
        if phr:
            L += ["Adherence by prompt phrasing: " + "; ".join(f"{k} {v['adherence_mean']:.3f} (n={v['n']})"
                                                           for k, v in phr.items()), ""]
        if ev.get("machine"):
            L += [f"Timings measured on: {ev['machine'].get('processor') or ev['machine'].get('platform')}, "
                  f"{ev['machine'].get('cpus')} CPUs, torch {ev['machine'].get('torch')}.", ""]

    L += ["## Limitations", ""]
    L += [f"- {x}" for x in facts["limitations"]] or [f"- None derived: {NOT_MEASURED} inputs limit what can be "
                                                      "said (see *Evaluation*, *Memorization*, *Bias*)."]
    L.append("")

    L += ["## Memorization", ""]
    if mem is None:
        L += [f"Memorization: {NOT_MEASURED} (no memorization report given).", ""]
    else:
        L += [f"{len(mem['flagged'])} of {mem['n_generated']} generated videos were flagged as near copies of one of "
              f"{mem['n_training']} training clips (metric `{mem['metric']}`, threshold {mem['threshold']}).", ""]
        if mem.get("metric_definition"):
            L += [f"Metric: {mem['metric_definition']}", ""]
        if mem.get("threshold_note"):
            L += [f"Threshold: {mem['threshold_note']}", ""]
        nearest = mem.get("nearest_similarity")
        if isinstance(nearest, dict) and {"max", "median", "min"} <= set(nearest):
            L += [f"Similarity of each generated video to its nearest training clip: max {nearest['max']:.4f}, "
                  f"median {nearest['median']:.4f}, min {nearest['min']:.4f}.", ""]
        if mem["flagged"]:
            rows = [[f.get("generated", ""), f.get("training", ""), _fmt(f.get("similarity"), 4)]
                    for f in mem["flagged"][:10] if isinstance(f, dict)]
            L += _table(["generated", "nearest training clip", "similarity"], rows) + [""]
            if len(mem["flagged"]) > 10:
                L += [f"… and {len(mem['flagged']) - 10} more in the memorization report.", ""]

    L += ["## Bias", ""]
    if bias is None:
        L += [f"Bias audit: {NOT_MEASURED} (no bias report given).", ""]
    else:
        L += [f"Prompts that leave one attribute unsaid ({bias.get('n_per_attribute')} videos per attribute, "
              f"classifier: {bias.get('classifier')}); expected distribution: "
              f"{bias.get('expected_source', {}).get('source')}. {bias['test']}, alpha {bias['alpha']} with a "
              f"Bonferroni correction over {bias['n_tests']} attributes (alpha {bias['alpha_corrected']:.3g}).", ""]
        rows = []
        for a, r in bias["attributes"].items():
            over, under = r.get("most_over"), r.get("most_under")
            rows.append([a, r["n"], r["unreadable"], _fmt(r["chi2"]), _fmt(r["dof"]), _fmt(r["p_value"]),
                         "FLAGGED" if r["significant"] else ("unreliable (small n)" if not r["reliable"] else "no"),
                         f"{over['value']} ({over['observed']:.2f} vs {over['expected']:.2f})" if over else "",
                         f"{under['value']} ({under['observed']:.2f} vs {under['expected']:.2f})" if under else ""])
        L += _table(["attribute", "n read", "unreadable", "chi²", "dof", "p", "flagged",
                     "most over-represented (observed vs expected)", "most under-represented"], rows) + [""]
        stated = {a: ev["metrics"][f"adherence_{a}"] for a in bias["attributes"]
                  if ev is not None and f"adherence_{a}" in ev["metrics"]}
        if stated:
            # the audit's classifier is the adherence analyzer: where the model renders an attribute unreliably,
            # the unsaid-prompt distribution mixes a learned default with rendering errors
            L += ["How reliably the model renders each attribute when the prompt does state it (eval adherence): "
                  + ", ".join(f"{a} {v:.3f}" for a, v in stated.items())
                  + ". A skew in a poorly rendered attribute may reflect rendering errors as much as a default.", ""]

    L += ["## Provenance marking", ""]
    L += ["Every MP4 that `vidiffuse generate` writes carries a signed C2PA manifest (model, settings, prompt hash, training "
          "data manifest hash), and its pixels carry an invisible watermark: marking is on by default. "
          "`--no-watermark` turns the pixel mark off, and the signed manifest records that it was off. "
          "`vidiffuse verify FILE` checks both the watermark and the manifest.", ""]
    wm = facts["watermark"]
    if wm is None:
        L += [f"Watermark robustness: {NOT_MEASURED} (no watermark benchmark result given; "
              "`benchmarks/watermark.py` writes one).", ""]
    else:
        L += [f"Measured by `benchmarks/watermark.py` on {wm['n']} generated videos (method `{wm['method']}`, "
              f"detected when p ≤ {wm['threshold_p_value']:g}): PSNR of marked against unmarked "
              f"{wm['psnr_db']['mean']:.1f} dB mean, {wm['psnr_db']['min']:.1f} dB min"
              + (f"; marking adds {100 * wm['embed_overhead']:.1f}% to generation time"
                 if isinstance(wm.get("embed_overhead"), (int, float)) else "") + ".", ""]
        L += _table(["edit applied to the marked video", "n", "detection rate", "bit accuracy"],
                    [[name, a["n"], f"{a['detection_rate']:.3f}", f"{a['bit_accuracy']:.3f}"]
                     for name, a in wm["attacks"].items()]) + [""]
        L += _table(["unmarked set", "n", "false positives"],
                    [[name, u["n"], u["false_positives"]] for name, u in wm["unmarked"].items()]) + [""]

    L += ["## Risks (NIST AI RMF)", ""]
    L += _table(["function", "risk", "what vidiffuse does", "evidence"],
                [[r["function"], r["risk"], r["action"], r["evidence"]] for r in risk["nist_ai_rmf"]]) + [""]
    L += ["## Generative-AI risks (NIST AI 600-1)", ""]
    L += _table(["risk", "applies", "why", "evidence"],
                [[r["risk"], r["applies"], r["why"], r.get("evidence", "")] for r in risk["nist_ai_600_1"]]) + [""]

    L += ["## Inputs", ""]
    L += _table(["input", "file", "sha256"],
                [[k, (v["path"] or "in memory") if v else NOT_MEASURED + " (not given)", (v or {}).get("sha256") or ""]
                 for k, v in facts["inputs"].items()]) + [""]
    return "\n".join(L)


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)
    return re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"<em>\1</em>", text)


def markdown_to_html(markdown: str, title: str) -> str:
    """HTML for the Markdown this module writes (headings, tables, two-level lists, paragraphs) — no general parser."""
    body, open_list, in_table = [], 0, False

    def close(depth: int = 0) -> None:
        nonlocal open_list, in_table
        while open_list > depth:
            body.append("</li></ul>")
            open_list -= 1
        if in_table and depth == 0:
            body.append("</tbody></table>")
            in_table = False

    for line in markdown.splitlines():
        if line.startswith("|"):
            if re.fullmatch(r"\|(---\|)+", line):
                continue
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if not in_table:
                close()
                body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells)
                            + "</tr></thead><tbody>")
                in_table = True
            else:
                body.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
            continue
        bullet = re.match(r"( *)- (.*)", line)
        if bullet:
            depth = len(bullet.group(1)) // 2 + 1
            if depth > open_list:
                body.append("<ul><li>")
                open_list += 1
            else:
                close(depth)
                body.append("</li><li>")
            body.append(_inline(bullet.group(2)))
            continue
        close()
        if line.startswith("## "):
            body.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    close()
    style = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;line-height:1.4}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em;"
             "vertical-align:top;text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 .2em}")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------- entry point


def write_model_card(model_dir_or_name, out_dir, eval_report=None, memorization=None, bias=None,
                     data_manifest=None, watermark=None) -> dict[str, Path]:
    """Write `MODEL_CARD.md`, `MODEL_CARD.html` and `risk_report.json` into `out_dir`; inputs are paths or loaded dicts, None = not measured."""
    from ..pipeline import resolve_model_path

    path = resolve_model_path(model_dir_or_name)
    ev, ev_src = _load_json(eval_report, "eval report")
    mem, mem_src = _load_json(memorization, "memorization report")
    bi, bi_src = _load_json(bias, "bias report")
    wm, wm_src = _load_json(watermark, "watermark benchmark result")
    ev = _check_eval(ev, (ev_src or {}).get("path") or "the eval report") if ev is not None else None
    mem = _check_memorization(mem, (mem_src or {}).get("path") or "the memorization report") if mem is not None else None
    bi = _check_bias(bi, (bi_src or {}).get("path") or "the bias report") if bi is not None else None
    wm = _check_watermark(wm, (wm_src or {}).get("path") or "the watermark benchmark result") if wm is not None else None
    model = model_facts(path)
    manifest = {}
    shipped = path / "training" / "data_manifest.json"
    if data_manifest is None and shipped.is_file():
        data_manifest = shipped  # the manifest a model directory ships is checked like a given one
    if data_manifest is not None:
        manifest_path = Path(data_manifest)
        if not manifest_path.is_file():
            raise ConfigError(f"data manifest not found: {manifest_path}")
        digest = sha256_file(manifest_path)
        manifest = {"path": str(manifest_path), "sha256": digest,
                    "matches": None if model["manifest_sha256"] is None else digest == model["manifest_sha256"],
                    "summary": _manifest_summary(manifest_path)}
    training = training_facts(path)
    seconds = [s["metrics"]["training_seconds"] for s in training.values()
               if s["metrics"] and s["metrics"].get("training_seconds")]
    facts = {"model": model, "training": training, "eval": ev, "memorization": mem, "bias": bi, "watermark": wm,
             "manifest": manifest, "training_hours": sum(seconds) / 3600 if seconds else None,
             "inputs": {"eval": ev_src, "memorization": mem_src, "bias": bi_src, "watermark": wm_src,
                        "data_manifest": {"path": _display(manifest["path"]), "sha256": manifest["sha256"]} if manifest else None}}
    facts["limitations"] = limitations(ev, bi, mem, wm)
    risk = {"version": RISK_REPORT_VERSION, "model": model["name"], "model_path": model["path"],
            "vidiffuse": vidiffuse_version, "inputs": facts["inputs"],
            "measured": {"eval": ev is not None, "memorization": mem is not None, "bias": bi is not None,
                         "watermark": wm is not None,
                         "training_data_manifest": model["manifest_sha256"] is not None},
            "limitations": facts["limitations"]}
    risk["nist_ai_rmf"] = rmf_rows(facts)
    risk["nist_ai_rmf_functions"] = {f: [r["risk"] for r in risk["nist_ai_rmf"] if r["function"] == f]
                                     for f in RMF_FUNCTIONS}
    risk["nist_ai_600_1"] = gai_risks(facts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(facts, risk) + "\n"
    card_path = write_atomic(out / "MODEL_CARD.md", markdown)
    html_path = write_atomic(out / "MODEL_CARD.html", markdown_to_html(markdown, f"Model card: {model['name']}"))
    risk_path = write_atomic(out / "risk_report.json", json.dumps(risk, indent=2) + "\n")
    return {"card": card_path, "html": html_path, "risk_report": risk_path}
