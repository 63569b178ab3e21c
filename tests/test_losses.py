"""The sparse KD loss against the naive dense reference: values and gradients."""

from __future__ import annotations

import pytest
import torch

from mlpmem.losses import dense_kd_loss_reference, sparse_kd_loss


def make_case(B=6, V=40, M=8, seed=0, pad=3, prob_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    ids = torch.stack([torch.randperm(V, generator=g)[:M] for _ in range(B)]).int()
    probs = torch.rand(B, M, generator=g)
    probs[:, M - pad :] = 0  # padding
    ids[:, M - pad :] = 0  # padded ids may repeat a real id: weight 0 must hide them
    probs = (probs / probs.sum(-1, keepdim=True)).to(prob_dtype)  # float16: no longer sums to 1
    labels = torch.randint(0, V, (B,), generator=g)
    return logits, ids, probs, labels


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_dense_reference(alpha, seed, torch_threads):
    logits, ids, probs, labels = make_case(seed=seed)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    loss, parts = sparse_kd_loss(a, ids, probs, labels, alpha)
    ref, ref_parts = dense_kd_loss_reference(b, ids, probs, labels, alpha)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["kl"], ref_parts["kl"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["ce"], ref_parts["ce"], rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_unnormalised_float16_targets_are_renormalised():
    logits, ids, probs, labels = make_case(pad=0)
    scaled = (probs.float() * 0.7).half()  # e.g. mass removed by a top-M cut
    torch.testing.assert_close(
        sparse_kd_loss(logits, ids, scaled, labels, 1.0)[0], sparse_kd_loss(logits, ids, probs, labels, 1.0)[0], rtol=2e-3, atol=1e-4
    )


def test_alpha_ends():
    logits, ids, probs, labels = make_case()
    loss0, parts = sparse_kd_loss(logits, ids, probs, labels, 0.0)
    torch.testing.assert_close(loss0, torch.nn.functional.cross_entropy(logits, labels))
    loss1, parts = sparse_kd_loss(logits, ids, probs, labels, 1.0)
    torch.testing.assert_close(loss1, parts["kl"])


def test_kl_is_zero_when_memory_matches_targets():
    V = 10
    p = torch.tensor([[0.5, 0.3, 0.2]])
    ids = torch.tensor([[2, 5, 7]])
    logits = torch.full((1, V), -1e4)
    logits[0, ids[0]] = p.log()[0]
    _, parts = sparse_kd_loss(logits, ids, p, torch.tensor([2]), 1.0)
    assert abs(parts["kl"].item()) < 1e-6


def test_all_padded_row_has_no_kl():
    logits, ids, probs, labels = make_case()
    probs[2] = 0
    ids[2] = -1  # even an invalid padding id must be harmless
    a = logits.clone().requires_grad_()
    loss, parts = sparse_kd_loss(a, ids, probs, labels, 1.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.all(a.grad[2] == 0)  # KL only, no support: no gradient at all
    ref, _ = dense_kd_loss_reference(logits, ids.clamp_min(0), probs, labels, 1.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_bf16_logits_computed_in_float32(torch_threads):
    logits, ids, probs, labels = make_case()
    low = logits.bfloat16()
    loss, _ = sparse_kd_loss(low, ids, probs, labels, 0.5)
    assert loss.dtype == torch.float32
    ref, _ = dense_kd_loss_reference(low.float(), ids, probs, labels, 0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    a = low.clone().requires_grad_()
    sparse_kd_loss(a, ids, probs, labels, 0.5)[0].backward()
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad.float()).all()
