import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vidiffuse.data import shapes
from vidiffuse.errors import ModelLoadError
from vidiffuse.evaluate import fvd_from_features
from vidiffuse.evaluate.shapes_encoder import (
    DEFAULT_ENCODER_PATH,
    HELDOUT_SEED_START,
    ShapesVideoEncoder,
    load_shapes_video_encoder,
    shapes_video_features,
    train_shapes_video_encoder,
)
from vidiffuse.video.io import read_video, uint8_to_tensor, write_video

# held-out seeds not used by the training run's own evaluation either
TEST_SEEDS = HELDOUT_SEED_START + 1_000_000


def _examples(first: int, n: int):
    return [shapes.generate_example(s)[:2] for s in range(first, first + n)]


def _tensor(videos) -> torch.Tensor:
    return torch.stack([uint8_to_tensor(v) for v in videos])


@pytest.fixture(scope="module")
def encoder():
    return load_shapes_video_encoder()


@pytest.fixture(scope="module")
def set_a():
    return _examples(TEST_SEEDS, 128)


def test_bundled_encoder_reads_heldout_attributes(encoder, set_a):
    examples = set_a[:64]
    emb = torch.from_numpy(shapes_video_features([v for _, v in examples], encoder)).float()
    with torch.no_grad():
        logits = encoder.classify(emb)
    for attr in shapes.ATTRIBUTES:
        predicted = [encoder.classes[attr][i] for i in logits[attr].argmax(-1).tolist()]
        accuracy = np.mean([p == getattr(spec, attr) for p, (spec, _) in zip(predicted, examples)])
        assert accuracy >= 0.9, f"{attr}: {accuracy:.3f}"


def test_bundled_encoder_is_small_and_self_describing():
    config = json.loads((DEFAULT_ENCODER_PATH / "config.json").read_text())
    assert config["directions"] == list(shapes.DIRECTIONS) and config["colors"] == list(shapes.COLORS)
    weights = DEFAULT_ENCODER_PATH / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 2_000_000
    assert sum(t.numel() for t in load_file(weights).values()) < 1_000_000
    assert (DEFAULT_ENCODER_PATH / "README.md").is_file() and (DEFAULT_ENCODER_PATH / "training_log.jsonl").is_file()


def test_features_are_deterministic_and_input_forms_agree(encoder, set_a):
    videos = [v for _, v in set_a[:8]]
    a = shapes_video_features(videos, encoder, batch_size=3)
    b = shapes_video_features(videos, encoder, batch_size=3)
    assert a.shape == (8, encoder.config.embed_dim) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, shapes_video_features(_tensor(videos), encoder, batch_size=3))


def _mp4_round_trip(videos: torch.Tensor, tmp_path) -> torch.Tensor:
    out = []
    for i, v in enumerate(videos):
        out.append(read_video(write_video(tmp_path / f"{i}.mp4", v, crf=23))[0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def fvds(encoder, set_a, tmp_path_factory):
    """FVD from real set A (128 clips) to a second real set and to altered copies of A."""
    real_a = _tensor([v for _, v in set_a])
    g = torch.Generator().manual_seed(0)
    others = {
        "real B": _tensor([v for _, v in _examples(TEST_SEEDS + 10_000, 128)]),
        "mp4 crf 23": _mp4_round_trip(real_a, tmp_path_factory.mktemp("mp4")),
        "noise std 0.5": (real_a + 0.5 * torch.randn(real_a.shape, generator=g)).clamp(-1, 1),
        "box blur 5 px": F.avg_pool3d(real_a, (1, 5, 5), stride=1, padding=(0, 2, 2), count_include_pad=False),
        # each frame right, the motion wrong
        "frames shuffled": torch.stack([v[:, torch.randperm(v.shape[1], generator=g)] for v in real_a]),
        "first frame held": real_a[:, :, :1].expand_as(real_a),
        "uniform noise": torch.rand(real_a.shape, generator=g) * 2 - 1,
    }
    ref = shapes_video_features(real_a, encoder)
    result = {name: fvd_from_features(ref, shapes_video_features(v, encoder), bootstrap=0)["fvd"]
              for name, v in others.items()}
    print("FVD from real set A:", {k: round(v, 1) for k, v in result.items()})
    return result


def test_fvd_real_sets_are_closer_than_corrupted_ones(fvds):
    real = fvds["real B"]
    assert fvds["uniform noise"] > 20 * real
    assert fvds["first frame held"] > 3 * real
    assert fvds["frames shuffled"] > 2 * real
    assert fvds["noise std 0.5"] > 2 * real


def test_fvd_tolerates_codec_but_not_heavy_degradation(fvds):
    codec = fvds["mp4 crf 23"]
    assert codec < fvds["real B"] / 10
    for degraded in ("noise std 0.5", "box blur 5 px", "frames shuffled"):
        assert fvds[degraded] > 10 * codec, degraded


def test_missing_or_corrupt_weights_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no shapes video encoder"):
        load_shapes_video_encoder(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((DEFAULT_ENCODER_PATH / "config.json").read_text())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00not safetensors" * 64)
    with pytest.raises(ModelLoadError, match="cannot load shapes video encoder") as e:
        load_shapes_video_encoder(broken)
    assert "\n" not in str(e.value)


TINY = dict(block_out_channels=(8, 16), layers_per_block=(1, 1), embed_dim=12, norm_num_groups=4, sample_size=16)


def _tiny_encoder() -> ShapesVideoEncoder:
    torch.manual_seed(0)
    return ShapesVideoEncoder(**TINY, colors=("red", "blue"))


def test_save_and_load_round_trip(tmp_path):
    model = _tiny_encoder()
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_shapes_video_encoder(tmp_path / "tiny")
    assert loaded.classes["color"] == ["red", "blue"] and loaded.heads["color"].out_features == 2
    assert not loaded.training
    x = torch.rand(2, 3, 16, 64, 64) * 2 - 1
    with torch.no_grad():
        np.testing.assert_array_equal(model.eval()(x).numpy(), loaded(x).numpy())
    assert shapes_video_features(x, loaded).shape == (2, 12)


def test_training_is_reproducible_and_writes_a_complete_directory(tmp_path):
    kwargs = dict(steps=2, batch_size=4, seed=3, eval_every=1, eval_clips=4, encoder_config=TINY, progress=False)
    accuracy = train_shapes_video_encoder(tmp_path / "a", **kwargs)
    train_shapes_video_encoder(tmp_path / "b", **kwargs)
    assert set(accuracy) == set(shapes.ATTRIBUTES)
    log = [json.loads(line) for line in (tmp_path / "a" / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and log[-1]["heldout_accuracy"] == accuracy
    assert (tmp_path / "a" / "README.md").is_file()
    a = load_file(tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
