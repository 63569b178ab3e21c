"""The memory's training loss, from sparse kNN targets: alpha * KL(p_kNN || q) + (1 - alpha) * CE(y, q).

The targets are the top-M tokens of each row's kNN distribution, so KL needs only
the M support entries plus the log-sum-exp of the logits. A dense [B, V] target
(what the paper's code builds) would cost B * V floats per batch for nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_kd_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over positions of ``alpha * KL(p || q) + (1 - alpha) * CE(y, q)``, q = softmax(logits).

    logits [B, V] (any float dtype; computed in float32), target_ids [B, M] int,
    target_probs [B, M] (float16 is fine; padding has probability 0; rows are
    renormalised, since float16 rows rarely sum to 1), labels [B] int.
    A row without support contributes KL 0. Returns (loss, {"kl", "ce"}), the
    parts detached.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # [B]
    p = target_probs.float().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # all-padded row stays 0
    support = p > 0
    # padded ids may be anything (even out of range): read a safe column, weight 0
    ids = torch.where(support, target_ids.long(), torch.zeros_like(target_ids, dtype=torch.long))
    log_q = logits.gather(-1, ids) - lse[:, None]  # [B, M]
    log_p = torch.log(torch.where(support, p, torch.ones_like(p)))  # 0 where p = 0, no -inf
    kl = (p * (log_p - log_q)).sum(-1)  # [B]
    ce = lse - logits.gather(-1, labels.long()[:, None]).squeeze(-1)  # [B]
    loss = (alpha * kl + (1.0 - alpha) * ce).mean()
    return loss, {"kl": kl.mean().detach(), "ce": ce.mean().detach()}


def dense_kd_loss_reference(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Naive dense version of :func:`sparse_kd_loss`, for tests only (builds [B, V] targets)."""
    logits = logits.float()
    B, V = logits.shape
    p = target_probs.float()
    mask = p > 0
    dense = torch.zeros(B, V).scatter_add_(1, torch.where(mask, target_ids.long(), 0), torch.where(mask, p, 0.0))
    total = dense.sum(-1, keepdim=True)
    dense = torch.where(total > 0, dense / total.clamp_min(1e-30), dense)
    log_q = F.log_softmax(logits, dim=-1)
    kl = torch.where(dense > 0, dense * (torch.log(dense.clamp_min(1e-30)) - log_q), torch.zeros_like(log_q)).sum(-1)
    ce = F.cross_entropy(logits, labels.long(), reduction="none")
    loss = (alpha * kl + (1.0 - alpha) * ce).mean()
    return loss, {"kl": kl.mean().detach(), "ce": ce.mean().detach()}
