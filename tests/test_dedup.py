import json
import shutil

import numpy as np
import pytest

from conftest import disguised_copy, run_cli
from vidiffuse.data.dedup import dedup_report, find_duplicates, find_leakage, format_report
from vidiffuse.data.shapes import synthesize
from vidiffuse.errors import ConfigError


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    base = tmp_path_factory.mktemp("splits")
    train = synthesize(base / "train", 6, seed=11, progress=False)
    evaluation = synthesize(base / "eval", 4, seed=12, progress=False)
    shutil.copy(train / "000001.mp4", evaluation / "copied.mp4")
    disguised_copy(train / "000003.mp4", evaluation / "reencoded.mp4", crf=32, brightness=-15)
    (evaluation / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    return train, evaluation


def test_leakage_finds_copied_and_reencoded_clips(splits):
    train, evaluation = splits
    report = find_leakage(train, evaluation)
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    assert set(pairs) == {("000001.mp4", "copied.mp4"), ("000003.mp4", "reencoded.mp4")}
    assert pairs["000001.mp4", "copied.mp4"]["identical_bytes"] is True
    assert pairs["000001.mp4", "copied.mp4"]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert pairs["000001.mp4", "copied.mp4"]["phash_distance"] == 0
    assert pairs["000003.mp4", "reencoded.mp4"]["identical_bytes"] is False
    assert report["n_evaluation_leaked"] == 2 and report["leaked_evaluation_clips"] == ["copied.mp4", "reencoded.mp4"]
    assert report["n_train"] == 6 and report["n_evaluation"] == 6
    assert [e["error"] for e in report["errors"]] and report["errors"][0]["file"].endswith("corrupt.mp4")
    text = format_report(report)
    assert text.startswith("leakage: 2 pair(s)") and "2 of 6 evaluation clips" in text and "corrupt.mp4" in text


def test_near_duplicates_within_one_folder_form_a_group(splits, tmp_path):
    train, _ = splits
    root = tmp_path / "ds"
    shutil.copytree(train, root)
    shutil.copy(root / "000002.mp4", root / "dup_a.mp4")
    disguised_copy(root / "000002.mp4", root / "sub" / "dup_b.mp4", crf=26, brightness=10)
    report = dedup_report(root)
    assert report["check"] == "near_duplicates" and report["n_clips"] == 8
    assert report["n_pairs"] == 3 and report["groups"] == [["000002.mp4", "dup_a.mp4", "sub/dup_b.mp4"]]
    assert report["n_redundant_clips"] == 2
    clean = find_duplicates(train)
    assert clean["n_pairs"] == 0 and clean["groups"] == []
    assert "0 pair(s)" in format_report(clean)


def test_threshold_and_folders_are_checked(splits, tmp_path):
    train, evaluation = splits
    with pytest.raises(ConfigError, match="threshold"):
        find_leakage(train, evaluation, threshold=1.5)
    with pytest.raises(ConfigError, match="not found"):
        find_duplicates(tmp_path / "missing")
    # a loose threshold reports more pairs, never fewer
    assert find_leakage(train, evaluation, threshold=0.5)["n_pairs"] >= 2


def test_cli_dedup(splits, tmp_path):
    train, evaluation = splits
    proc = run_cli("data", "dedup", train, "--against", evaluation, "--json", tmp_path / "leak.json")
    assert proc.returncode == 0, proc.stderr
    assert "2 of 6 evaluation clips also appear in training" in proc.stdout
    assert json.loads((tmp_path / "leak.json").read_text())["n_pairs"] == 2
