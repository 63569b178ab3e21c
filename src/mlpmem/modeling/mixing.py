"""The mixture maths: log-probs of the LM and of one or more memories -> the mixture's log-probs (torch).

The one implementation of every mixture mlpmem computes: the model's forward, the gate's and the
router's fitting, fine-tuning with a memory and the offline scoring (float64 numpy arrays go through
``torch.from_numpy``) all call these. Each is exact at its ends: a weight of 0 leaves a term out, a
weight of 1 returns that term alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import MlpmemError

MIXINGS = ("fixed", "gated")  # what a single memory's run fits
MODEL_MIXINGS = ("fixed", "gated", "routed")  # what the model class mixes by
# every feature costs a few elementwise passes over the vocabulary, next to the memory's V x d head
GATE_FEATURES = ("lm_entropy", "lm_max_logprob", "memory_entropy", "memory_max_logprob", "kl_lm_memory", "kl_memory_lm", "argmax_agree")
# read from the memory's input hidden state, not from the two distributions: how far it lies from the memory's
# train inputs (a gate fitted by mlpmem reads it, unless gate.centroids is 0; BENCHMARKS.md section 7)
HIDDEN_FEATURES = ("novelty",)
GATE_INPUTS = GATE_FEATURES + HIDDEN_FEATURES  # the columns a gate may read, in this order
KL_CAP = 100.0  # a KL to a distribution that gives a token no mass is infinite: capped, so the gate's input stays finite


def check_lambda(lam: float) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:  # also refuses NaN
        raise MlpmemError(f"lambda must lie in [0, 1], got {lam}", "pass a mixture weight between 0 (LM only) and 1 (memory only)")
    return lam


def check_temperature(t: float) -> float:
    t = float(t)
    if not (t > 0 and math.isfinite(t)):
        raise MlpmemError(
            f"the memory temperature must be a positive number, got {t}", "pass e.g. memory_temperature=1.0 (the memory's own distribution)"
        )
    return t


def check_mixing(mixing: str) -> str:
    if mixing not in MIXINGS:
        raise MlpmemError(
            f"mixing must be one of {', '.join(MIXINGS)}, got {mixing!r}",
            "pass mixing='fixed' (one lambda for every token) or mixing='gated' (lambda per token from the memory's gate)",
        )
    return mixing


def check_model_mixing(mixing: str) -> str:
    if mixing not in MODEL_MIXINGS:
        raise MlpmemError(
            f"mixing must be one of {', '.join(MODEL_MIXINGS)}, got {mixing!r}",
            "pass mixing='fixed' (fixed weights), 'gated' (one memory, lambda per token from its gate) or 'routed' "
            "(weights per token from the router over several memories)",
        )
    return mixing


def check_weights(weights: Any, n_memories: int) -> list[float]:
    """Fixed mixture weights over the LM and n memories: n + 1 numbers in [0, 1] that sum to 1 (to 1e-6)."""
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise MlpmemError(
            f"mixture weights must be a list of numbers, got {weights!r}",
            f"pass {n_memories + 1} numbers: the LM's weight, then each memory's",
        )
    if len(w) != n_memories + 1:
        raise MlpmemError(
            f"the model has {n_memories} memories, so it needs {n_memories + 1} mixture weights (the LM first), got {len(w)}",
            "pass one weight for the LM and one per memory, in the model's order (model.memory_names)",
        )
    if not all(0.0 <= x <= 1.0 for x in w) or abs(sum(w) - 1.0) > 1e-6:  # the comparisons also refuse NaN
        raise MlpmemError(
            f"mixture weights must each lie in [0, 1] and sum to 1, got {w}", "pass weights such as [0.6, 0.2, 0.2] (the LM first)"
        )
    return w


def weights_from_lambda(lam: float, n_memories: int) -> list[float]:
    """lambda split evenly over the memories: [1 - lambda, lambda / n, ...]; n = 1 gives [1 - lambda, lambda]."""
    return [1.0 - lam] + [lam / n_memories] * n_memories


def gate_features(lm_logprobs: torch.Tensor, memory_logprobs: torch.Tensor) -> torch.Tensor:
    """Log-probs of the LM and the memory [..., V] -> the gate's features [..., len(GATE_FEATURES)] (float32).

    Entropies and the largest log-probability of each, both KL divergences (capped at
    KL_CAP) and whether the two agree on the most likely token. Tokens without mass
    (log-prob -inf) contribute 0 to an entropy, as p log p does in the limit.
    """
    # a few passes over [..., V]: two exps, two clamps, four row dot products and two max; -inf log-probs
    # (no mass) are clamped to a finite floor, where p = 0 makes every product with them 0 as in the limit
    floor = torch.finfo(torch.float32).min / 4
    lp, lq = lm_logprobs.float().clamp_min(floor), memory_logprobs.float().clamp_min(floor)
    p, q = lp.exp(), lq.exp()
    dot = lambda a, b: (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]  # noqa: E731  row-wise sum(a * b)
    max_p, arg_p = lp.max(-1)
    max_q, arg_q = lq.max(-1)
    return _stack_features(dot(p, lp), dot(q, lq), dot(p, lq), dot(q, lp), max_p, max_q, arg_p == arg_q)


def novelty(h: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The memory's input h [..., d] -> log of its squared distance to the nearest of ``centroids`` [C, d] (k-means
    centres of the memory's train inputs) [...] (float32). Text of another kind lies far from every centre, where the
    memory has not learnt and should step back; the two distributions alone tell this only in part.

    A product with the C centres (C x d multiply-adds per position; C = 16 at d = 576 is 0.3% of one residual
    block), in float64: |h|^2 - 2 h.c + |c|^2 subtracts squares far larger than a near point's distance.
    """
    c = centroids.double()
    x = h.double()
    d2 = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(-1)
    return d2.min(-1).values.clamp_min(1e-12).log().float()


def _stack_features(p_lp, q_lq, p_lq, q_lp, max_p, max_q, agree) -> torch.Tensor:
    """The gate's features in GATE_FEATURES order from the row sums (p = LM, q = memory) and the maxima."""
    kl_pq, kl_qp = (p_lp - p_lq).clamp(0.0, KL_CAP), (q_lq - q_lp).clamp(0.0, KL_CAP)
    return torch.stack([(-p_lp).clamp_min(0.0), max_p, (-q_lq).clamp_min(0.0), max_q, kl_pq, kl_qp, agree.to(max_p.dtype)], -1)


def gate_features_pruned(lm_logprobs: torch.Tensor, memory_logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """:func:`gate_features` for a memory whose head is pruned to the token ids ``ids`` [S] (sorted, as
    MLPMemory.prune_head keeps them): ``memory_logprobs`` [..., S] over those tokens, no mass on every other.

    The same features as over the full rows, with the memory's side computed over its S tokens: the LM's side still
    reads all V, but the memory's (its exps, clamps and dot products over V) shrinks to S.
    """
    floor = torch.finfo(torch.float32).min / 4
    lp, lq = lm_logprobs.float().clamp_min(floor), memory_logprobs.float().clamp_min(floor)
    p, q = lp.exp(), lq.exp()
    lp_s, p_s = lp[..., ids], p[..., ids]
    dot = lambda a, b: (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]  # noqa: E731  row-wise sum(a * b)
    # the LM's mass outside the memory's tokens, where the full rows' log q is the floor; summed over those tokens
    # themselves, so that it is exactly 0 where every such p underflows, as in the full sum
    p_out = p.index_fill(-1, ids, 0.0).sum(-1)
    max_p, arg_p = lp.max(-1)
    max_q, arg_q = lq.max(-1)
    p_lq = dot(p_s, lq) + p_out * floor
    return _stack_features(dot(p, lp), dot(q, lq), p_lq, dot(q, lp_s), max_p, max_q, arg_p == ids[arg_q])


def mix_pruned(lm_logprobs: torch.Tensor, memory_logprobs: torch.Tensor, ids: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """:func:`mix` (``lam`` a float) or :func:`mix_per_token` (``lam`` [...], per position) with a memory whose head is
    pruned to ``ids`` [S]: ``memory_logprobs`` [..., S], no mass elsewhere. Full rows [..., V] out: the LM's
    share everywhere, plus the memory's on its S tokens (one pass over V, the rest over S). Exact at lam 0 and 1."""
    if not torch.is_tensor(lam):
        lam = check_lambda(lam)
        if lam == 0.0:
            return lm_logprobs
        keep, add = math.log1p(-lam) if lam < 1.0 else -math.inf, math.log(lam)
    else:
        lam = lam.to(lm_logprobs.dtype)[..., None]
        keep, add = torch.log1p(-lam), torch.log(lam)
    out = lm_logprobs + keep
    return out.index_copy(-1, ids, torch.logaddexp(out[..., ids], memory_logprobs.to(lm_logprobs.dtype) + add))


def mix(lm_logprobs: torch.Tensor, other_logprobs: torch.Tensor, lam: float) -> torch.Tensor:
    """log((1 - lam) p_LM + lam p_other), elementwise, any shape (full rows [..., V] or per-target values [N]).

    Exact at the ends: lam 0 returns ``lm_logprobs``, lam 1 ``other_logprobs`` (no log(0) arithmetic).
    Computed in ``lm_logprobs``' dtype.
    """
    lam = check_lambda(lam)
    if lam == 0.0:
        return lm_logprobs
    if lam == 1.0:
        return other_logprobs
    return torch.logaddexp(lm_logprobs + math.log1p(-lam), other_logprobs.to(lm_logprobs.dtype) + math.log(lam))


def mix_per_token(lm_logprobs: torch.Tensor, memory_logprobs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """log((1 - lam) p_LM + lam p_mem) with lam per position: lam [N] and log-probs [N] (per target) or [N, V]
    (full rows; lam broadcasts over V). Exact where lam is 0 or 1. In ``lm_logprobs``' dtype."""
    lam = lam.to(lm_logprobs.dtype)
    if lm_logprobs.dim() > lam.dim():
        lam = lam[..., None]
    return torch.logaddexp(torch.log1p(-lam) + lm_logprobs, torch.log(lam) + memory_logprobs.to(lm_logprobs.dtype))


def mix_weighted(logprobs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """log sum_k w_k p_k with fixed weights (the LM's first): the terms with weight 0 are left out, so one term of
    weight 1 is returned as it is."""
    terms = [lp if w == 1.0 else lp + math.log(w) for lp, w in zip(logprobs, weights) if w > 0.0]
    out = terms[0]
    for t in terms[1:]:
        out = torch.logaddexp(out, t)
    return out


def mix_routed(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k p_k: ``logprobs`` [..., K + 1, V] (full rows) or [..., K + 1] (per target), ``weights`` [..., K + 1]."""
    w = weights.to(logprobs.dtype)
    if logprobs.dim() == w.dim() + 1:
        return torch.logsumexp(torch.log(w)[..., None] + logprobs, dim=-2)
    return torch.logsumexp(torch.log(w) + logprobs, dim=-1)


def mixture_nll_logit(
    lam_logit: torch.Tensor, lm_logprobs: torch.Tensor, memory_logprobs: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean negative log-likelihood of the per-token mixture, from the gate's pre-sigmoid output z [N].

    log((1 - g) p + g q) with g = sigmoid(z): log g = logsigmoid(z), log(1 - g) = logsigmoid(-z), so
    the loss stays finite and smooth for any z. ``weight`` [N] weighs positions (normalised by its sum).
    """
    import torch.nn.functional as F

    ll = torch.logaddexp(F.logsigmoid(-lam_logit) + lm_logprobs, F.logsigmoid(lam_logit) + memory_logprobs)
    if weight is None:
        return -ll.mean()
    return -(ll * weight).sum() / weight.sum()
