"""Drift and canary results as Prometheus metrics, computed from the store at scrape time."""

from __future__ import annotations

import logging
import math
import threading
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .drift import drift_report
from .store import MonitorStore

logger = logging.getLogger(__name__)


class MonitorCollector(Collector):
    """A custom collector: register it with a `CollectorRegistry` next to the service's own metrics.

    The drift report costs tens of milliseconds (two permutation tests), so it is cached for
    `cache_seconds`: a burst of scrapes computes it once. `drift_options` go to `drift_report`
    (reference_size, window_size, alpha, model_version, permutations).

    Metrics: vidiffuse_drift_p_value{signal} (Holm-adjusted: drift ⇔ p ≤ alpha), vidiffuse_drift_statistic,
    vidiffuse_drift_detected{signal} (signal="any" for the whole report), vidiffuse_drift_evaluated{signal}
    (0 while a window is not full), vidiffuse_ood_share, vidiffuse_ood_share_reference,
    vidiffuse_monitor_observations, vidiffuse_canary_last_passed, vidiffuse_canary_last_run_timestamp_seconds,
    vidiffuse_canary_worst_psnr_db (+Inf when bit-identical), vidiffuse_canary_max_embedding_distance,
    vidiffuse_canary_reference_mismatch, vidiffuse_canary_runs_total{status}, vidiffuse_monitor_up.
    """

    def __init__(self, store: MonitorStore, cache_seconds: float = 15.0, **drift_options):
        self.store, self.cache_seconds, self.drift_options = store, float(cache_seconds), drift_options
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None

    def describe(self):
        return []  # so registering does not run a drift report; metric names are fixed and prefixed anyway

    def report(self) -> dict:
        """The drift report, at most `cache_seconds` old."""
        with self._lock:  # concurrent scrapes wait for one computation instead of each running their own
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.cache_seconds:
                self._cached = (now, drift_report(self.store, **self.drift_options))
            return self._cached[1]

    def collect(self):
        up = GaugeMetricFamily("vidiffuse_monitor_up", "1 if drift and canary statistics could be read from the store.")
        try:
            report = self.report()
            observations = self.store.count()
            last = self.store.last_canary_run()
            counts = self.store.canary_counts()
        except Exception:  # /metrics must keep answering when the monitor tables cannot be read
            logger.exception("drift and canary metrics unavailable")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._drift_metrics(report, observations)
        yield from self._canary_metrics(last, counts)

    @staticmethod
    def _drift_metrics(report: dict, observations: int):
        p = GaugeMetricFamily("vidiffuse_drift_p_value", "Holm-adjusted p-value of the drift test per signal.",
                              labels=["signal"])
        stat = GaugeMetricFamily("vidiffuse_drift_statistic", "Two-sample test statistic per signal (MMD², "
                                 "KS distance, or OOD share difference).", labels=["signal"])
        detected = GaugeMetricFamily("vidiffuse_drift_detected", "1 if the signal drifted from the reference window "
                                     "(signal=\"any\": any of them).", labels=["signal"])
        evaluated = GaugeMetricFamily("vidiffuse_drift_evaluated", "1 if the signal was tested, 0 while there is "
                                      "not enough data.", labels=["signal"])
        for name, s in report["signals"].items():
            tested = s["status"] != "insufficient"
            evaluated.add_metric([name], 1 if tested else 0)
            if tested:
                p.add_metric([name], s["p_adjusted"])
                stat.add_metric([name], s["statistic"])
                detected.add_metric([name], 1 if s["drift"] else 0)
        detected.add_metric(["any"], 1 if report["drift"] else 0)
        yield from (p, stat, detected, evaluated)
        for name, value, text in (("vidiffuse_ood_share", report["ood_share"]["current"],
                                   "Share of out-of-distribution prompts among the most recent observations."),
                                  ("vidiffuse_ood_share_reference", report["ood_share"]["reference"],
                                   "Share of out-of-distribution prompts in the drift reference window.")):
            if value is not None:
                yield GaugeMetricFamily(name, text, value=value)
        yield GaugeMetricFamily("vidiffuse_monitor_observations", "Generations recorded for drift detection.",
                                value=observations)

    @staticmethod
    def _canary_metrics(last: dict | None, counts: dict[str, int]):
        runs = CounterMetricFamily("vidiffuse_canary_runs", "Canary runs by outcome.", labels=["status"])
        for status in ("passed", "failed", "reference mismatch", "error"):
            runs.add_metric([status], counts.get(status, 0))
        yield runs
        if last is None:
            return
        yield GaugeMetricFamily("vidiffuse_canary_last_passed", "1 if the last canary run matched its reference.",
                                value=1 if last["passed"] else 0)
        yield GaugeMetricFamily("vidiffuse_canary_last_run_timestamp_seconds", "When the last canary run finished.",
                                value=last["finished"])
        yield GaugeMetricFamily("vidiffuse_canary_reference_mismatch", "1 if the last canary run was refused: its "
                                "reference belongs to another model version.",
                                value=1 if last["status"] == "reference mismatch" else 0)
        if last.get("all_exact") is not None:
            worst = math.inf if last["all_exact"] else last["worst_psnr_db"]
            yield GaugeMetricFamily("vidiffuse_canary_worst_psnr_db", "Lowest PSNR of a golden video against its "
                                    "reference in the last run (+Inf: all bit-identical).", value=worst)
            yield GaugeMetricFamily("vidiffuse_canary_max_embedding_distance", "Largest relative video-encoder "
                                    "embedding distance to the reference in the last run.",
                                    value=last["max_embedding_distance"])
