import json

import torch

from conftest import run_cli
from vidiffuse.video import read_video


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert any(l.startswith("error:") for l in lines), proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def test_generate_single_and_deterministic(tiny_bundle, tmp_path):
    for name in ("a.mp4", "b.mp4"):
        proc = run_cli("generate", "a red circle moving left", "-o", tmp_path / name, "--model", tiny_bundle, "--seed", 4)
        assert proc.returncode == 0, proc.stderr
    a, fps = read_video(tmp_path / "a.mp4")
    b, _ = read_video(tmp_path / "b.mp4")
    assert a.shape == (3, 16, 64, 64) and fps == 8
    # the encoded video is byte-identical; the signed manifests differ (a fresh instance id and signature each time)
    assert mdat(tmp_path / "a.mp4") == mdat(tmp_path / "b.mp4")
    assert torch.equal(a, b)


def mdat(path) -> bytes:
    """The MP4's media data box: the encoded frames, without the container's metadata."""
    data = path.read_bytes()
    at = data.find(b"mdat") - 4
    size = int.from_bytes(data[at : at + 4], "big")
    assert at >= 0 and size > 8
    return data[at : at + size]


def test_generate_batch(tiny_bundle, tmp_path, monkeypatch):
    # in fp32 a video does not depend on its batch-mates; bf16 kernels (native on AVX-512 BF16) round
    # differently for another batch size, so that part is checked in fp32
    monkeypatch.setenv("VIDIFFUSE_PRECISION", "fp32")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a blue square", "seed": 1}\n\n{"prompt": "a red dot", "seed": 2}\n{"prompt": "a green ball"}\n')
    proc = run_cli("generate", "--prompts", prompts, "--out-dir", tmp_path / "out", "--model", tiny_bundle,
                   "--steps", 2, "--batch-size", 2)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mp4")) == ["0000.mp4", "0001.mp4", "0002.mp4"]
    records = [json.loads(l) for l in (tmp_path / "out" / "generated.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a blue square", "a red dot", "a green ball"]
    assert [r["seed"] for r in records][:2] == [1, 2] and all(r["steps"] == 2 for r in records)
    # batch output equals the single-prompt output for the same seed
    single = tmp_path / "single.mp4"
    assert run_cli("generate", "a red dot", "-o", single, "--model", tiny_bundle, "--seed", 2, "--steps", 2).returncode == 0
    a = read_video(single)[0]
    b = read_video(tmp_path / "out" / "0001.mp4")[0]
    assert (a - b).abs().mean() < 0.01


def test_bad_input_gives_one_clear_error(tiny_bundle, tmp_path):
    assert_clean_error(run_cli("generate", "", "-o", tmp_path / "x.mp4", "--model", tiny_bundle), "empty")
    assert_clean_error(run_cli("generate", "a dot", "--frames", 0, "--model", tiny_bundle), "frames")
    assert_clean_error(run_cli("generate", "a dot", "--steps", -3, "--model", tiny_bundle), "steps")
    assert_clean_error(run_cli("generate", "a dot", "--model", tmp_path / "no-such-model"), "no vidiffuse model")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_clean_error(run_cli("generate", "a dot", "-o", blocker / "out.mp4", "--model", tiny_bundle), "cannot write")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert_clean_error(run_cli("generate", "--prompts", bad, "--model", tiny_bundle), "not valid JSON")
    assert_clean_error(run_cli("train", "--config", tmp_path / "missing.toml"), "not found")
    assert not list(tmp_path.glob("*.mp4"))


def test_data_synth(tmp_path):
    proc = run_cli("data", "synth", "--out", tmp_path / "d", "--n", 3, "--seed", 1)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "d").glob("*.mp4"))) == 3
    assert len((tmp_path / "d" / "captions.jsonl").read_text().splitlines()) == 3


def test_generate_warns_on_out_of_distribution_prompts(tiny_bundle, tmp_path):
    import shutil

    from vidiffuse.evaluate.ood import REFERENCE_FILE
    from vidiffuse.pipeline import BUNDLED

    model = tmp_path / "model"
    shutil.copytree(tiny_bundle, model)
    shutil.copy(BUNDLED["shapes"] / REFERENCE_FILE, model / REFERENCE_FILE)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "quarterly revenue spreadsheet"}\n{"prompt": "a large red circle moving right on black"}\n')
    proc = run_cli("generate", "--prompts", prompts, "--out-dir", tmp_path / "out", "--model", model, "--steps", 1)
    assert proc.returncode == 0, proc.stderr
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1, proc.stderr
    assert warnings[0].startswith("warning: prompt 1 (0000.mp4) looks out of distribution for model 'tiny' (score ")
    assert warnings[0].endswith("): expect lower quality")
    records = [json.loads(l) for l in (tmp_path / "out" / "generated.jsonl").read_text().splitlines()]
    assert records[0]["ood_score"] > records[1]["ood_score"]
    proc = run_cli("generate", "an astronaut riding a horse on mars", "-o", tmp_path / "x.mp4", "--model", model,
                   "--steps", 1)
    assert proc.returncode == 0 and (tmp_path / "x.mp4").exists(), proc.stderr
    assert "warning: the prompt looks out of distribution for model 'tiny'" in proc.stderr
