import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vidiffuse.errors import ConfigError, ModelLoadError
from vidiffuse.evaluate import (
    I3DFeatureExtractor,
    feature_stats,
    frechet_distance,
    fvd_from_features,
    preprocess_for_i3d,
    register_feature_model,
)


def _sqrt_psd(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fd_by_eigh(mu1, s1, mu2, s2):
    """Independent route: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric PSD matrix."""
    r = _sqrt_psd(s1)
    inner = np.linalg.eigvalsh(r @ s2 @ r)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_full_covariance_matches_eigendecomposition():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    s1, s2 = _random_spd(rng, 10), _random_spd(rng, 10)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_by_eigh(mu1, s1, mu2, s2), rel=1e-6)
    # symmetric in its two arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_distance_rank_deficient_covariances_stay_finite():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(5, 16)) + 1  # 5 samples in 16 dims: rank 4
    fd = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert np.isfinite(fd) and fd > 0
    assert fd == pytest.approx(_fd_by_eigh(*feature_stats(a), *feature_stats(b)), rel=1e-3)


def test_frechet_distance_retries_with_eps_when_sqrtm_is_not_finite(monkeypatch):
    from vidiffuse.evaluate import fvd

    real_sqrtm, calls = fvd.linalg.sqrtm, []

    def sqrtm(a):  # the first attempt fails the way a singular product does
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fvd.linalg, "sqrtm", sqrtm)
    rng = np.random.default_rng(3)
    mu1, mu2, s1, s2 = rng.normal(size=4), rng.normal(size=4), _random_spd(rng, 4), _random_spd(rng, 4)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_by_eigh(mu1, s1, mu2, s2), rel=1e-4)
    offset = 1e-6 * np.eye(4)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset), rtol=0, atol=1e-14)


@pytest.mark.parametrize("n", [5, 40])  # fewer and more samples than dims
def test_bootstrap_distance_matches_sqrtm_route(n):
    from vidiffuse.evaluate.fvd import _frechet_distance_of_samples

    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 12)), rng.normal(size=(n + 3, 12)) * 1.5 + 0.5
    expected = frechet_distance(*feature_stats(x), *feature_stats(y))
    assert _frechet_distance_of_samples(x, y) == pytest.approx(expected, rel=1e-6)
    assert _frechet_distance_of_samples(x, x) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ConfigError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_float64():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (4,) and sigma.shape == (4, 4)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))


def test_fvd_identical_sets_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    assert fvd_from_features(real, real.copy(), bootstrap=0)["fvd"] == pytest.approx(0, abs=1e-8)
    fvds = [fvd_from_features(real, rng.normal(size=(300, 8)) + shift, bootstrap=0)["fvd"]
            for shift in (0.0, 0.5, 1.0, 2.0)]
    assert fvds == sorted(fvds) and fvds[0] < 0.5 < fvds[-1]
    # a pure shift of every coordinate by s costs about d * s^2
    assert fvds[-1] == pytest.approx(8 * 4, rel=0.15)


def test_fvd_bootstrap_interval():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(120, 6)), rng.normal(size=(100, 6)) + 0.3
    r = fvd_from_features(real, fake, bootstrap=40, seed=7)
    assert r["n_real"] == 120 and r["n_fake"] == 100
    lo, hi = r["ci95"]
    assert 0 <= lo <= r["fvd"] <= hi and hi > lo
    assert fvd_from_features(real, fake, bootstrap=40, seed=7) == r
    assert fvd_from_features(real, fake, bootstrap=40, seed=8)["ci95"] != r["ci95"]
    # close sets: resampling inflates the distance, yet the interval still holds the estimate
    same = fvd_from_features(real, rng.normal(size=(100, 6)), bootstrap=40)
    assert same["ci95"][0] <= same["fvd"] <= same["ci95"][1]
    assert fvd_from_features(real, fake, bootstrap=0)["ci95"] is None


@pytest.mark.parametrize("real, fake", [
    (np.zeros((1, 4)), np.zeros((10, 4))),  # one sample has no covariance
    (np.zeros((10, 4)), np.zeros((1, 4))),
    (np.zeros((10, 4)), np.zeros((10, 5))),  # feature dims differ
    (np.zeros(10), np.zeros((10, 1))),  # not 2-D
    (np.full((10, 4), np.nan), np.zeros((10, 4))),
])
def test_fvd_rejects_bad_input(real, fake):
    with pytest.raises(ConfigError):
        fvd_from_features(real, fake, bootstrap=0)


def test_fvd_rejects_negative_bootstrap():
    with pytest.raises(ConfigError):
        fvd_from_features(np.zeros((3, 2)), np.ones((3, 2)), bootstrap=-1)


# ---------------------------------------------------------------- I3D loading


class _TinyScriptedI3D(torch.nn.Module):
    """The call signature of StyleGAN-V's i3d_torchscript.pt; its output exposes what it was given."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        flags = torch.tensor([float(rescale), float(resize), float(return_features)]).expand(x.shape[0], 3)
        shape = torch.tensor([float(x.shape[2]), float(x.shape[3]), float(x.shape[4])]).expand(x.shape[0], 3)
        lo, hi = x.amin(dim=[1, 2, 3, 4]), x.amax(dim=[1, 2, 3, 4])
        return torch.cat([self.proj(x.mean(dim=[2, 3, 4])), shape, flags, lo[:, None], hi[:, None]], dim=1)


def _videos(b=5, t=20, h=32, w=40):
    torch.manual_seed(0)
    return torch.rand(b, 3, t, h, w) * 2.2 - 1.1  # slightly out of range, as raw model output can be


def test_preprocess_for_i3d():
    x = preprocess_for_i3d(_videos())
    assert x.shape == (5, 3, 16, 224, 224) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ConfigError):
        preprocess_for_i3d(_videos(t=8))  # shorter than a 16-frame clip
    with pytest.raises(ConfigError):
        preprocess_for_i3d(torch.zeros(3, 16, 8, 8))  # one video without the batch axis


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_i3d_roundtrip(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.manual_seed(0)
    module = _TinyScriptedI3D()
    torch.jit.script(module).save(str(path))
    extractor = I3DFeatureExtractor(path, batch_size=2)
    videos = _videos()
    feats = extractor(videos)
    assert feats.shape == (5, 12) and feats.dtype == np.float64
    np.testing.assert_array_equal(feats[:, 4:7], [[16, 224, 224]] * 5)  # 16 frames at 224 × 224
    np.testing.assert_array_equal(feats[:, 7:10], [[0, 0, 1]] * 5)  # rescale=False, resize=False, features
    assert feats[:, 10].min() >= -1 and feats[:, 11].max() <= 1
    with torch.no_grad():
        expected = module(preprocess_for_i3d(videos), False, False, True).double().numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)  # batching changes nothing


@register_feature_model("tiny-test-i3d")
class _TinyStateDictI3D(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 7)

    def forward(self, x):
        return self.proj(x.mean(dim=(2, 3, 4)))


def test_state_dict_i3d_roundtrip(tmp_path):
    torch.manual_seed(0)
    trained = _TinyStateDictI3D()
    save_file(trained.state_dict(), str(tmp_path / "i3d.safetensors"))
    extractor = I3DFeatureExtractor(tmp_path / "i3d.safetensors", architecture="tiny-test-i3d", batch_size=3)
    videos = _videos()
    with torch.no_grad():
        expected = trained(preprocess_for_i3d(videos)).double().numpy()
    np.testing.assert_allclose(extractor(videos), expected, rtol=1e-5, atol=1e-6)

    save_file({"proj.weight": torch.zeros(2, 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ModelLoadError, match="does not fit"):
        I3DFeatureExtractor(tmp_path / "wrong.safetensors", architecture="tiny-test-i3d")
    with pytest.raises(ConfigError, match="unknown feature model"):
        I3DFeatureExtractor(tmp_path / "i3d.safetensors", architecture="no-such-model")


def test_i3d_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="path"):
        I3DFeatureExtractor(None)
    with pytest.raises(ModelLoadError, match="not found"):
        I3DFeatureExtractor(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a model" * 10)
    with pytest.raises(ModelLoadError):
        I3DFeatureExtractor(corrupt)
    with pytest.raises(ModelLoadError):
        I3DFeatureExtractor(corrupt, architecture="tiny-test-i3d")
