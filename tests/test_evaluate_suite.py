"""`vidiffuse eval`: golden set, determinism, sensitivity (real ≺ model ≺ 2 steps ≺ noise), regression gate."""

import copy
import json

import numpy as np
import pytest
import torch

from vidiffuse.errors import ConfigError
from vidiffuse.evaluate import suite
from vidiffuse.evaluate.fvd import fvd_from_features
from vidiffuse.evaluate.shapes_encoder import load_shapes_video_encoder, shapes_video_features
from vidiffuse.pipeline import VideoPipeline

N = 24  # enough for the rankings below to hold with a wide margin; the full eval uses 256


def fake_report(**metrics):
    return {"golden_set": "shapes_v1", "n": 8, "settings": {"steps": 20, "guidance": 4.0, "sampler": "unipc"},
            "metrics": metrics}


def test_golden_set_is_fixed_and_balanced():
    items = suite.load_golden()
    assert len(items) == 256 and len({i.seed for i in items}) == 256
    assert {i.phrasing for i in items} == {"training", "heldout", "heldout-rare"}
    sub = suite.load_golden(n=24)
    assert len(sub) == 24 and {i.phrasing for i in sub} == {"training", "heldout", "heldout-rare"}
    assert sub == suite.load_golden(n=24)
    with pytest.raises(ConfigError, match="between 2 and 256"):
        suite.load_golden(n=1000)
    with pytest.raises(ConfigError, match="no golden set"):
        suite.load_golden("nope")


def test_gate_follows_each_metrics_direction_and_tolerance():
    base = fake_report(fvd_shapes=10.0, adherence_mean=0.80, seconds_per_video=1.0)
    assert suite.gate(base, base) == []
    # better in both directions passes
    assert suite.gate(fake_report(fvd_shapes=5.0, adherence_mean=0.9, seconds_per_video=0.5), base) == []
    worse = fake_report(fvd_shapes=12.0, adherence_mean=0.70, seconds_per_video=1.2)
    failures = suite.gate(worse, base)
    assert [f.split(":")[0] for f in failures] == ["fvd_shapes", "adherence_mean"]  # +20% time is within 50%
    assert suite.gate(worse, base, {"*": 0.25}) == []
    assert [f.split(":")[0] for f in suite.gate(worse, base, {"*": 0.25, "fvd_shapes": 0.1})] == ["fvd_shapes"]


def test_compare_and_tolerance_parsing():
    rows = {r["metric"]: r for r in suite.compare(fake_report(fvd_shapes=5.0, dynamic_degree=2.0),
                                                  fake_report(fvd_shapes=10.0, dynamic_degree=1.0))}
    assert rows["fvd_shapes"]["verdict"] == "better" and rows["fvd_shapes"]["change"] == -5.0
    assert rows["dynamic_degree"]["verdict"] == "changed"  # no better direction for the amount of motion
    assert suite.parse_tolerances(["0.1", "fvd_shapes=0.3"]) == {"*": 0.1, "fvd_shapes": 0.3}
    for bad in (["fvd=0.1"], ["x"], ["adherence_mean=-1"]):
        with pytest.raises(ConfigError):
            suite.parse_tolerances(bad)


@pytest.fixture(scope="module")
def pipe():
    return VideoPipeline.from_pretrained("shapes")


@pytest.fixture(scope="module")
def default_run(pipe):
    return suite.evaluate_model(pipe, n=N)


def test_eval_is_deterministic(pipe, default_run):
    again, videos = suite.evaluate_model(pipe, n=N)
    timing = {"seconds_per_video", "peak_memory_mb"}
    assert {k: v for k, v in again["metrics"].items() if k not in timing} == \
        {k: v for k, v in default_run[0]["metrics"].items() if k not in timing}
    assert all(np.array_equal(a, b) for a, b in zip(videos, default_run[1]))
    assert suite.gate(again, default_run[0]) == []


def test_fvd_ranks_real_model_few_steps_noise(pipe, default_run):
    encoder = load_shapes_video_encoder()
    items = suite.load_golden(n=N)
    real = shapes_video_features(suite.real_clips(items), encoder)
    other_real = shapes_video_features(suite.real_clips(items, seed=7), encoder)
    two_steps, _ = suite.evaluate_model(pipe, n=N, steps=2)
    noise = np.random.default_rng(0).integers(0, 256, (N, 16, 64, 64, 3), dtype=np.uint8)
    fvd = {
        "real": fvd_from_features(real, other_real, bootstrap=0)["fvd"],
        "model": default_run[0]["metrics"]["fvd_shapes"],
        "2 steps": two_steps["metrics"]["fvd_shapes"],
        "noise": fvd_from_features(real, shapes_video_features(list(noise), encoder), bootstrap=0)["fvd"],
    }
    assert fvd["real"] < fvd["model"] < fvd["2 steps"] < fvd["noise"], fvd
    assert two_steps["metrics"]["adherence_mean"] < default_run[0]["metrics"]["adherence_mean"]


def test_gate_catches_perturbed_weights(pipe, default_run):
    broken = copy.copy(pipe)
    broken.transformer = copy.deepcopy(pipe.transformer)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in broken.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.std().nan_to_num(0))
    report, _ = suite.evaluate_model(broken, n=N)
    failures = suite.gate(report, default_run[0])
    failed = {f.split(":")[0] for f in failures}
    assert "fvd_shapes" in failed and "adherence_mean" in failed, failures


def test_report_files(tmp_path, default_run):
    from vidiffuse.evaluate.html import write_report

    report, videos = default_run
    html = write_report(tmp_path, report, videos, baseline=report, gate=[])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["metrics"] == report["metrics"] and saved["n"] == N
    text = html.read_text()
    assert "Regression gate: PASSED" in text and text.count("data:image/png;base64,") >= 2
    assert not list(tmp_path.glob("*.tmp"))


def test_eval_cli_writes_reports_gates_and_compares(tiny_bundle, tmp_path):
    from conftest import run_cli

    args = ("eval", "--model", tiny_bundle, "--n", 6, "--steps", 2, "--sweep-n", 2)
    first = run_cli(*args, "--out", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["n"] == 6 and {(s["sampler"], s["steps"]) for s in report["sweep"]} == \
        {(name, k) for name, ks in suite.SWEEP.items() for k in ks}
    assert (tmp_path / "a" / "report.html").read_text().count("data:image/png;base64,") == 3

    gated = run_cli(*args, "--no-sweep", "--out", tmp_path / "b", "--baseline", tmp_path / "a" / "report.json")
    assert gated.returncode == 0 and "regression gate passed" in gated.stderr, gated.stderr

    compared = run_cli("eval", "compare", tmp_path / "a" / "report.json", tmp_path / "b" / "report.json")
    assert compared.returncode == 0 and "adherence_mean" in compared.stdout and "same" in compared.stdout

    # a baseline that claims much better quality fails the gate, naming the metric
    better = {**report, "metrics": {**report["metrics"], "adherence_color": report["metrics"]["adherence_color"] + 0.5}}
    (tmp_path / "better.json").write_text(json.dumps(better))
    failed = run_cli(*args, "--no-sweep", "--out", tmp_path / "c", "--baseline", tmp_path / "better.json")
    assert failed.returncode == 1 and "adherence_color" in failed.stderr and "Traceback" not in failed.stderr


def test_eval_cli_bad_input(tiny_bundle, tmp_path):
    from conftest import run_cli

    (tmp_path / "junk.json").write_text("{not json")
    for extra, needle in (((  "--tolerance", "fvd=0.1"), "unknown metric"),
                          (("--baseline", tmp_path / "junk.json"), "not valid JSON"),
                          (("--baseline", tmp_path / "missing.json"), "report not found"),
                          (("--n", 5000), "between 2 and 256")):
        proc = run_cli("eval", "--model", tiny_bundle, "--out", tmp_path / "o", *extra)
        assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
