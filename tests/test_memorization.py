import json
import shutil

import numpy as np
import pytest

from conftest import disguised_copy, run_cli
from vidiffuse.data.fingerprint import (
    SIMILARITY_THRESHOLD, fingerprint_arrays, fingerprint_dir, fingerprint_frames, similarity,
)
from vidiffuse.data.shapes import generate_example, synthesize
from vidiffuse.errors import ConfigError
from vidiffuse.govern.memorization import calibrate_threshold, check_memorization, memorization_report


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("mem")
    train = synthesize(base / "train", 8, seed=1, progress=False)
    generated = synthesize(base / "generated", 6, seed=7, progress=False)
    disguised_copy(train / "000004.mp4", generated / "planted.mp4", crf=30, brightness=20)
    return train, generated


def test_planted_training_clip_is_flagged_and_nothing_else(folders, tmp_path):
    train, generated = folders
    report = check_memorization(generated, train, k=2, out_dir=tmp_path)
    assert report["threshold"] == SIMILARITY_THRESHOLD
    assert [(f["generated"], f["training"]) for f in report["flagged"]] == [("planted.mp4", "000004.mp4")]
    assert report["flagged"][0]["similarity"] >= SIMILARITY_THRESHOLD
    assert report["n_generated"] == 7 and report["n_training"] == 8 and report["n_flagged"] == 1
    honest = [r for r in report["nearest"] if r["generated"] != "planted.mp4"]
    assert len(honest) == 6 and all(r["neighbours"][0]["similarity"] < SIMILARITY_THRESHOLD for r in honest)
    assert all(len(r["neighbours"]) == 2 for r in report["nearest"])
    assert json.loads((tmp_path / "memorization.json").read_text())["flagged"] == report["flagged"]
    assert "planted.mp4 | 000004.mp4" in (tmp_path / "memorization.md").read_text()


def test_similarity_definition():
    clip = generate_example(3)[1]
    brighter = np.clip(clip.astype(np.int16) + 25, 0, 255).astype(np.uint8)
    fp = fingerprint_arrays([clip, brighter, generate_example(4)[1]])
    sim = similarity(fp.embeddings, fp.embeddings)
    assert sim[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert sim[0, 1] > 0.99  # a brightness shift is still a copy
    assert sim[0, 2] < 0.9
    hashes, embedding = fingerprint_frames(np.full((16, 64, 64, 3), 90, np.uint8))
    assert not embedding.any() and hashes.shape == (8,)  # a flat clip has nothing to match on


def test_unreadable_files_are_listed_not_fatal(folders, tmp_path):
    train, _ = folders
    shutil.copytree(train, tmp_path / "t")
    (tmp_path / "t" / "broken.mp4").write_bytes(b"\x00" * 300)
    fp = fingerprint_dir(tmp_path / "t")
    assert len(fp) == 8 and [n for n, _ in fp.errors] == ["broken.mp4"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no readable generated"):
        memorization_report(fingerprint_dir(tmp_path / "empty"), fp)


def test_calibration_separates_copies_from_fresh_clips():
    result = calibrate_threshold(n_train=150, n_independent=40, n_copies=8, thresholds=(0.99,))
    at = result["by_threshold"]["0.99"]
    assert at["reencode_crf18_detected"] == 1.0 and at["brightness+20_crf28_detected"] == 1.0
    assert at["independent_flag_rate"] <= 0.1
    assert result["copies"]["reencode_crf18"]["min"] > result["independent_nearest_similarity"]["median"]


def test_cli_memorization(folders, tmp_path):
    train, generated = folders
    proc = run_cli("govern", "memorization", generated, "--train", train, "--out", tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    assert "1 of 7 generated videos flagged" in proc.stderr and "planted.mp4 ~ 000004.mp4" in proc.stderr
    assert (tmp_path / "m" / "memorization.md").is_file()
    with pytest.raises(ConfigError, match="generated videos folder not found"):
        check_memorization(tmp_path / "nope", train)  # the CLI prints such errors as one `error:` line
