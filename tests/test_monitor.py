"""Drift monitoring and the canary on the bundled model and real shapes-world clips."""

import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from vidiffuse.cli import app
from vidiffuse.data import shapes
from vidiffuse.errors import ConfigError, ModelLoadError
from vidiffuse.monitor import (
    DEFAULT_PSNR_DB,
    MonitorCollector,
    MonitorStore,
    canary_due,
    default_reference_path,
    drift_report,
    load_canary_reference,
    observe_generation,
    observe_generations,
    run_canary,
    video_features,
)
from vidiffuse.monitor.stats import (
    categorical_permutation_test,
    holm,
    mmd_permutation_test,
    share_test,
)
from vidiffuse.pipeline import VideoPipeline

REFERENCE, WINDOW = 50, 30
CANARY = {"n": 2, "steps": 4}  # the smallest golden subset, few steps: the canary's logic, not its cost


@pytest.fixture(scope="module")
def pipe():
    return VideoPipeline.from_pretrained()


def clip(seed: int, **attributes) -> tuple[np.ndarray, str]:
    """A real shapes-world clip (attributes fixed where given, the rest random) and a caption of it."""
    rng = np.random.default_rng([seed, 77])
    spec = shapes.sample_clip_spec(rng, attributes=attributes)
    return shapes.render_clip(spec), shapes.sample_caption(spec, rng)


def off_world_prompts(n: int) -> list[str]:
    animals = ["cat", "dog", "horse", "parrot", "goat"]
    actions = ["playing the piano", "eating pasta", "reading a newspaper", "riding a bicycle"]
    places = ["in a kitchen", "on the moon", "at the beach"]
    return [f"a {a} {b} {c}" for a in animals for b in actions for c in places][:n]


def copy_store(store: MonitorStore, path) -> MonitorStore:
    with sqlite3.connect(store.path) as src, sqlite3.connect(path) as dst:
        src.backup(dst)
    return MonitorStore(path)


@pytest.fixture(scope="module")
def reference_store(pipe, tmp_path_factory):
    """REFERENCE observations of random clips with their captions; one recorded alone, the rest batched."""
    store = MonitorStore(tmp_path_factory.mktemp("monitor") / "service.sqlite")
    video, prompt = clip(0)
    observe_generation(store, pipe, prompt, video, job_id="job-0")
    pairs = [clip(seed) for seed in range(1, REFERENCE)]
    observe_generations(store, pipe, [p for _, p in pairs], [v for v, _ in pairs])
    return store


def with_window(reference_store, tmp_path, pipe, pairs):
    store = copy_store(reference_store, tmp_path / "service.sqlite")
    observe_generations(store, pipe, [p for _, p in pairs], [v for v, _ in pairs])
    return drift_report(store, reference_size=REFERENCE, window_size=WINDOW)


def test_observation_holds_the_prompt_and_video_statistics(reference_store, pipe):
    obs = reference_store.first(1)
    assert obs.ids.tolist() == [1] and reference_store.count() == REFERENCE
    assert obs.prompt_embeddings.shape == (1, 384) and obs.output_embeddings.shape == (1, 128)
    assert np.linalg.norm(obs.prompt_embeddings[0]) == pytest.approx(1, abs=2e-3)  # normalised, stored as fp16
    _, prompt = clip(0)
    # the OOD score is the model's own PromptOOD score, from the same embedding
    assert obs.ood_scores[0] == pytest.approx(pipe.prompt_ood(prompt)[0]["score"], abs=1e-5)
    assert obs.ood[0] == 0.0
    video0 = clip(0)[0]
    assert obs.attributes["background"][0] == shapes.analyze_video(video0)["background"]
    assert set(obs.attributes) == set(shapes.ATTRIBUTES)
    assert set(obs.temporal) == {"temporal_flicker", "subject_consistency", "background_consistency", "dynamic_degree"}
    assert obs.temporal["dynamic_degree"][0] >= 0 and 0 < obs.temporal["temporal_flicker"][0] <= 1
    with pytest.raises(ConfigError, match="uint8"):
        observe_generation(reference_store, pipe, prompt, video0.astype(np.float32))
    # a large video (a diffusers backend's) is read on a reduced copy: same readings, about the same cost
    big = np.repeat(np.repeat(np.concatenate([video0, video0, video0]), 3, axis=1), 3, axis=2)  # 48 × 192 × 192
    _, readings, temporal = video_features([big])
    assert readings[0]["background"] == obs.attributes["background"][0]
    assert np.isfinite(list(temporal[0].values())).all()


def test_same_distribution_is_not_drift(reference_store, tmp_path, pipe):
    report = with_window(reference_store, tmp_path, pipe, [clip(seed) for seed in range(1000, 1000 + WINDOW)])
    assert report["status"] == "ok" and not report["drift"], report["drifted"]
    assert report["reference"] == {"source": "first", "n": REFERENCE, "first_id": 1, "last_id": REFERENCE}
    assert report["current"]["n"] == WINDOW and report["current"]["first_id"] == REFERENCE + 1
    for name, s in report["signals"].items():
        assert s["status"] == "ok", name
        assert 0 < s["p_value"] <= s["p_adjusted"] <= 1, name
    # random clips of one world: no p-value anywhere near the corrected threshold
    assert min(s["p_value"] for s in report["signals"].values()) > 0.01


def test_white_backgrounds_drift_the_background_reading(reference_store, tmp_path, pipe):
    report = with_window(reference_store, tmp_path, pipe,
                         [clip(seed, background="white") for seed in range(2000, 2000 + WINDOW)])
    # the video encoder's background reading says what moved; colour, shape, size, direction did not
    assert "output_background" in report["drifted"]
    assert report["signals"]["output_background"]["current_shares"] == {"white": 1.0}
    assert not {"output_color", "output_shape", "output_size", "output_direction"} & set(report["drifted"])
    assert report["signals"]["ood_share"]["status"] == "ok"  # the prompts are still the world's


def test_off_world_prompts_drift_prompts_and_ood_share_only(reference_store, tmp_path, pipe):
    videos = [clip(seed)[0] for seed in range(3000, 3000 + WINDOW)]
    report = with_window(reference_store, tmp_path, pipe, list(zip(videos, off_world_prompts(WINDOW))))
    assert {"prompt_embedding", "ood_share"} <= set(report["drifted"])
    assert report["ood_share"] == {"reference": pytest.approx(report["signals"]["ood_share"]["reference_share"]),
                                   "current": 1.0, "current_n": WINDOW}
    # the videos are ordinary random clips: their side did not move
    assert not [name for name in report["drifted"] if name.startswith("output_")]
    assert report["signals"]["dynamic_degree"]["status"] == "ok"


def test_frozen_videos_drift_the_motion_metrics(reference_store, tmp_path, pipe):
    pairs = [clip(seed) for seed in range(4000, 4000 + WINDOW)]
    frozen = [(np.repeat(v[:1], len(v), axis=0), p) for v, p in pairs]
    report = with_window(reference_store, tmp_path, pipe, frozen)
    assert {"dynamic_degree", "temporal_flicker"} <= set(report["drifted"])
    assert report["signals"]["dynamic_degree"]["current_median"] == 0.0
    assert report["signals"]["prompt_embedding"]["status"] == "ok"


def test_insufficient_data_and_pinned_reference(reference_store, tmp_path):
    report = drift_report(reference_store, reference_size=REFERENCE, window_size=WINDOW)
    assert report["status"] == "insufficient" and not report["drift"]
    assert all(s["status"] == "insufficient" and s["p_value"] is None for s in report["signals"].values())
    assert "after the reference" in report["signals"]["prompt_embedding"]["reason"]
    store = copy_store(reference_store, tmp_path / "pinned.sqlite")
    assert store.pin_reference(n=20) == 20  # ids 31..50
    report = drift_report(store, reference_size=REFERENCE, window_size=WINDOW)
    assert report["reference"] == {"source": "pinned", "n": 20, "first_id": 31, "last_id": 50}
    assert report["status"] == "insufficient"  # nothing newer than the pinned rows yet
    store.unpin_reference()
    assert store.pinned() is None
    with pytest.raises(ConfigError):
        store.pin_reference(ids=[10_000])


def test_prune_keeps_reference_and_newest_rows(reference_store, tmp_path):
    store = copy_store(reference_store, tmp_path / "prune.sqlite")
    store.pin_reference(ids=[20, 21])
    assert store.prune(keep_last=5, keep_first=10) == REFERENCE - 5 - 10 - 2
    assert store.first(REFERENCE).ids.tolist() == [*range(1, 11), 20, 21, *range(46, 51)]


def test_two_sample_tests_are_calibrated():
    rng = np.random.default_rng(0)
    null = [mmd_permutation_test(rng.normal(size=(20, 4)), rng.normal(size=(20, 4)), permutations=200, seed=i)[1]
            for i in range(60)]
    assert 0.0 <= np.mean(np.array(null) <= 0.1) <= 0.2  # ~10% false alarms at level 0.1
    stat, p = mmd_permutation_test(rng.normal(size=(20, 4)), rng.normal(0.8, 1, size=(20, 4)), permutations=500)
    assert stat > 0 and p == pytest.approx(1 / 501)
    assert mmd_permutation_test(np.ones((5, 3)), np.ones((4, 3))) == (0.0, 1.0)
    assert share_test(1, 100, 1, 100)[1] > 0.5 and share_test(1, 100, 20, 100)[1] < 1e-4
    assert share_test(20, 100, 1, 100)[1] > 0.99  # fewer OOD prompts is not an alarm
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    stat, p = categorical_permutation_test(["a"] * 10 + ["b"] * 10, ["a"] * 10 + ["b"] * 10, permutations=300)
    assert stat == 0 and p == 1
    assert categorical_permutation_test(["a", "b"] * 10, ["b"] * 20, permutations=300)[1] == pytest.approx(1 / 301)


def test_two_processes_write_without_losing_rows(tmp_path):
    db = tmp_path / "shared.sqlite"
    MonitorStore(db)
    writer = textwrap.dedent(f"""
        import sys, numpy as np
        from vidiffuse.monitor.store import MonitorStore
        store = MonitorStore({str(db)!r}, timeout=60)
        for i in range(150):
            store.add_observation(np.ones(8), np.ones(4), {{"dynamic_degree": i}}, job_id=f"{{sys.argv[1]}}-{{i}}")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", writer, name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT job_id FROM monitor_observations").fetchall()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sorted(r[0] for r in rows) == sorted(f"{n}-{i}" for n in "ab" for i in range(150))


# ------------------------------------------------------------------ canary


@pytest.fixture(scope="module")
def canary_runs(pipe, reference_store, tmp_path_factory):
    """The default reference made on first run, a second run, then a run with perturbed weights."""
    home = tmp_path_factory.mktemp("canary")
    store = copy_store(reference_store, home / "service.sqlite")
    with pytest.MonkeyPatch.context() as mp:  # the autouse home fixture does not reach module fixtures
        mp.setenv("VIDIFFUSE_HOME", str(home))
        path = default_reference_path(pipe)
        first = run_canary(pipe, store, **CANARY)
        again = run_canary(pipe, store)
        weight = pipe.transformer.proj_out.weight
        saved = weight.detach().clone()
        try:
            with torch.no_grad():  # noise of the weights' own spread on the denoiser's output projection
                weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std())
            perturbed = run_canary(pipe, store)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
    return store, path, first, again, perturbed


def test_canary_passes_against_its_own_reference(canary_runs, pipe, tmp_path_factory):
    _, path, first, again, _ = canary_runs
    assert first["reference_created"] and path.is_file() and path.name == f"shapes@{pipe.version}.safetensors"
    assert path.is_relative_to(tmp_path_factory.getbasetemp())
    ref = load_canary_reference(path)
    assert ref["videos"].shape == (2, 16, 64, 64, 3) and ref["settings"]["steps"] == 4
    for run in (first, again):
        assert run["status"] == "passed" and run["passed"] and run["all_exact"]  # same machine: bit-identical
        assert run["worst_psnr_db"] is None and run["max_embedding_distance"] == 0.0
    assert not again["reference_created"] and again["reference"] == str(path)


def test_canary_fails_after_the_weights_change(canary_runs):
    store, _, _, _, perturbed = canary_runs
    assert perturbed["status"] == "failed" and not perturbed["passed"]
    assert perturbed["worst_psnr_db"] < DEFAULT_PSNR_DB and not perturbed["all_exact"]
    assert not any(v["match"] for v in perturbed["videos"])
    assert [r["status"] for r in store.canary_runs()] == ["failed", "passed", "passed"]
    assert not canary_due(store, 3600) and canary_due(store, 0)


def test_canary_refuses_a_reference_of_another_model(pipe, tiny_bundle, tmp_path):
    other = tmp_path / "tiny.safetensors"
    made = CliRunner().invoke(app, ["monitor", "canary-reference", "--model", str(tiny_bundle), "--out", str(other),
                                    "--n", "2"])
    assert made.exit_code == 0, made.output
    assert load_canary_reference(other)["model_name"] == "tiny"
    store = MonitorStore(tmp_path / "service.sqlite")
    result = run_canary(pipe, store, reference=other)
    assert result["status"] == "reference mismatch" and not result["passed"] and result["videos"] == []
    assert "tiny" in result["reason"] and pipe.version in result["reason"]
    assert store.last_canary_run()["status"] == "reference mismatch"
    metrics = scrape(store)
    assert metrics["vidiffuse_canary_reference_mismatch"][()] == 1
    assert metrics["vidiffuse_canary_last_passed"][()] == 0
    (tmp_path / "junk.safetensors").write_bytes(b"not a reference")
    with pytest.raises(ModelLoadError):
        run_canary(pipe, store, reference=tmp_path / "junk.safetensors")


# ------------------------------------------------------------------ Prometheus


def scrape(store, **options) -> dict:
    """Register a collector, render /metrics' text and parse it back: {sample name: {label value or (): value}}."""
    registry = CollectorRegistry()
    registry.register(MonitorCollector(store, **options))
    out: dict = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[next(iter(s.labels.values())) if s.labels else ()] = s.value
    return out


def test_metrics_parse_and_carry_drift_and_canary(canary_runs, pipe):
    store, *_ = canary_runs  # holds the reference observations too
    pairs = [clip(seed, background="white") for seed in range(2000, 2000 + WINDOW)]
    observe_generations(store, pipe, [p for _, p in pairs], [v for v, _ in pairs])
    m = scrape(store, reference_size=REFERENCE, window_size=WINDOW)
    assert m["vidiffuse_monitor_up"][()] == 1
    assert m["vidiffuse_monitor_observations"][()] == REFERENCE + WINDOW
    assert m["vidiffuse_drift_detected"]["output_background"] == 1 and m["vidiffuse_drift_detected"]["any"] == 1
    assert set(m["vidiffuse_drift_p_value"]) == {
        "prompt_embedding", "ood_share", "output_embedding", *(f"output_{a}" for a in shapes.ATTRIBUTES),
        "temporal_flicker", "subject_consistency", "background_consistency", "dynamic_degree"}
    assert all(0 < p <= 1 for p in m["vidiffuse_drift_p_value"].values())
    assert 0 <= m["vidiffuse_ood_share"][()] <= 0.2
    assert m["vidiffuse_canary_last_passed"][()] == 0  # the perturbed run was the last
    assert m["vidiffuse_canary_worst_psnr_db"][()] < DEFAULT_PSNR_DB
    assert m["vidiffuse_canary_runs_total"] == {"passed": 2, "failed": 1, "reference mismatch": 0, "error": 0}
    assert m["vidiffuse_canary_last_run_timestamp_seconds"][()] == pytest.approx(store.last_canary_run()["finished"])


def test_collector_caches_the_drift_report(reference_store):
    collector = MonitorCollector(reference_store, cache_seconds=60)
    first = collector.report()
    assert collector.report() is first
    assert MonitorCollector(reference_store, cache_seconds=0).report() is not first
