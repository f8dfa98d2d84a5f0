"""Drift monitoring and the canary: catching silent regressions in a running service.

- `observe_generation`: the worker records each generation's prompt embedding, OOD flag, output
  embedding and temporal metrics in the service's SQLite file (`MonitorStore`).
- `drift_report`: a reference window against the newest window, one two-sample test per signal,
  Holm-corrected (see `stats` for the choice of tests).
- `run_canary`: regenerates golden prompts with fixed seeds and compares them with a stored reference.
- `MonitorCollector`: both as Prometheus metrics, computed at scrape time.
"""

from .canary import (
    DEFAULT_EMBEDDING_DISTANCE,
    DEFAULT_PSNR_DB,
    canary_due,
    default_reference_path,
    load_canary_reference,
    make_canary_reference,
    psnr,
    run_canary,
)
from .drift import compare_windows, drift_report
from .metrics import MonitorCollector
from .observe import (
    TEMPORAL_SIGNALS,
    observe_generation,
    observe_generations,
    prompt_features,
    video_features,
)
from .store import MonitorStore, Observations

__all__ = [
    "DEFAULT_EMBEDDING_DISTANCE",
    "DEFAULT_PSNR_DB",
    "TEMPORAL_SIGNALS",
    "MonitorCollector",
    "MonitorStore",
    "Observations",
    "canary_due",
    "compare_windows",
    "default_reference_path",
    "drift_report",
    "load_canary_reference",
    "make_canary_reference",
    "observe_generation",
    "observe_generations",
    "prompt_features",
    "psnr",
    "run_canary",
    "video_features",
]
