"""Interpolation, perplexity, the EM fit of lambda, curves and plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlpmem.errors import MlpmemError
from mlpmem.interpolate import (
    paired_ppl_change,
    DEFAULT_LAMBDA_GRID,
    fit_lambda_em,
    interpolate_logprobs,
    lambda_curve,
    perplexity,
    plot_lambda_curves,
)


def two_models(n=4000, seed=0, other_good=False):
    """Per-token log-probs of two imperfect models whose errors differ.

    By default the other model is mostly worse (optimum near 0, where EM crawls);
    with ``other_good`` it is competitive (optimum inside).
    """
    rng = np.random.default_rng(seed)
    lp_lm = np.log(rng.beta(2, 5, n))
    if other_good:
        return lp_lm, np.log(rng.beta(2, 4, n))
    lp_other = np.log(np.clip(rng.beta(1, 3, n) * (rng.random(n) < 0.7) + 1e-4, 0, 1))
    return lp_lm, lp_other


def test_interpolate_matches_mixture_and_ends(torch_threads):
    x = torch.log_softmax(torch.randn(3, 11), -1)
    y = torch.log_softmax(torch.randn(3, 11), -1)
    mixed = interpolate_logprobs(x, y, 0.3)
    torch.testing.assert_close(mixed.exp(), 0.7 * x.exp() + 0.3 * y.exp())
    torch.testing.assert_close(mixed.logsumexp(-1), torch.zeros(3), atol=1e-6, rtol=0)
    assert torch.equal(interpolate_logprobs(x, y, 0.0), x)
    assert torch.equal(interpolate_logprobs(x, y, 1.0), y)
    # -inf in one component stays finite when the other has mass
    assert torch.isfinite(interpolate_logprobs(x, torch.full_like(y, -math.inf), 0.5)).all()


def test_interpolate_numpy_and_mixed():
    a, b = np.log([0.2, 0.5]), np.log([0.4, 0.1])
    out = interpolate_logprobs(a, b, 0.25)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(np.exp(out), 0.75 * np.exp(a) + 0.25 * np.exp(b))
    out_t = interpolate_logprobs(torch.tensor(a), b, 0.25)
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), out)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_bad_lambda(lam):
    with pytest.raises(MlpmemError, match="lambda"):
        interpolate_logprobs(np.zeros(2), np.zeros(2), lam)


def test_perplexity():
    assert perplexity(np.log([0.5, 0.5])) == pytest.approx(2.0)
    assert perplexity(torch.log(torch.tensor([0.25, 1.0]))) == pytest.approx(2.0)
    with pytest.raises(MlpmemError):
        perplexity([])


@pytest.mark.parametrize("other_good", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_em_finds_likelihood_optimum(seed, other_good):
    x, y = two_models(seed=seed, other_good=other_good)
    lam = fit_lambda_em(x, y)
    grid = np.linspace(0, 1, 100001)[1:-1]
    ll = [np.mean(np.logaddexp(np.log1p(-g) + x, np.log(g) + y)) for g in grid[::100]]
    coarse = grid[::100][int(np.argmax(ll))]
    fine = grid[(grid > coarse - 2e-3) & (grid < coarse + 2e-3)]
    ll_fine = [np.mean(np.logaddexp(np.log1p(-g) + x, np.log(g) + y)) for g in fine]
    best = fine[int(np.argmax(ll_fine))]
    assert 0 < lam < 1
    assert abs(lam - best) < 1e-4
    assert perplexity(interpolate_logprobs(x, y, lam)) <= min(p for _, p in lambda_curve(x, y)) + 1e-9


def test_em_boundaries():
    x = np.log(np.full(100, 0.5))
    assert fit_lambda_em(x, x - 5.0, iters=2000) < 1e-3  # the other model is always worse
    assert fit_lambda_em(x - 5.0, x, iters=2000) > 1 - 1e-3
    assert fit_lambda_em(x, np.full(100, -np.inf)) == 0.0


def test_lambda_curve_and_plot(tmp_path):
    x, y = two_models()
    curve = lambda_curve(x, y)
    assert [lam for lam, _ in curve] == list(DEFAULT_LAMBDA_GRID)
    assert {0.0, 0.01, 0.02, 0.05, 0.1, 0.9} <= set(DEFAULT_LAMBDA_GRID)
    assert curve[0][1] == pytest.approx(perplexity(x))
    path = plot_lambda_curves({"memory": curve, "kNN": lambda_curve(x, y * 1.1)}, tmp_path / "plots" / "lambda.png", "test")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_paired_ppl_change_against_a_naive_block_bootstrap():
    rng = np.random.default_rng(0)
    b = -rng.gamma(2.0, 1.5, 1000)
    a = b + rng.normal(0.05, 0.3, 1000)  # A a little better than B (higher log-probs), noisily
    got = paired_ppl_change(a, b, block=64, iters=300, seed=5)
    assert got["change"] == pytest.approx(perplexity(a) / perplexity(b) - 1, rel=1e-9)
    # naive reference: the same block draws, one resample at a time
    blocks = [np.arange(i, min(i + 64, 1000)) for i in range(0, 1000, 64)]
    draws = np.random.default_rng(5).integers(0, len(blocks), (300, len(blocks)))
    naive = [
        perplexity(a[np.concatenate([blocks[j] for j in d])]) / perplexity(b[np.concatenate([blocks[j] for j in d])]) - 1 for d in draws
    ]
    assert [got["low"], got["high"]] == pytest.approx(list(np.percentile(naive, [2.5, 97.5])), rel=1e-9)
    assert got["low"] < got["change"] < got["high"] < 0 and not got["same"]
    assert paired_ppl_change(b, b)["same"]
    # a true token given no mass (a pruned memory at lambda 1): infinite perplexity, said plainly, no bootstrap of infinities
    inf = paired_ppl_change(np.append(a, -np.inf), np.append(b, -1.0))
    assert inf["change"] == inf["low"] == inf["high"] == np.inf and not inf["same"]
