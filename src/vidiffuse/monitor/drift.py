"""Is today's traffic still like the reference? One two-sample test per signal, Holm-corrected.

Reference window: the pinned set (`MonitorStore.pin_reference`) if there is one, else the first
`reference_size` observations of the current model version. Current window: the newest `window_size`
observations after the reference. Windows are per model version by default, so deploying a new model
starts a new reference instead of alarming forever; whether the new model is good is the eval gate's
and the canary's question, not drift's.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..data.shapes import ATTRIBUTES
from ..errors import ConfigError
from .observe import TEMPORAL_SIGNALS
from .stats import (
    categorical_permutation_test,
    holm,
    ks_test,
    mmd_permutation_test,
    share_test,
)
from .store import MonitorStore, Observations


def _insufficient(reason: str, test: str, ref_n: int, cur_n: int) -> dict:
    return {"test": test, "status": "insufficient", "reason": reason, "statistic": None, "p_value": None,
            "p_adjusted": None, "drift": None, "reference_n": ref_n, "current_n": cur_n}


def _embedding_signal(ref: Observations, cur: Observations, attr: str, permutations: int) -> dict:
    a, b = getattr(ref, attr), getattr(cur, attr)
    if a.shape[1] == 0 or b.shape[1] == 0 or a.shape[1] != b.shape[1] or np.isnan(a).any() or np.isnan(b).any():
        return _insufficient("embeddings of different sizes (windows span different encoders)", "mmd_rbf_permutation",
                             len(a), len(b))
    stat, p = mmd_permutation_test(a, b, permutations=permutations)
    return {"test": "mmd_rbf_permutation", "statistic": stat, "p_value": p, "reference_n": len(a), "current_n": len(b),
            "permutations": permutations}


def _attribute_signal(ref: Observations, cur: Observations, attribute: str, permutations: int) -> dict:
    a = [v for v in ref.attributes.get(attribute, []) if v is not None]
    b = [v for v in cur.attributes.get(attribute, []) if v is not None]
    if len(a) < 2 or len(b) < 2:
        return _insufficient(f"fewer than 2 readings of {attribute} in a window", "chi2_permutation", len(a), len(b))
    stat, p = categorical_permutation_test(a, b, permutations=permutations)
    shares = lambda v: {c: round(v.count(c) / len(v), 4) for c in sorted(set(v))}
    return {"test": "chi2_permutation", "statistic": stat, "p_value": p, "reference_n": len(a), "current_n": len(b),
            "permutations": permutations, "reference_shares": shares(a), "current_shares": shares(b)}


def _ood_signal(ref: Observations, cur: Observations) -> dict:
    a, b = ref.ood[~np.isnan(ref.ood)], cur.ood[~np.isnan(cur.ood)]
    if len(a) == 0 or len(b) == 0:
        return _insufficient("no OOD flags (the model ships no OOD reference)", "fisher_exact_one_sided",
                             len(a), len(b))
    diff, p = share_test(int(a.sum()), len(a), int(b.sum()), len(b))
    return {"test": "fisher_exact_one_sided", "statistic": diff, "p_value": p, "reference_n": len(a),
            "current_n": len(b), "reference_share": float(a.mean()), "current_share": float(b.mean())}


def _scalar_signal(ref: Observations, cur: Observations, name: str) -> dict:
    a, b = ref.temporal.get(name, np.zeros(0)), cur.temporal.get(name, np.zeros(0))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return _insufficient(f"fewer than 2 values of {name} in a window", "kolmogorov_smirnov", len(a), len(b))
    stat, p = ks_test(a, b)
    return {"test": "kolmogorov_smirnov", "statistic": stat, "p_value": p, "reference_n": len(a), "current_n": len(b),
            "reference_median": float(np.median(a)), "current_median": float(np.median(b))}


def _window_info(obs: Observations) -> dict:
    return {"n": len(obs), "first_id": int(obs.ids[0]) if len(obs) else None,
            "last_id": int(obs.ids[-1]) if len(obs) else None}


def _share(obs: Observations) -> float | None:
    known = obs.ood[~np.isnan(obs.ood)]
    return float(known.mean()) if len(known) else None


def compare_windows(ref: Observations, cur: Observations, alpha: float = 0.01, permutations: int = 2000,
                    insufficient: str | None = None) -> dict:
    """Test every signal of two windows of observations: {"signals": {...}, "drifted": [names]}.

    `insufficient`: a reason to mark every signal "insufficient" without testing (windows not full yet).
    """
    temporal = [n for n in TEMPORAL_SIGNALS if n in ref.temporal or n in cur.temporal]
    temporal += sorted(n for n in set(ref.temporal) | set(cur.temporal) if n not in temporal)
    attributes = [a for a in ATTRIBUTES if a in ref.attributes or a in cur.attributes]
    # signal -> (test, how to run it)
    plan = {
        "prompt_embedding": ("mmd_rbf_permutation", lambda b: _embedding_signal(ref, cur, "prompt_embeddings", b)),
        "ood_share": ("fisher_exact_one_sided", lambda b: _ood_signal(ref, cur)),
        "output_embedding": ("mmd_rbf_permutation", lambda b: _embedding_signal(ref, cur, "output_embeddings", b)),
        **{f"output_{a}": ("chi2_permutation", lambda b, a=a: _attribute_signal(ref, cur, a, b)) for a in attributes},
        **{t: ("kolmogorov_smirnov", lambda b, t=t: _scalar_signal(ref, cur, t)) for t in temporal},
    }
    # a permutation p-value is at least 1/(B+1); it must be able to fall below alpha / (number of tests)
    permutations = max(int(permutations), math.ceil(2 * len(plan) / alpha))
    signals = {name: _insufficient(insufficient, test, len(ref), len(cur)) if insufficient else run(permutations)
               for name, (test, run) in plan.items()}
    tested = [n for n, s in signals.items() if s.get("status") != "insufficient"]
    for name, adjusted in zip(tested, holm([signals[n]["p_value"] for n in tested])):
        s = signals[name]
        s["p_adjusted"] = adjusted
        s["drift"] = adjusted <= alpha
        s["status"] = "drift" if s["drift"] else "ok"
    return {"signals": signals, "drifted": [n for n in tested if signals[n]["drift"]]}


def drift_report(store: MonitorStore, reference_size: int = 200, window_size: int = 100, alpha: float = 0.01,
                 model_version: str | None = "current", permutations: int = 2000) -> dict:
    """Per signal: the test, its statistic, raw and Holm-adjusted p-value, and a drift flag.

    Signals: `prompt_embedding` and `output_embedding` (MMD permutation test), `ood_share` (one-sided
    Fisher), `output_<attribute>` for each shapes-world attribute the video encoder reads (χ² permutation
    test) and each temporal metric (Kolmogorov–Smirnov); see `stats` for why. A signal is flagged when
    its adjusted p-value ≤ `alpha`, so a report raises a false alarm with probability ≤ `alpha` when
    nothing changed. Until both windows are full, every signal is "insufficient".

    `model_version`: "current" (the newest observation's), a version string, or None for all rows.
    The permutation count is raised if needed so that the smallest possible p-value can pass the
    corrected threshold.
    """
    if reference_size < 2 or window_size < 2:
        raise ConfigError(f"reference_size and window_size must be at least 2, got {reference_size} and {window_size}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be between 0 and 1, got {alpha}")
    started = time.perf_counter()
    version = store.latest_model_version() if model_version == "current" else model_version
    pinned = store.pinned()
    if pinned is not None:
        ref, source, ref_full = pinned, "pinned", len(pinned) >= 2
    else:
        ref = store.first(reference_size, version)
        source, ref_full = "first", len(ref) == reference_size
    cur = store.last(window_size, version, after_id=int(ref.ids.max()) if len(ref) else 0)
    recent = cur if len(cur) == window_size else store.last(window_size, version)

    why = None
    if not ref_full:
        why = f"reference has {len(ref)} of {reference_size} observations"
    elif len(cur) < window_size:
        why = f"current window has {len(cur)} of {window_size} observations after the reference"
    tests = compare_windows(ref, cur, alpha=alpha, permutations=permutations, insufficient=why)
    signals, detected = tests["signals"], tests["drifted"]
    tested = [n for n, s in signals.items() if s["status"] != "insufficient"]
    return {
        "status": "insufficient" if not tested else "drift" if detected else "ok",
        "drift": bool(detected),
        "drifted": detected,
        "alpha": alpha,
        "correction": "holm",
        "model_version": version,
        "reference": {"source": source, **_window_info(ref)},
        "current": _window_info(cur),
        "ood_share": {"reference": _share(ref), "current": _share(recent), "current_n": len(recent)},
        "signals": signals,
        "computed_at": time.time(),
        "seconds": time.perf_counter() - started,
    }
