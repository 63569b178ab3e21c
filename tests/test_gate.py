"""Gated mixing: features, the gate, its fits and files against naive references; the HF class and the pipeline with a gate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import GatedMemoryParts, forget_integrity, memory_meta

from mlpmem.errors import MlpmemError
from mlpmem.gate import (
    GATE_FEATURES,
    GateConfig,
    MixScores,
    MixingGate,
    fit_binned_gate,
    fit_gate,
    fit_mlp_gate,
    gate_features,
    gate_lambdas,
    gate_meta,
    load_gate,
    memory_fingerprint,
    save_gate,
)
from mlpmem.modeling.mixing import GATE_INPUTS, novelty
from mlpmem.modeling.mixing import mixture_nll_logit as mixture_nll
from mlpmem.interpolate import fit_lambda_em, interpolate_logprobs, interpolate_per_token, perplexity
from mlpmem.memory import MemoryConfig, MLPMemory
from mlpmem.models import load_model, logits_size
from mlpmem.modeling.read_site import decoder_layers


def naive_features(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """Row by row, term by term, in float64: the definitions of GATE_FEATURES."""
    out = []
    for a, b in zip(lp.astype(np.float64), lq.astype(np.float64)):
        p, q = np.exp(a), np.exp(b)
        h_p = -sum(pi * ai for pi, ai in zip(p, a) if pi > 0)
        h_q = -sum(qi * bi for qi, bi in zip(q, b) if qi > 0)
        kl_pq = sum(pi * (ai - bi) for pi, ai, bi in zip(p, a, b) if pi > 0)
        kl_qp = sum(qi * (bi - ai) for qi, ai, bi in zip(q, a, b) if qi > 0)
        out.append([h_p, a.max(), h_q, b.max(), min(kl_pq, 100.0), min(kl_qp, 100.0), float(a.argmax() == b.argmax())])
    return np.array(out)


def test_features_match_naive_reference():
    torch.manual_seed(0)
    lp = (torch.randn(6, 40) * 3).log_softmax(-1)
    lq = (torch.randn(6, 40) * 2).log_softmax(-1)
    lq[1] = lp[1]  # same distribution: no divergence, argmax agrees
    lp[2, 5] = -math.inf  # a token without mass in the LM: 0 log 0 = 0, KL(lm || mem) stays finite
    lp[2] = lp[2].log_softmax(-1)
    lq[3, :] = -math.inf
    lq[3, 7] = 0.0  # a one-hot memory: its entropy is 0, KL(lm || mem) is infinite and capped
    f = gate_features(lp, lq)
    assert f.shape == (6, len(GATE_FEATURES)) and f.dtype == torch.float32 and torch.isfinite(f).all()
    np.testing.assert_allclose(f.double().numpy(), naive_features(lp.numpy(), lq.numpy()), rtol=1e-4, atol=1e-4)
    assert f[1, GATE_FEATURES.index("kl_lm_memory")].abs() < 1e-5 and f[1, GATE_FEATURES.index("argmax_agree")] == 1
    assert f[3, GATE_FEATURES.index("kl_lm_memory")] == 100.0 and f[3, GATE_FEATURES.index("memory_entropy")] == 0


def test_pruned_features_and_mixture_match_the_full_rows():
    """A memory pruned to S tokens: features and mixtures computed over S equal those over full rows with -inf outside
    S, where the LM has mass outside S (KL capped), where it has none (every p there underflows: KL finite), and at
    lambda 0 and 1 exactly."""
    from mlpmem.modeling.mixing import gate_features_pruned, mix, mix_per_token, mix_pruned

    torch.manual_seed(0)
    ids = torch.tensor([1, 4, 5, 9, 17, 30])
    lp = (torch.randn(2, 3, 40) * 3).log_softmax(-1)
    lp[0, 1] = torch.full((40,), -200.0).index_fill(0, ids, 0.0).log_softmax(-1)  # all its mass on S
    lq = (torch.randn(2, 3, ids.numel()) * 2).log_softmax(-1)
    full = torch.full((2, 3, 40), -math.inf).index_copy(-1, ids, lq)
    got, want = gate_features_pruned(lp, lq, ids), gate_features(lp, full)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kl = GATE_FEATURES.index("kl_lm_memory")
    assert want[0, 1, kl] < 1 and (want[:, [0, 2], kl] == 100.0).all()  # both cases are there
    lam = torch.rand(2, 3)
    torch.testing.assert_close(mix_pruned(lp, lq, ids, lam), mix_per_token(lp, full, lam))
    torch.testing.assert_close(mix_pruned(lp, lq, ids, 0.3), mix(lp, full, 0.3))
    assert torch.equal(mix_pruned(lp, lq, ids, 0.0), lp) and torch.equal(mix_pruned(lp, lq, ids, 1.0), full)


def test_gate_output_cannot_leave_unit_interval():
    torch.manual_seed(0)
    g = MixingGate("mlp", hidden=8)
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, 1e6)  # absurd weights
    x = torch.tensor([[1e30] * 7, [-1e30] * 7, [0.0] * 7])
    lam = g(x)
    assert ((lam >= 0) & (lam <= 1)).all()
    b = MixingGate("binned", bins=3)
    with torch.no_grad():
        b.edges.copy_(torch.tensor([1.0, 2.0]))
        b.bin_logits.copy_(torch.tensor([-math.inf, 0.0, math.inf]))
    lam = b(torch.tensor([[0.5] + [0] * 6, [1.5] + [0] * 6, [9.0] + [0] * 6]))
    assert lam.tolist() == [0.0, 0.5, 1.0]  # exact ends: lambda 0 is the LM, 1 the memory


def test_per_token_interpolation_matches_naive_and_is_exact_at_the_ends():
    rng = np.random.default_rng(0)
    a, b = np.log(rng.uniform(0.01, 1, 50)), np.log(rng.uniform(0.01, 1, 50))
    lam = rng.uniform(0, 1, 50)
    lam[:5], lam[5:10] = 0.0, 1.0
    got = interpolate_per_token(a, b, lam)
    np.testing.assert_allclose(np.exp(got), (1 - lam) * np.exp(a) + lam * np.exp(b), rtol=1e-12)
    assert np.array_equal(got[:5], a[:5]) and np.array_equal(got[5:10], b[5:10])
    # a constant lambda is the fixed mixture
    np.testing.assert_allclose(interpolate_per_token(a, b, np.full(50, 0.3)), interpolate_logprobs(a, b, 0.3), rtol=1e-12)
    # rows [N, V] with a lambda per row, torch
    x, y = torch.randn(4, 9).log_softmax(-1), torch.randn(4, 9).log_softmax(-1)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0])
    mixed = interpolate_per_token(x, y, t)
    torch.testing.assert_close(mixed.exp(), (1 - t[:, None]) * x.exp() + t[:, None] * y.exp())
    assert torch.equal(mixed[0], x[0]) and torch.equal(mixed[3], y[3])
    for bad in (np.array([0.5, 1.2]), np.array([0.5, np.nan]), np.array([-0.1, 0.5])):
        with pytest.raises(MlpmemError, match="lambda"):
            interpolate_per_token(a[:2], b[:2], bad)


def test_mixture_nll_matches_naive():
    rng = np.random.default_rng(1)
    z = torch.tensor(rng.normal(0, 3, 40))
    a, b = torch.tensor(np.log(rng.uniform(0.01, 1, 40))), torch.tensor(np.log(rng.uniform(0.01, 1, 40)))
    w = torch.tensor(rng.uniform(0, 2, 40))
    g = 1 / (1 + np.exp(-z.numpy()))
    ll = np.log((1 - g) * np.exp(a.numpy()) + g * np.exp(b.numpy()))
    assert float(mixture_nll(z, a, b)) == pytest.approx(-ll.mean(), rel=1e-12)
    assert float(mixture_nll(z, a, b, w)) == pytest.approx(-(ll * w.numpy()).sum() / w.numpy().sum(), rel=1e-12)
    assert math.isfinite(float(mixture_nll(torch.tensor([800.0, -800.0]), a[:2], b[:2])))  # saturated sigmoid, finite loss


def synthetic(n=6000, seed=0):
    """The memory is right where feature 0 (LM entropy) is high and useless elsewhere."""
    rng = np.random.default_rng(seed)
    f = rng.normal(0, 1, (n, len(GATE_FEATURES))).astype(np.float32)
    good = f[:, 0] > 0.3
    lp_lm = np.log(rng.beta(2, 5, n))
    lp_mem = np.where(good, np.log(rng.beta(5, 2, n)), np.log(rng.beta(1, 30, n)))
    return f, lp_lm, lp_mem


def test_binned_gate_is_em_per_bin():
    f, a, b = synthetic()
    gate = fit_binned_gate(f[:, 0], a, b, bins=4)
    edges = np.quantile(f[:, 0], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(gate.edges.numpy(), edges, rtol=1e-6)
    lam = gate_lambdas(gate, f)
    for lo, hi in zip([-np.inf, *edges], [*edges, np.inf]):
        sel = (f[:, 0] > lo) & (f[:, 0] <= hi)
        # naive: a fine grid search of the bin's own likelihood
        grid = np.linspace(0, 1, 2001)
        best = grid[np.argmax([np.mean(np.logaddexp(np.log1p(-g) + a[sel], np.log(g) + b[sel])) if 0 < g < 1 else -np.inf for g in grid])]
        assert np.allclose(lam[sel], lam[sel][0]) and abs(lam[sel][0] - best) < 1e-3
    assert lam[f[:, 0] > 1].mean() > 0.5 > lam[f[:, 0] < -1].mean()


def test_mlp_gate_starts_fixed_and_learns_where_the_memory_helps():
    f, a, b = synthetic()
    cfg = GateConfig(steps=400)
    held = np.zeros(len(a), bool)
    held[::5] = True
    start = MixingGate("mlp", hidden=cfg.hidden)
    gate, rec = fit_mlp_gate(f, a, b, cfg, holdout=held)
    assert rec["lambda_start"] == pytest.approx(fit_lambda_em(a[~held], b[~held]), abs=1e-4)
    assert start.out.weight.abs().sum() == 0  # a fresh gate is a constant: the fixed mixture
    lam = gate_lambdas(gate, f)
    fixed = perplexity(interpolate_logprobs(a[held], b[held], rec["lambda_start"]))
    assert perplexity(interpolate_per_token(a[held], b[held], lam[held])) < 0.97 * fixed  # held-out: it generalises
    good = f[:, 0] > 0.3
    assert lam[good].mean() > 0.6 and lam[~good].mean() < 0.2


def test_fit_gate_with_generic_text_lowers_lambda_there():
    f, a, b = synthetic()
    rng = np.random.default_rng(3)
    valid = MixScores(np.zeros(len(a), np.int32), a, b, f)
    # generic text: features unlike valid's (column 2 shifted), where the memory is useless
    fg = rng.normal(0, 1, (3000, len(GATE_FEATURES))).astype(np.float32)
    fg[:, 2] += 4
    generic = MixScores(np.zeros(3000, np.int32), np.log(rng.beta(2, 5, 3000)), np.log(rng.beta(1, 30, 3000)), fg)
    gate, rec = fit_gate(valid, GateConfig(steps=400), generic)
    assert rec["n_generic"] == 3000 and gate_lambdas(gate, fg).mean() < 0.1
    with pytest.raises(MlpmemError, match="positions"):
        fit_gate(valid.take(slice(0, 1)), GateConfig())


def naive_novelty(h: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Row by row in float64: log of the smallest squared distance to a centre."""
    rows = h.reshape(-1, h.shape[-1]).double()
    out = [math.log(min(float(((r - c.double()) ** 2).sum()) for c in centroids)) for r in rows]
    return torch.tensor(out, dtype=torch.float64).reshape(h.shape[:-1])


def test_novelty_matches_naive_reference():
    torch.manual_seed(0)
    cents = torch.randn(5, 8) * 3 + 40.0  # far from the origin: the product form must not lose the differences
    h = torch.cat([cents[:2] + 0.01 * torch.randn(2, 8), torch.randn(4, 8) * 5 + 40.0]).reshape(2, 3, 8)
    torch.testing.assert_close(novelty(h, cents).double(), naive_novelty(h, cents), rtol=1e-5, atol=1e-5)
    assert novelty(h, cents).shape == (2, 3)


def test_fit_gate_reads_novelty_where_the_distributions_cannot_tell():
    """Valid and generic text alike in the seven distribution features (noise), apart in novelty: a gate given the
    novelty column steps back on generic text, one without it cannot."""
    rng = np.random.default_rng(4)
    n = 3000
    f_in, f_out = (rng.normal(0, 1, (n, len(GATE_INPUTS))).astype(np.float32) for _ in range(2))
    f_in[:, -1] -= 2.0
    f_out[:, -1] += 2.0
    valid = MixScores(np.zeros(n, np.int32), np.log(rng.beta(2, 5, n)), np.log(rng.beta(5, 2, n)), f_in)
    generic = MixScores(np.zeros(n, np.int32), np.log(rng.beta(2, 5, n)), np.log(rng.beta(1, 30, n)), f_out)
    cents = rng.normal(0, 1, (3, 4)).astype(np.float32)
    gate, _ = fit_gate(valid, GateConfig(steps=300), generic, cents)
    assert gate.reads_hidden and torch.equal(gate.centroids, torch.from_numpy(cents))
    assert gate_lambdas(gate, f_in).mean() > 0.7 and gate_lambdas(gate, f_out).mean() < 0.1
    blind, _ = fit_gate(valid, GateConfig(steps=300), generic)  # the same scores, the distribution features alone
    assert not blind.reads_hidden and gate_lambdas(blind, f_out).mean() > 0.2


def tiny_memory(lm, seed=1):
    torch.manual_seed(seed)
    mem = MLPMemory(MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1, zero_init_blocks=False))
    mem.head.weight.data.normal_(0.0, 0.5)
    return mem.eval()


@pytest.fixture(scope="module")
def gated_parts(tiny_llama) -> GatedMemoryParts:
    lm, tok, model_id = load_model(str(tiny_llama))
    meta = memory_meta(model_id, tok, 1, "ffn_input", lm=lm)
    mem = tiny_memory(lm)
    torch.manual_seed(5)
    gate = MixingGate("mlp", hidden=4)
    with torch.no_grad():
        # centred on the features' usual values, so that lambda varies from token to token
        gate.shift.copy_(torch.tensor([4.0, -2.0, 3.0, -1.0, 5.0, 4.0, 0.5]))
        gate.inner.weight.normal_(0, 1.0)
        gate.out.weight.normal_(0, 1.0)
        gate.out.bias.zero_()
    return GatedMemoryParts(lm, tok, mem, meta, gate.eval(), gate_meta(mem, GateConfig(), {}, meta))


def test_gate_files_round_trip_and_refuse_another_memory(gated_parts, tmp_path):
    lm, _, mem, _, gate, gmeta = gated_parts
    save_gate(tmp_path / "g", gate, gmeta)
    loaded, meta = load_gate(tmp_path / "g", mem)
    x = torch.randn(5, 7)
    assert torch.equal(loaded(x), gate(x)) and meta["memory_fingerprint"] == memory_fingerprint(mem)
    assert not list(tmp_path.glob("g/*.pt")) and not list(tmp_path.glob("g/*.pkl"))  # safetensors + JSON, never pickle
    with pytest.raises(MlpmemError, match="another memory"):
        load_gate(tmp_path / "g", tiny_memory(lm, seed=2))
    assert memory_fingerprint(mem) == memory_fingerprint(tiny_memory(lm, seed=1))  # same weights, same fingerprint
    cfg = json.loads((tmp_path / "g" / "gate_config.json").read_text())
    cfg["config"]["kind"] = "oracle"
    (tmp_path / "g" / "gate_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlpmemError, match="gate kind"):
        load_gate(tmp_path / "g")
    (tmp_path / "g" / "model.safetensors").unlink()
    with pytest.raises(MlpmemError, match="model.safetensors is missing"):
        load_gate(tmp_path / "g")


def ref_gated(lm, mem, gate, ids):
    """Naive reference: own hook on layer 1's FFN input, full-vocabulary log-probs, features (and the naive novelty of
    the memory's input for a gate that reads it), gate, per-token mixture."""
    seen = []
    h = decoder_layers(lm)[1].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            lp = lm(ids, use_cache=False).logits.float().log_softmax(-1)
            lq = mem(seen[0]).float().log_softmax(-1)
            f = gate_features(lp, lq)
            if gate.reads_hidden:
                f = torch.cat([f, naive_novelty(seen[0], gate.centroids).float().unsqueeze(-1)], -1)
            lam = gate(f)
    finally:
        h.remove()
    return interpolate_per_token(lp, lq, lam), lam


def test_hf_gated_forward_save_load_and_refusals(gated_parts, tmp_path):
    from mlpmem.transformers_integration import MLPMemoryForCausalLM

    lm, tok, mem, meta, gate, gmeta = gated_parts
    model = MLPMemoryForCausalLM.from_parts(lm, mem, meta, tokenizer=tok, lambda_=0.3, gate=gate, gate_meta=gmeta)
    assert model.mixing_mode == "gated"  # a gate given: used by default
    ids = tok(["the union and the people of", "congress has a law that"], return_tensors="pt", padding=True).input_ids
    want, lam = ref_gated(lm, mem, gate, ids)
    assert lam.std() > 0.05  # lambda really varies per token
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
        fixed = model(ids, mixing="fixed").logits
        assert not torch.allclose(fixed, want, atol=1e-3)
        # an explicit lambda_ is the fixed mixture; lambda 0 is the base LM bit for bit, gate or not
        assert torch.equal(model(ids, lambda_=0.3).logits, fixed)
        assert torch.equal(model(ids, lambda_=0.0).logits, lm(ids).logits.float().log_softmax(-1))
        with model.mixing(mode="fixed"):
            assert torch.equal(model(ids).logits, fixed)
        assert model.mixing_mode == "gated"
    with pytest.raises(MlpmemError, match="both"):
        model(ids, mixing="gated", lambda_=0.2)
    with pytest.raises(MlpmemError, match="mixing must be"):
        model(ids, mixing="sometimes")
    # greedy generation goes through the gated forward at every step
    p = ids[:1, :4]
    out = model.generate(p, max_new_tokens=5, do_sample=False)
    seq = p
    for _ in range(5):
        seq = torch.cat([seq, ref_gated(lm, mem, gate, seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tolist() == seq[:, : out.shape[1]].tolist()
    # saved with its gate (by reference and full export): gated by default, fixed on request
    for full in (False, True):
        folder = tmp_path / f"saved{int(full)}"
        model.save_pretrained(folder, full_export=full)
        assert (folder / "gate" / "model.safetensors").exists() != full
        loaded = MLPMemoryForCausalLM.from_pretrained(folder)
        assert loaded.mixing_mode == "gated"
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert MLPMemoryForCausalLM.from_pretrained(folder, mixing="fixed").mixing_mode == "fixed"
    # a gate trained for another memory is refused, on pairing and on loading
    other = tiny_memory(lm, seed=2)
    with pytest.raises(MlpmemError, match="another memory"):
        MLPMemoryForCausalLM.from_parts(lm, other, meta, gate=gate, gate_meta=gmeta)
    cfg = json.loads((tmp_path / "saved0" / "gate" / "gate_config.json").read_text())
    cfg["meta"]["memory_fingerprint"] = "0" * 16
    (tmp_path / "saved0" / "gate" / "gate_config.json").write_text(json.dumps(cfg))
    forget_integrity(tmp_path / "saved0")
    with pytest.raises(MlpmemError, match="another memory"):
        MLPMemoryForCausalLM.from_pretrained(tmp_path / "saved0")
    # a mixing that does not use the gate neither reads nor checks it: an explicit lambda_ is the fixed mixture
    for kw in ({"mixing": "fixed"}, {"lambda_": 0.0}):
        fixed = MLPMemoryForCausalLM.from_pretrained(tmp_path / "saved0", **kw)
        assert fixed.mixing_mode == "fixed" and fixed.gate is None
    assert torch.equal(fixed(ids).logits, lm(ids).logits.float().log_softmax(-1))  # lambda_=0: the base LM bit for bit
    cfg = json.loads((tmp_path / "saved1" / "config.json").read_text())
    cfg["gate_config"]["meta"]["memory_fingerprint"] = "0" * 16
    (tmp_path / "saved1" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlpmemError, match="another memory"):
        MLPMemoryForCausalLM.from_pretrained(tmp_path / "saved1")
    assert MLPMemoryForCausalLM.from_pretrained(tmp_path / "saved1", lambda_=0.3).gate is None  # full export: not checked either
    plain = MLPMemoryForCausalLM.from_parts(lm, mem, meta)
    assert plain.mixing_mode == "fixed"
    with pytest.raises(MlpmemError, match="needs a gate"):
        plain(ids, mixing="gated")
    with pytest.raises(MlpmemError, match="needs a gate"):
        MLPMemoryForCausalLM.from_parts(lm, mem, meta, mixing="gated")


def test_from_memory_finds_the_runs_gate(gated_parts, tmp_path):
    from mlpmem.transformers_integration import MLPMemoryForCausalLM
    from mlpmem.memory import save_memory

    lm, tok, mem, meta, gate, gmeta = gated_parts
    save_memory(tmp_path / "run" / "train" / "memory", mem, meta)
    assert MLPMemoryForCausalLM.from_memory(tmp_path / "run" / "train" / "memory").mixing_mode == "fixed"
    save_gate(tmp_path / "run" / "gate", gate, gmeta)
    m = MLPMemoryForCausalLM.from_memory(tmp_path / "run" / "train" / "memory")
    assert m.mixing_mode == "gated" and m.gate is not None
    assert MLPMemoryForCausalLM.from_memory(tmp_path / "run" / "train" / "memory", mixing="fixed").mixing_mode == "fixed"
    save_gate(tmp_path / "run" / "gate", gate, dict(gmeta, memory_fingerprint="f" * 16))
    with pytest.raises(MlpmemError, match="another memory"):
        MLPMemoryForCausalLM.from_memory(tmp_path / "run" / "train" / "memory")


def test_loading_a_memory_uses_what_its_run_fitted(gated_parts, tmp_path):
    """No hard-coded lambda: a memory loads with its run's valid-fitted lambda (report, else the train stage's valid fit);
    an explicit lambda_ means the fixed mixture with it, even where the run has a gate, which is then not read at all."""
    import json

    from mlpmem.transformers_integration import MLPMemoryForCausalLM
    from mlpmem.memory import save_memory

    lm, tok, mem, meta, gate, gmeta = gated_parts
    mdir = tmp_path / "run" / "train" / "memory"
    save_memory(mdir, mem, meta)
    assert MLPMemoryForCausalLM.from_memory(mdir).lambda_ == 0.25  # nothing recorded: the fallback, with a warning
    (tmp_path / "run" / "train" / "manifest.json").write_text(json.dumps({"valid": {"lambda": 0.31}}))
    assert MLPMemoryForCausalLM.from_memory(mdir).lambda_ == pytest.approx(0.31)
    (tmp_path / "run" / "report.json").write_text(json.dumps({"lambda": {"mlp_memory": 0.42}}))
    assert MLPMemoryForCausalLM.from_memory(mdir).lambda_ == pytest.approx(0.42)
    save_gate(tmp_path / "run" / "gate", gate, dict(gmeta, memory_fingerprint="f" * 16))  # stale: fitted for another memory
    base = MLPMemoryForCausalLM.from_memory(mdir, lambda_=0.0)
    assert base.mixing_mode == "fixed" and base.gate is None and base.lambda_ == 0.0
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(base(ids).logits, lm(ids).logits.float().log_softmax(-1))  # lambda 0 is the base LM bit for bit


def test_scoring_for_the_gate_matches_the_model_class(gated_parts):
    """score_mixing's per-token log-probs and features are those of the HF forward (windows of 16, stride 8)."""
    from mlpmem.gate import score_mixing
    from mlpmem.modeling.read_site import ReadSite

    lm, tok, mem, meta, gate, gmeta = gated_parts
    tokens = np.array(tok(" ".join(["the union and the people of congress"] * 6)).input_ids, dtype=np.int64)[:40]
    sc = score_mixing(lm, tokens, 16, 8, mem, ReadSite(1, "ffn_input"), batch_size=2)
    assert sc.n == len(tokens) - 1 and np.array_equal(sc.labels, tokens[1:])
    ids = torch.tensor(tokens[None, :16])
    with torch.no_grad():
        lp = lm(ids).logits.float().log_softmax(-1)[0, :15]
    np.testing.assert_allclose(sc.lm_logprob[:15], lp.gather(-1, ids[0, 1:, None])[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    _, lam = ref_gated(lm, mem, gate, ids)
    np.testing.assert_allclose(gate_lambdas(gate, sc.features[:15]), lam[0, :15].numpy(), rtol=1e-4, atol=1e-5)


def test_a_gate_reading_the_memorys_input_scores_saves_and_mixes_as_the_naive_reference(gated_parts, tmp_path):
    """The novelty gate: the model class passes it the memory's own input, score_mixing gives it the same column, and
    its centres survive saving; without the input it refuses with a message."""
    from mlpmem.gate import score_mixing
    from mlpmem.modeling.read_site import ReadSite
    from mlpmem.transformers_integration import MLPMemoryForCausalLM

    lm, tok, mem, meta, _, gmeta = gated_parts
    torch.manual_seed(7)
    gate = MixingGate("mlp", GATE_INPUTS, hidden=4, centroids=3, d=32)
    with torch.no_grad():
        gate.centroids.normal_(0, 1.0)
        gate.shift.copy_(torch.tensor([4.0, -2.0, 3.0, -1.0, 5.0, 4.0, 0.5, 3.0]))
        gate.inner.weight.normal_(0, 1.0)
        gate.out.weight.normal_(0, 1.0)
    gate.eval()
    tokens = np.array(tok(" ".join(["the union and the people of congress"] * 6)).input_ids, dtype=np.int64)[:40]
    ids = torch.tensor(tokens[None, :16])
    want, lam = ref_gated(lm, mem, gate, ids)
    model = MLPMemoryForCausalLM.from_parts(lm, mem, meta, tokenizer=tok, gate=gate, gate_meta=gmeta).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    sc = score_mixing(lm, tokens, 16, 8, mem, ReadSite(1, "ffn_input"), batch_size=2, gate=gate)
    assert sc.features.shape == (len(tokens) - 1, len(GATE_INPUTS))
    np.testing.assert_allclose(gate_lambdas(gate, sc.features[:15]), lam[0, :15].numpy(), rtol=1e-4, atol=1e-5)
    save_gate(tmp_path / "g", gate, gmeta)
    loaded, _ = load_gate(tmp_path / "g", mem)
    x, h = torch.randn(5, len(GATE_FEATURES)), torch.randn(5, 32)
    assert loaded.reads_hidden and torch.equal(loaded(x, h), gate(x, h))
    with pytest.raises(MlpmemError, match="hidden state"):
        gate(x)


def test_scoring_for_the_gate_takes_the_datastores_prefix(gated_parts):
    """With a window prefix (datastore.bos) the gate is scored on the positions and states the evaluator scores:
    the LM's and the memory's log-probs equal evaluate.score_online's with the same prefix (which the pipeline
    refused for gated mixing before)."""
    from mlpmem.evaluate import score_online
    from mlpmem.gate import score_mixing
    from mlpmem.modeling.read_site import ReadSite

    lm, tok, mem, *_ = gated_parts
    tokens = np.array(tok(" ".join(["the union and the people of congress"] * 6)).input_ids, dtype=np.int64)[:40]
    site = ReadSite(1, "ffn_input")
    sc = score_mixing(lm, tokens, 16, 6, mem, site, batch_size=2, prefix=(1,))
    ref = score_online(lm, tokens, 16, 6, None, memory=mem, memory_site=site, batch_size=2, prefix=(1,))
    assert np.array_equal(sc.labels, ref.labels) and sc.n == len(tokens) - 1
    np.testing.assert_allclose(sc.lm_logprob, ref.lm_logprob, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sc.memory_logprob, ref.memory_logprob, rtol=1e-5, atol=1e-5)
    plain = score_mixing(lm, tokens, 16, 6, mem, site, batch_size=2)
    assert not np.allclose(plain.memory_logprob, sc.memory_logprob)  # the prefix changes what the memory reads


def test_lm_eval_backend_takes_mixing(gated_parts, tmp_path):
    pytest.importorskip("lm_eval")
    from mlpmem.lm_eval_backend import load_mixture
    from mlpmem.memory import save_memory

    lm, tok, mem, meta, gate, gmeta = gated_parts
    mdir = tmp_path / "run" / "train" / "memory"
    save_memory(mdir, mem, meta)
    save_gate(tmp_path / "run" / "gate", gate, gmeta)
    assert load_mixture(memory=str(mdir))[0].mixing_mode == "gated"  # the run's gate, by default
    assert load_mixture(memory=str(mdir), mixing="fixed")[0].mixing_mode == "fixed"
    with pytest.raises(MlpmemError, match="mixing must be"):
        load_mixture(memory=str(mdir), mixing="always")


def test_cli_mixing_errors_are_one_line(gated_parts, tmp_path, capsys):
    from helpers import run_cli
    from mlpmem.memory import save_memory

    lm, tok, mem, meta, _, _ = gated_parts
    save_memory(tmp_path / "mem", mem, meta)
    rc, err = run_cli(capsys, "generate", tmp_path / "mem", "the union", "--mixing", "gated", "--max-new-tokens", "2")
    assert rc == 2 and "needs a gate" in err
    rc, err = run_cli(capsys, "generate", tmp_path / "mem", "the union", "--mixing", "often", "--max-new-tokens", "2")
    assert rc == 2 and "mixing must be" in err


def test_pipeline_reports_gated_beside_fixed(tmp_path, tiny_llama, tiny_corpus_file):
    from helpers import tiny_recipe

    from mlpmem.transformers_integration import MLPMemoryForCausalLM
    from mlpmem.pipeline import load_recipe, run_pipeline

    recipe = dict(
        # a head pruned to the train text's tokens (-inf elsewhere) through the gate, the report and loading
        tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file, init="lm_copy", input_site="output", head_vocab="corpus"),
        eval={"mixing": "gated", "memory_dtype": "int8"},
        gate={"steps": 60, "hidden": 8},
    )
    r = run_pipeline(load_recipe(recipe))
    assert r["memory_dtype"] == "int8"
    assert {"base", "mlp_memory", "mlp_memory_gated"} <= set(r["ppl"]) and "mlp_memory_gated" in r["tokens_per_s"]
    assert math.isfinite(r["ppl"]["mlp_memory_gated"]) and 0 <= r["gate"]["mean_lambda"] <= 1
    assert (tmp_path / "run" / "gate" / "manifest.json").exists()
    assert 64 * 32 < r["gate"]["params"] < 64 * 32 + 1000  # a few hundred weights and 64 centres of the train inputs (d = 32)
    ood = r["out_of_domain"]  # LM samples the gate did not see, each mixture against the LM alone
    assert set(ood["vs_base"]) == {"mlp_memory", "mlp_memory_gated"} and ood["ppl"]["base"] > 1
    assert "Out of domain (" in (tmp_path / "run" / "report.md").read_text()
    # the run's memory now loads with its gate, and mixes per token by default
    model = MLPMemoryForCausalLM.from_memory(tmp_path / "run" / "train" / "memory")
    assert model.mixing_mode == "gated" and 0 < model.components()["memory"].config.head_tokens < model.config.text_config.vocab_size
    assert model.gate.reads_hidden and model.gate.centroids.shape == (64, 32)
    # loaded as its run evaluated it (int8, eval.memory_dtype), unless told otherwise
    assert model.components()["memory"]._int8 is not None
    asked = MLPMemoryForCausalLM.from_memory(tmp_path / "run" / "train" / "memory", memory_dtype="float32")
    assert asked.components()["memory"]._int8 is None
    model.save_pretrained(tmp_path / "saved")  # a saved model decodes as the run measured too, unless told otherwise
    assert MLPMemoryForCausalLM.from_pretrained(tmp_path / "saved").components()["memory"]._int8 is not None
    assert MLPMemoryForCausalLM.from_pretrained(tmp_path / "saved", memory_dtype="float32").components()["memory"]._int8 is None
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
    with pytest.raises(MlpmemError, match="eval.mixing"):
        load_recipe(dict(recipe, eval={"mixing": "sometimes"}))
    with pytest.raises(MlpmemError, match="gate.kind"):
        load_recipe(dict(recipe, gate={"kind": "oracle"}))
    with pytest.raises(MlpmemError, match="gate.generic"):  # before the first stage, not after the memory trained
        load_recipe(dict(recipe, gate={"generic": str(tmp_path / "nowhere.jsonl")}))


def test_gated_export_loads_as_remote_code_without_mlpmem(gated_parts, tmp_path):
    """The gate's forward lives in the self-contained modeling file: a full export mixes per token where mlpmem is absent."""
    import os
    import subprocess
    import sys

    from mlpmem.transformers_integration import MLPMemoryForCausalLM

    lm, tok, mem, meta, gate, gmeta = gated_parts
    model = MLPMemoryForCausalLM.from_parts(lm, mem, meta, tokenizer=tok, gate=gate, gate_meta=gmeta)
    model.save_pretrained(tmp_path / "full", full_export=True)
    ids = tok("the union and the people of", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits[0, -1].tolist(), model(ids, mixing="fixed").logits[0, -1].tolist()
    code = (
        "import sys, json, torch\nsys.modules['mlpmem'] = None\nfrom transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "p = torch.tensor([json.loads(sys.argv[2])])\n"
        "with torch.no_grad():\n"
        "    print(json.dumps([m.mixing_mode, m(p).logits[0, -1].tolist(), m(p, mixing='fixed').logits[0, -1].tolist()]))\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "full"), json.dumps(ids[0].tolist())],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    mode, gated, fixed = json.loads(run.stdout.strip().splitlines()[-1])
    assert mode == "gated"
    np.testing.assert_allclose(gated, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fixed, want[1], rtol=1e-5, atol=1e-5)


def test_router_weights_and_mixture_match_naive_and_refuse_no_memory():
    from mlpmem.modeling.gating import MemoryRouter
    from mlpmem.modeling.mixing import mix_routed

    torch.manual_seed(0)
    r = MemoryRouter(2, hidden=5)
    with torch.no_grad():
        r.out.weight.normal_(0, 1e4)  # absurd weights: still a distribution over LM + 2 memories
    w = r(torch.randn(6, 2, len(GATE_FEATURES)) * 1e3)
    assert w.shape == (6, 3) and (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(6))
    lp = torch.randn(6, 3, 11).log_softmax(-1)
    w = torch.rand(6, 3)
    w = w / w.sum(-1, keepdim=True)
    naive = torch.log(sum(w[:, k, None] * lp[:, k].exp() for k in range(3)))
    torch.testing.assert_close(mix_routed(lp, w), naive)
    torch.testing.assert_close(mix_routed(lp[..., 4], w), naive[:, 4])  # per-target values
    with pytest.raises(MlpmemError, match="at least one memory"):
        MemoryRouter(0)
    with pytest.raises(MlpmemError, match="features of 2 memories"):
        r(torch.randn(4, 3, len(GATE_FEATURES)))


def test_router_learns_which_memory_knows_each_token():
    """Two domains: memory 1 is right on domain A, memory 2 on domain B, and the features tell the domains apart."""
    from mlpmem.interpolate import fit_mixture_em, interpolate_many
    from mlpmem.gate import fit_router, router_weights

    rng = np.random.default_rng(0)
    n = 6000
    dom_b = rng.random(n) < 0.5
    feats = rng.normal(0, 1, (n, 2, len(GATE_FEATURES))).astype(np.float32)
    feats[dom_b, 1, 4] -= 2.0  # memory 2 agrees with the LM more on B (lower KL), memory 1 on A
    feats[~dom_b, 0, 4] -= 2.0
    good, bad = np.log(rng.beta(5, 2, n)), np.log(rng.beta(1, 30, n))
    lp = np.stack([np.log(rng.beta(2, 5, n)), np.where(dom_b, bad, good), np.where(dom_b, good, bad)], 1)
    held = np.zeros(n, bool)
    held[::5] = True
    router, rec = fit_router(lp, feats, GateConfig(steps=400), held)
    w = router_weights(router, feats)
    assert w[dom_b, 2].mean() > 0.6 and w[~dom_b, 1].mean() > 0.6
    fixed = fit_mixture_em([lp[~held, k] for k in range(3)])
    routed = -np.mean(np.logaddexp.reduce(np.log(w[held]) + lp[held], axis=1))
    assert routed < -np.mean(interpolate_many([lp[held, k] for k in range(3)], fixed)) - 0.1  # held out: better than fixed weights


def test_one_pass_scores_several_memories(gated_parts):
    from mlpmem.gate import score_memories, score_mixing
    from mlpmem.modeling.read_site import ReadSite

    lm, tok, mem, meta, _, _ = gated_parts
    other = tiny_memory(lm, seed=3)
    tokens = np.array(tok(" ".join(["war and peace in the union"] * 6)).input_ids, dtype=np.int64)[:30]
    labels, lp, feats, _ = score_memories(
        lm, tokens, 16, 8, [(mem, ReadSite(1, "ffn_input")), (other, ReadSite(0, "output"))], batch_size=2
    )
    one = score_mixing(lm, tokens, 16, 8, mem, ReadSite(1, "ffn_input"), batch_size=2)
    two = score_mixing(lm, tokens, 16, 8, other, ReadSite(0, "output"), batch_size=2)
    assert lp.shape == (29, 3) and feats.shape == (29, 2, len(GATE_FEATURES)) and np.array_equal(labels, one.labels)
    np.testing.assert_allclose(lp[:, 0], one.lm_logprob, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lp[:, 1], one.memory_logprob, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lp[:, 2], two.memory_logprob, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(feats[:, 1], two.features, rtol=1e-5, atol=1e-5)
    with pytest.raises(MlpmemError, match="no memory"):
        score_memories(lm, tokens, 16, 8, [])


def test_runs_gate_by_default_where_valid_can_fit_one():
    """The default (eval.mixing auto) fits a gate, on valid + text sampled from the LM, whenever valid has the positions."""
    from mlpmem.gate import GateConfig
    from mlpmem.pipeline import EvalConfig, resolve_mixing
    from mlpmem.stages import MIN_VALID_POSITIONS

    need = MIN_VALID_POSITIONS["gated"]
    assert EvalConfig().mixing == "auto" and GateConfig().generic == "lm"
    assert [resolve_mixing("auto", n) for n in (need - 1, need, 10**6)] == ["fixed", "gated", "gated"]
    assert resolve_mixing("fixed", 10**6) == "fixed" and resolve_mixing("gated", 0) == "gated"  # an explicit setting wins
