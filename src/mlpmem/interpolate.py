"""Mixing the LM with other distributions on arrays, and fitting the mixture: lambda (EM), weights (EM), perplexity.

The maths is :mod:`mlpmem.modeling.mixing`'s (one torch implementation); these front-ends take numpy
arrays (float64, through ``torch.from_numpy``) or torch tensors and return the same kind. The fitting
and perplexity helpers work in float64 numpy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlpmem.errors import MlpmemError
from mlpmem.modeling.mixing import check_lambda, mix, mix_per_token, mix_weighted

log = logging.getLogger(__name__)

# small values matter: at small scale the best lambda is often 0.01 to 0.05
DEFAULT_LAMBDA_GRID: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _as_torch(x: Any):
    """A torch view of an array (float64 numpy arrays stay float64 and share memory), and whether it was numpy."""
    import torch

    return (x, False) if _is_torch(x) else (torch.from_numpy(np.asarray(x, dtype=np.float64)), True)


def interpolate_logprobs(lp_lm: Any, lp_other: Any, lam: float) -> Any:
    """``logaddexp(log(1 - lam) + lp_lm, log(lam) + lp_other)``, elementwise, any shape (:func:`mlpmem.modeling.mixing.mix`).

    Works on full log-prob rows [..., V] or on per-target values [N]. Exact at the
    ends: lam = 0 returns lp_lm, lam = 1 returns lp_other (no log(0) arithmetic).
    Torch in -> torch out (the dtype and device of lp_lm); numpy in -> float64 numpy out.
    """
    lam = check_lambda(lam)
    if _is_torch(lp_lm) or _is_torch(lp_other):
        import torch

        ref = lp_lm if _is_torch(lp_lm) else lp_other
        x = torch.as_tensor(lp_lm, device=ref.device, dtype=ref.dtype)
        return mix(x, torch.as_tensor(lp_other, device=ref.device), lam)
    return mix(_as_torch(lp_lm)[0], _as_torch(lp_other)[0], lam).numpy()


def interpolate_per_token(lp_lm: Any, lp_other: Any, lam: Any) -> Any:
    """Per-token mixture: ``logaddexp(log(1 - lam_i) + lp_lm_i, log(lam_i) + lp_other_i)`` with lam [N] (a gate's output)
    (:func:`mlpmem.modeling.mixing.mix_per_token`).

    lp_lm, lp_other [N] (per-target values) or [N, V] (full rows; lam broadcasts over V).
    Exact where lam_i is 0 or 1. Every lam_i must lie in [0, 1] (NaN refused). Numpy in ->
    float64 numpy out; torch in -> torch out (dtype of lp_lm).
    """
    import torch

    if _is_torch(lam) or _is_torch(lp_lm):
        ref = lp_lm if _is_torch(lp_lm) else lam
        dtype = torch.float64 if not _is_torch(lp_lm) else lp_lm.dtype
        lam_t = torch.as_tensor(lam, device=ref.device).to(dtype)
        x = torch.as_tensor(lp_lm, device=ref.device).to(dtype)
        y = torch.as_tensor(lp_other, device=ref.device).to(dtype)
        numpy_out = False
    else:
        (lam_t, _), (x, _), (y, _) = _as_torch(lam), _as_torch(lp_lm), _as_torch(lp_other)
        numpy_out = True
    if not bool(((lam_t >= 0) & (lam_t <= 1)).all()):
        raise MlpmemError("per-token lambdas must lie in [0, 1]", "pass a gate's sigmoid output, not its logits")
    out = mix_per_token(x, y, lam_t)
    return out.numpy() if numpy_out else out


def interpolate_many(lps: list[Any], weights: list[float]) -> np.ndarray:
    """log sum_k w_k p_k over per-target log-probs [N] of K components with fixed weights (the LM's first): float64
    numpy (:func:`mlpmem.modeling.mixing.mix_weighted`)."""
    return mix_weighted([_as_torch(_np64(x))[0] for x in lps], [float(w) for w in weights]).numpy()


def fit_mixture_em(lps: list[np.ndarray], iters: int = 200, tol: float = 1e-8) -> list[float]:
    """Mixture weights of K components that maximise the likelihood (EM).

    ``lps[k][i]`` is component k's log-prob of token i; the M-step weight of a
    component is its mean posterior responsibility.
    """
    L = np.stack([np.asarray(x, dtype=np.float64) for x in lps])  # [K, N]
    w = np.full(len(lps), 1.0 / len(lps))
    for _ in range(iters):
        a = np.log(np.maximum(w, 1e-300))[:, None] + L
        r = np.exp(a - np.logaddexp.reduce(a, axis=0))
        new = r.mean(axis=1)
        if np.abs(new - w).max() < tol:
            w = new
            break
        w = new
    return [float(x) for x in w]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _np64(x: Any) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def perplexity(logprobs: Any) -> float:
    """exp(-mean log p) over logprobs [N] (natural log)."""
    lp = _np64(logprobs)
    if lp.size == 0:
        raise MlpmemError("cannot compute a perplexity over zero tokens", "score at least one token")
    return float(np.exp(-lp.mean()))


def paired_ppl_change(lp_a: Any, lp_b: Any, block: int = 256, iters: int = 1000, seed: int = 0) -> dict[str, float]:
    """Perplexity of A relative to B on the same tokens (ppl_A / ppl_B - 1), with a 95% paired bootstrap interval.

    lp_a, lp_b [N]: each system's log-prob of the same true tokens. Neighbouring tokens are not
    independent (one window, one document), so the resampling unit is a block of ``block``
    consecutive positions; each resample draws whole blocks with replacement and keeps A and B
    paired, so what varies is the text, not the systems. ``same`` is True when the interval
    holds 0 (a difference inside its interval is no difference).
    """
    a, b = _np64(lp_a), _np64(lp_b)
    if a.shape != b.shape or a.size == 0:
        raise MlpmemError(f"paired perplexities need scores of the same tokens, got {a.shape} and {b.shape}", "score the same split")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):  # a system gave a true token no mass (a pruned memory at lambda 1)
        with np.errstate(invalid="ignore", over="ignore"):
            change = float(np.exp((b.sum() - a.sum()) / a.size) - 1.0)  # +inf, -1, or NaN when both are infinite
        return {"change": change, "low": change, "high": change, "same": False}
    n_blocks = -(-a.size // block)
    starts = np.arange(n_blocks) * block
    sum_a, sum_b = np.add.reduceat(a, starts), np.add.reduceat(b, starts)  # per block; the last may be shorter
    count = np.diff(np.append(starts, a.size))
    idx = np.random.default_rng(seed).integers(0, n_blocks, (iters, n_blocks))
    n = count[idx].sum(1)
    change = np.exp((sum_b[idx].sum(1) - sum_a[idx].sum(1)) / n) - 1.0
    lo, hi = np.percentile(change, [2.5, 97.5])
    return {"change": float(np.exp((b.sum() - a.sum()) / a.size) - 1.0), "low": float(lo), "high": float(hi), "same": bool(lo <= 0.0 <= hi)}


def interval_text(change: dict[str, float], digits: int = 2) -> str:
    """A :func:`paired_ppl_change` result as reports show it: ``-3.89% [-4.82, -2.98]`` (percent)."""
    pct = lambda v: f"{100 * v:+.{digits}f}"  # noqa: E731
    return f"{pct(change['change'])}% [{pct(change['low'])}, {pct(change['high'])}]"


def fit_lambda_em(lp_lm: Any, lp_other: Any, iters: int = 100, tol: float = 1e-7) -> float:
    """Likelihood-optimal mixture weight of the second distribution.

    lp_lm, lp_other [N]: log-probabilities of the true tokens. EM steps set lambda
    to the mean posterior responsibility of the second component. EM crawls when
    the optimum lies near 0 (at small scale it often does: each step then moves
    lambda by a nearly constant fraction of the remaining distance, and a step
    tolerance stops it early), so a safeguarded Newton search on the derivative of
    the log-likelihood, which is concave in lambda, finishes the job. Positions
    where both log-probabilities are -inf carry no information and are skipped.
    """
    x, y = _np64(lp_lm), _np64(lp_other)
    if x.shape != y.shape:
        raise MlpmemError(f"lp_lm has {x.size} values but lp_other has {y.size}", "pass per-token log-probs of the same positions")
    keep = np.isfinite(x) | np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size == 0:
        raise MlpmemError("no position with a finite log-probability to fit lambda on", "check the inputs")
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        # the optimum sits on a boundary when the slope there points outwards
        if np.isfinite(x).all() and np.mean(np.exp(y - x)) <= 1.0:
            return 0.0
        if np.isfinite(y).all() and np.mean(np.exp(x - y)) <= 1.0:
            return 1.0
        lam = 0.5
        for _ in range(iters):
            a, b = np.log1p(-lam) + x, np.log(lam) + y
            new = float(np.exp(b - np.logaddexp(a, b)).mean())
            done = abs(new - lam) < tol
            lam = min(max(new, 1e-300), 1.0 - 1e-16)
            if done:
                break
        lo, hi = 0.0, 1.0
        for _ in range(iters):
            mix = np.logaddexp(np.log1p(-lam) + x, np.log(lam) + y)
            t = np.exp(y - mix) - np.exp(x - mix)  # d/dlam of log((1-lam) p_lm + lam p_other)
            slope, curv = t.mean(), -(t * t).mean()
            lo, hi = (lam, hi) if slope > 0 else (lo, lam)
            step = lam - slope / curv if curv < 0 else (lo + hi) / 2
            if not lo < step < hi:
                step = (lo + hi) / 2
            if abs(step - lam) < tol * 1e-3 or hi - lo < 1e-15:
                lam = step
                break
            lam = step
    log.debug("fitted lambda %.8f", lam)
    return float(lam)


def lambda_curve(lp_lm: Any, lp_other: Any, grid: Sequence[float] = DEFAULT_LAMBDA_GRID) -> list[tuple[float, float]]:
    """[(lambda, perplexity of the mixture)] over ``grid``; lp_lm, lp_other [N]."""
    x, y = _np64(lp_lm), _np64(lp_other)
    return [(float(lam), perplexity(interpolate_logprobs(x, y, lam))) for lam in grid]


def plot_lambda_curves(
    curves: dict[str, list[tuple[float, float]]], path: Path, title: str, chosen: dict[str, float] | None = None
) -> Path:
    """Perplexity against lambda, one line per named curve; saved as PNG.

    On the split lambda is tuned on, the best point of each curve is marked. On any other
    split pass ``chosen`` (the lambda tuned on valid, per curve): that point is marked
    instead, so the plot does not invite picking lambda on test.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display needed
    ax = fig.add_subplot()
    for name, curve in curves.items():
        lams, ppls = zip(*curve)
        (line,) = ax.plot(lams, ppls, marker="o", ms=3, label=name)
        if chosen is None:
            best = int(np.argmin(ppls))
            at, ppl, note = lams[best], ppls[best], "best"
        else:
            at = chosen[name]
            ppl = float(np.interp(at, lams, ppls))  # between grid points: read off the plotted line
            note = "lambda from valid"
        ax.plot([at], [ppl], marker="*", ms=12, color=line.get_color())
        ax.annotate(f"{note}: {ppl:.2f} @ {at:.3g}", (at, ppl), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_title(title)
    ax.set_xlabel("lambda (weight of the memory or kNN distribution)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
