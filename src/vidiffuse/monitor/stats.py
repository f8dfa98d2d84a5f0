"""Two-sample tests for drift, each picked for the kind of signal it watches.

- Embeddings (prompt text, output video): kernel two-sample test, MMD² with an RBF kernel whose width
  is the median pairwise distance, p-value by permutation (Gretton et al., JMLR 2012). It sees any
  difference between two distributions in many dimensions (a shift of the mean, a new cluster, a lost
  mode) without assuming a shape, and the permutation p-value is exact at any sample size. Rabanser
  et al. ("Failing loudly", NeurIPS 2019) found MMD among the most reliable detectors of dataset shift.
- Categories (the shapes-world attributes the video encoder reads from each output: background,
  colour, shape, size, direction): Pearson's χ² of the 2 × K table of counts, p-value by permutation
  (valid for the few-per-cell counts of a window, where the χ² distribution is not). This is "black
  box shift detection" (Lipton et al., ICML 2018; the strongest detector in Rabanser et al.): a
  classifier's outputs are low-dimensional and carry exactly the factors that matter, so a shift of one
  factor that MMD on the whole 128-d embedding barely sees (one of five attributes) stands out, and the
  signal says which factor moved.
- A share (prompts out of distribution): Fisher's exact test. The share is small (~1% by the OOD
  threshold's calibration), so the expected counts are a few at most, too few for a z- or χ²-test.
- Scalars (temporal metrics): Kolmogorov–Smirnov, which sees a change of location, spread or shape
  of a one-dimensional distribution without assuming normality.

Several signals are tested at once, so `holm` adjusts the p-values (Holm–Bonferroni): the chance of any
false alarm in one report stays at most alpha, and it never flags less than plain Bonferroni.

The matrix products run in torch, not numpy: numpy's OpenBLAS starts its own threads, which spin after
each call and fight torch's threads for the same cores (this test file took 92 s instead of 18 s). torch
and scipy are imported when a test runs, so importing the package stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch


def _squared_distances(z: torch.Tensor) -> torch.Tensor:
    sq = (z * z).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_(min=0.0)


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD² between samples `x` (m, d) and `y` (n, d), and its permutation p-value.

    Kernel: exp(-‖a-b‖² / (2σ²)), σ the median distance between all pooled pairs. The p-value is
    (1 + #permutations with MMD² ≥ observed) / (1 + permutations), so it is never below
    1 / (1 + permutations): ask for enough permutations to reach a corrected alpha. Deterministic for a
    given `seed`. Cost: one (m+n)² kernel and a (permutations × (m+n)) by (m+n)² product.
    """
    import torch

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2 or x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ConfigError(f"MMD needs two samples of at least 2 vectors of one size; got {x.shape} and {y.shape}")
    sq = _squared_distances(torch.from_numpy(np.concatenate([x, y])))
    pairs = sq[tuple(torch.triu_indices(m + n, m + n, 1))].numpy()
    median_sq = float(np.median(pairs))
    if median_sq <= 0:  # more than half the pairs identical: fall back to the mean of the non-zero ones
        positive = pairs[pairs > 0]
        if positive.size == 0:
            return 0.0, 1.0  # every vector identical: nothing to tell apart
        median_sq = float(positive.mean())
    k = torch.exp(-sq / (2.0 * median_sq))
    k.fill_diagonal_(0.0)  # the unbiased estimator leaves out each point's similarity with itself
    row_sums, total = k.sum(1), k.sum()

    def mmd(a: torch.Tensor) -> torch.Tensor:
        """MMD² for each row of the 0/1 matrix `a` marking which pooled points form the first sample."""
        xx = ((a @ k) * a).sum(1)
        ar = a @ row_sums
        xy, yy = ar - xx, total - 2.0 * ar + xx
        return xx / (m * (m - 1)) + yy / (n * (n - 1)) - 2.0 * xy / (m * n)

    return _permutation_p_value(mmd, m, n, permutations, seed)


def _permutation_p_value(statistic, m: int, n: int, permutations: int, seed: int) -> tuple[float, float]:
    """`statistic(a)` maps each row of a 0/1 matrix (which of the m + n pooled points form the first
    sample) to a number; returns the observed value and (1 + #permuted ≥ observed) / (1 + permutations)."""
    import torch

    first = torch.cat([torch.ones(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)])
    observed = float(statistic(first[None])[0])
    rng = np.random.default_rng(seed)
    exceed, chunk = 0, 500
    for start in range(0, permutations, chunk):
        b = min(chunk, permutations - start)
        pick = torch.from_numpy(rng.random((b, m + n)).argsort(1)[:, :m])
        a = torch.zeros((b, m + n), dtype=torch.float64).scatter_(1, pick, 1.0)
        # a relative tolerance: a permutation that reproduces the observed split must count as "≥"
        exceed += int((statistic(a) >= observed - 1e-12 * abs(observed)).sum())
    return observed, (1 + exceed) / (1 + permutations)


def categorical_permutation_test(x: Sequence, y: Sequence, permutations: int = 2000, seed: int = 0
                                 ) -> tuple[float, float]:
    """Pearson χ² of the category counts of `x` against `y`, and its permutation p-value."""
    import torch

    x, y = list(x), list(y)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ConfigError(f"a category test needs at least 2 labels in each sample; got {m} and {n}")
    categories = sorted(set(x) | set(y), key=str)
    if len(categories) < 2:
        return 0.0, 1.0  # one category everywhere: nothing to tell apart
    index = {c: i for i, c in enumerate(categories)}
    onehot = torch.eye(len(categories), dtype=torch.float64)[[index[c] for c in x + y]]
    totals = onehot.sum(0)
    expected_x, expected_y = m * totals / (m + n), n * totals / (m + n)

    def chi2(a: torch.Tensor) -> torch.Tensor:
        counts_x = a @ onehot
        counts_y = totals - counts_x
        return (((counts_x - expected_x) ** 2) / expected_x + ((counts_y - expected_y) ** 2) / expected_y).sum(1)

    return _permutation_p_value(chi2, m, n, permutations, seed)


def ks_test(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Kolmogorov–Smirnov statistic and two-sided p-value (exact for small samples, asymptotic for large).

    Ties (e.g. a metric that is exactly 1 for every still clip) make it conservative: fewer alarms, not more.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ConfigError("KS needs at least 2 values in each sample")
    from scipy import stats

    result = stats.ks_2samp(x, y)
    return float(result.statistic), float(result.pvalue)


def share_test(reference_hits: int, reference_n: int, current_hits: int, current_n: int) -> tuple[float, float]:
    """Has the share of hits grown from the reference to the current window? One-sided Fisher's exact test.

    Returns (current share − reference share, p-value). One-sided because the alarm is about more
    prompts the model cannot render; any other change in what people ask shows in the prompt embeddings.
    """
    if reference_n < 1 or current_n < 1:
        raise ConfigError("a share test needs at least one observation in each window")
    table = [[current_hits, current_n - current_hits], [reference_hits, reference_n - reference_hits]]
    from scipy import stats

    _, p = stats.fisher_exact(table, alternative="greater")
    return current_hits / current_n - reference_hits / reference_n, float(p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values: a test is significant at family-wise level alpha iff its
    adjusted p-value ≤ alpha."""
    p = np.asarray(p_values, np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))  # monotone: a larger p never gets a smaller adjustment
        adjusted[i] = running
    return adjusted.tolist()
