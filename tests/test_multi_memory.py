"""Several memories on one LM (issue 12 item 2): the mixture against a naive reference, the router, add/remove, save/load, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TwoMemoryParts, forget_integrity, memory_meta
from torch import nn

from mlpmem.errors import MlpmemError
from mlpmem.memory import MemoryConfig, MLPMemory, save_memory
from mlpmem.models import load_model, logits_size, model_fingerprint
from mlpmem.modeling.read_site import decoder_layers

hf = pytest.importorskip("mlpmem.transformers_integration")
MLPMemoryForCausalLM = hf.MLPMemoryForCausalLM
from mlpmem.modeling.mixing import gate_features  # noqa: E402
from mlpmem.modeling.gating import MemoryRouter  # noqa: E402

# two memories that read different sites of the tiny llama (2 layers): one LM pass must feed both
SITE_A, SITE_B = (1, "ffn_input"), (0, "output")
F32 = torch.finfo(torch.float32).eps
CLOSE = dict(rtol=64 * F32, atol=64 * F32)


def random_memory(lm, seed: int) -> MLPMemory:
    torch.manual_seed(seed)
    mem = MLPMemory(MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1, zero_init_blocks=False))
    mem.head.weight.data.normal_(0.0, 0.5)  # peaked: each memory changes the mixture visibly
    return mem.eval()


def random_router(n: int, seed: int = 0) -> MemoryRouter:
    torch.manual_seed(seed)
    r = MemoryRouter(n, hidden=8)
    with torch.no_grad():
        r.out.weight.normal_(0.0, 2.0)  # weights that really vary per token
        r.scale.fill_(3.0)
    return r.eval()


class StandIn(nn.Module):
    """A kNN-LM-like component: returns normalised log-probs itself (returns_logprobs), and carries its meta."""

    returns_logprobs = True

    def __init__(self, lm, meta, seed: int = 7) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(32, logits_size(lm))
        self.meta = dict(meta)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (3.0 * self.proj(h.float())).log_softmax(-1)


@pytest.fixture(scope="module")
def two_memory_parts(tiny_llama) -> TwoMemoryParts:
    lm, tok, model_id = load_model(str(tiny_llama))
    meta_a = memory_meta(model_id, tok, *SITE_A, lm=lm)
    meta_b = memory_meta(model_id, tok, *SITE_B, lm=lm)
    return TwoMemoryParts(lm, tok, random_memory(lm, 1), meta_a, random_memory(lm, 2), meta_b)


def two(parts: TwoMemoryParts, **kw) -> MLPMemoryForCausalLM:
    lm, tok, a, ma, b, mb = parts
    return MLPMemoryForCausalLM.from_parts(lm, a, ma, tokenizer=tok, name="a", memories=[("b", b, mb)], **kw)


def ids_of(tok) -> torch.Tensor:
    return tok(["the union and the people of", "congress has a law that"], return_tensors="pt", padding=True).input_ids


def reads(lm, ids, sites) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Naive: one hook per site, by hand; (LM log-probs, hidden state per site)."""
    seen, handles = {}, []
    for layer, site in sites:
        block = decoder_layers(lm)[layer]
        if site == "ffn_input":
            handles.append(block.mlp.register_forward_pre_hook(lambda m, a, k=(layer, site): seen.__setitem__(k, a[0])))
        else:
            handles.append(
                block.register_forward_hook(lambda m, a, o, k=(layer, site): seen.__setitem__(k, o[0] if isinstance(o, tuple) else o))
            )
    try:
        with torch.no_grad():
            lp = lm(ids, use_cache=False).logits.double().log_softmax(-1)
    finally:
        for h in handles:
            h.remove()
    return lp, [seen[s] for s in sites]


def naive_mixture(lps: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k p_k term by term in float64; lps [B, T, V] each, w [B, T, K] (or [K])."""
    w = w.double().expand(*lps[0].shape[:-1], len(lps))
    return torch.log(sum(w[..., k, None] * lps[k].exp() for k in range(len(lps))))


def test_two_memories_match_a_naive_mixture_fixed_and_routed(two_memory_parts, torch_threads):
    lm, tok, a, ma, b, mb = two_memory_parts
    model = two(two_memory_parts)
    ids = ids_of(tok)
    lp_lm, (ha, hb) = reads(lm, ids, [SITE_A, SITE_B])
    with torch.no_grad():
        lp_a, lp_b = a(ha).double().log_softmax(-1), b(hb).double().log_softmax(-1)
        # fixed weights, and lambda split evenly over the memories
        for w in ([0.5, 0.3, 0.2], [0.2, 0.0, 0.8]):
            want = naive_mixture([lp_lm, lp_a, lp_b], torch.tensor(w))
            torch.testing.assert_close(model(ids, weights=w).logits.double(), want, **CLOSE)
        torch.testing.assert_close(
            model(ids, lambda_=0.4).logits.double(), naive_mixture([lp_lm, lp_a, lp_b], torch.tensor([0.6, 0.2, 0.2])), **CLOSE
        )
        # each memory matters (else the equality above proves little)
        assert (model(ids, weights=[0.5, 0.3, 0.2]).logits - model(ids, weights=[0.5, 0.5, 0.0]).logits).abs().max() > 1e-2
        # routed: the features of each memory against the LM, the router's softmax, the mixture
        router = random_router(2)
        model.set_router(router)
        feats = torch.stack([gate_features(lp_lm.float(), lp_a.float()), gate_features(lp_lm.float(), lp_b.float())], -2)
        w = router(feats)
        assert w.std(dim=(0, 1)).max() > 0.05  # the weights really vary per token
        torch.testing.assert_close(model(ids).logits.double(), naive_mixture([lp_lm, lp_a, lp_b], w), rtol=1e-5, atol=1e-5)
        assert model.mixing_mode == "routed"


def test_router_weights_sum_to_one_and_the_lm_runs_once(two_memory_parts):
    lm, tok, *_ = two_memory_parts
    model = two(two_memory_parts, router=random_router(2, seed=3))
    seen, calls = [], []
    h1 = model.memory_router.register_forward_hook(lambda m, a, o: seen.append(o))
    h2 = model.lm.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with torch.no_grad():
            model(ids_of(tok))
    finally:
        h1.remove()
        h2.remove()
    w = seen[0]
    assert w.shape[-1] == 3 and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), rtol=0, atol=1e-6)
    assert len(calls) == 1  # one LM pass feeds both sites


def test_lambda_zero_is_the_base_lm_and_zero_weights_skip_memories(two_memory_parts):
    lm, tok, a, ma, b, mb = two_memory_parts
    model = two(two_memory_parts, router=random_router(2))
    ids = ids_of(tok)
    calls = []
    handles = [m.register_forward_hook(lambda mod, i, o: calls.append(1)) for m in (a, b)]
    try:
        with torch.no_grad():
            base = lm(ids).logits.float().log_softmax(-1)
            assert torch.equal(model(ids, lambda_=0.0).logits, base)  # bit for bit, router or not
            assert torch.equal(model(ids, weights=[1.0, 0.0, 0.0]).logits, base)
            assert calls == []
            model(ids, weights=[0.5, 0.5, 0.0])
            assert len(calls) == 1  # the memory with weight 0 is not run
    finally:
        for h in handles:
            h.remove()


def test_one_memory_behaves_as_before_and_add_remove_returns_to_it(two_memory_parts, tmp_path):
    lm, tok, a, ma, b, mb = two_memory_parts
    model = MLPMemoryForCausalLM.from_parts(lm, a, ma, tokenizer=tok, lambda_=0.5)
    ids = ids_of(tok)
    lp_lm, (ha,) = reads(lm, ids, [SITE_A])
    with torch.no_grad():
        before = model(ids).logits
        torch.testing.assert_close(
            before.double(), naive_mixture([lp_lm, a(ha).double().log_softmax(-1)], torch.tensor([0.5, 0.5])), **CLOSE
        )
        assert model.memory_names == ["memory"] and model.memory is a and model.site == SITE_A
        save_memory(tmp_path / "run_b" / "train" / "memory", b, mb)
        name = model.add_memory(tmp_path / "run_b" / "train" / "memory", name="b")
        assert name == "b" and model.memory_names == ["memory", "b"] and model.n_memories == 2
        assert not torch.equal(model(ids).logits, before)  # lambda 0.5 is now split over two memories
        model.remove_memory("b")
        assert torch.equal(model(ids).logits, before)
        # removing the first promotes the next, with its own site and meta
        model.add_memory(b, name="b", meta=mb)
        model.remove_memory("memory")
        assert model.memory_names == ["b"] and model.site == SITE_B and model.config.memory_meta["site"] == SITE_B[1]
        lp_lm, (hb,) = reads(lm, ids, [SITE_B])
        torch.testing.assert_close(
            model(ids).logits.double(), naive_mixture([lp_lm, b(hb).double().log_softmax(-1)], torch.tensor([0.5, 0.5])), **CLOSE
        )
    with pytest.raises(MlpmemError, match="only memory"):
        model.remove_memory("b")
    with pytest.raises(MlpmemError, match="no memory named"):
        model.remove_memory("zzz")


@pytest.mark.parametrize("full_export", [False, True])
def test_save_load_round_trip_with_two_memories_and_a_router(two_memory_parts, tmp_path, full_export):
    lm, tok, *_ = two_memory_parts
    model = two(two_memory_parts, router=random_router(2), weights=[0.5, 0.25, 0.25])
    folder = tmp_path / "saved"
    model.save_pretrained(folder, full_export=full_export)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["memory_name"] == "a" and [e["name"] for e in cfg["extra_memories"]] == ["b"] and cfg["mixing"] == "routed"
    assert cfg["router_config"]["meta"]["memory_fingerprints"] == model.router_meta()["memory_fingerprints"]
    # by reference each memory in its own folder, safetensors only; a full export one weights file
    assert (folder / "memory" / "model.safetensors").exists() != full_export
    assert (folder / "memories" / "b" / "model.safetensors").exists() != full_export
    assert (folder / "router" / "model.safetensors").exists() != full_export
    assert not list(folder.rglob("*.pt")) and not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.bin"))
    if full_export:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert {k.split(".")[0] for k in f.keys()} == {"lm", "memory", "extra_memories", "memory_router"}
    ids = ids_of(tok)
    loaded = MLPMemoryForCausalLM.from_pretrained(folder)
    assert loaded.memory_names == ["a", "b"] and loaded.mixing_mode == "routed" and loaded.weights == [0.5, 0.25, 0.25]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert torch.equal(loaded(ids, mixing="fixed").logits, model(ids, mixing="fixed").logits)
    again = MLPMemoryForCausalLM.from_pretrained(folder, base_model=lm)  # the parts path, for both kinds of folder
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert MLPMemoryForCausalLM.from_pretrained(folder, mixing="fixed").mixing_mode == "fixed"
    assert MLPMemoryForCausalLM.from_pretrained(folder, lambda_=0.3).fixed_weights() == pytest.approx([0.7, 0.15, 0.15])


def test_a_saved_model_gains_and_loses_memories(two_memory_parts, tmp_path):
    lm, tok, a, ma, b, mb = two_memory_parts
    MLPMemoryForCausalLM.from_parts(lm, a, ma, tokenizer=tok, lambda_=0.5).save_pretrained(tmp_path / "one")
    m = MLPMemoryForCausalLM.from_pretrained(tmp_path / "one")
    m.add_memory(b, name="b", meta=mb)
    m.save_pretrained(tmp_path / "two")
    m2 = MLPMemoryForCausalLM.from_pretrained(tmp_path / "two")
    assert m2.memory_names == ["memory", "b"]
    m2.remove_memory("memory")
    m2.save_pretrained(tmp_path / "two")  # over its own earlier save: memories/ of the old set is gone
    assert not (tmp_path / "two" / "memories").exists() and (tmp_path / "two" / "memory" / "model.safetensors").exists()
    m3 = MLPMemoryForCausalLM.from_pretrained(tmp_path / "two")
    ids = ids_of(tok)
    with torch.no_grad():
        assert m3.memory_names == ["b"] and torch.equal(m3(ids).logits, m2(ids).logits)


def test_adding_a_memory_drops_the_router_fitted_for_the_others(two_memory_parts):
    lm, tok, a, ma, b, mb = two_memory_parts
    model = two(two_memory_parts, router=random_router(2))
    model.add_memory(random_memory(lm, 5), name="c", meta=ma)
    assert model.memory_router is None and model.mixing_mode == "fixed" and model.config.router_config is None
    with pytest.raises(MlpmemError, match="needs a router"):
        model(ids_of(tok), mixing="routed")


def test_a_component_that_returns_logprobs(two_memory_parts):
    """A kNN-LM-like stand-in (returns_logprobs): mixed as it is, no softmax, no temperature."""
    lm, tok, a, ma, b, mb = two_memory_parts
    knn = StandIn(lm, mb)
    model = MLPMemoryForCausalLM.from_parts(
        lm, a, ma, tokenizer=tok, name="a", memories=[("knn", knn, knn.meta)], weights=[0.4, 0.3, 0.3], memory_temperature=2.0
    )
    ids = ids_of(tok)
    lp_lm, (ha, hb) = reads(lm, ids, [SITE_A, SITE_B])
    with torch.no_grad():
        want = naive_mixture([lp_lm, (a(ha).double() / 2.0).log_softmax(-1), knn(hb).double()], torch.tensor([0.4, 0.3, 0.3]))
        torch.testing.assert_close(model(ids).logits.double(), want, **CLOSE)
    # the stand-in can be neither exported nor saved by reference (it has no run folder to name)
    with pytest.raises(MlpmemError, match="cannot be saved"):
        model.save_pretrained("/nonexistent/never")


def test_fit_router_attaches_a_router_for_these_memories(two_memory_parts):
    lm, tok, *_ = two_memory_parts
    from mlpmem.gate import GateConfig

    model = two(two_memory_parts)
    tokens = np.array(tok(" ".join(["the union and the people of congress has a law"] * 8)).input_ids, dtype=np.int64)[:60]
    record = hf.fit_router(model, [tokens[:30], tokens[30:]], context=16, stride=8, cfg=GateConfig(steps=40), batch_size=2)
    assert model.mixing_mode == "routed" and model.memory_router.n_memories == 2 and "held_out_nll" in record
    meta = model.config.router_config["meta"]
    assert meta["memory_fingerprints"] == model.router_meta()["memory_fingerprints"] and meta["n_tokens"] == 58
    with torch.no_grad():
        out = model(torch.tensor(tokens[None, :16])).logits
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(out.shape[:2]), rtol=0, atol=1e-4)


def test_from_memory_takes_several_folders(two_memory_parts, tmp_path):
    lm, tok, a, ma, b, mb = two_memory_parts
    save_memory(tmp_path / "sotu" / "train" / "memory", a, ma)
    save_memory(tmp_path / "gcide" / "train" / "memory", b, mb)
    model = MLPMemoryForCausalLM.from_memory(
        [tmp_path / "sotu" / "train" / "memory", tmp_path / "gcide" / "train" / "memory"], weights=[0.5, 0.3, 0.2]
    )
    assert model.memory_names == ["sotu", "gcide"]
    ids = ids_of(tok)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, two(two_memory_parts)(ids, weights=[0.5, 0.3, 0.2]).logits)
    # a router saved with a model loads with the folders it was fitted for
    model.set_router(random_router(2))
    model.save_pretrained(tmp_path / "saved")
    routed = MLPMemoryForCausalLM.from_memory(
        [tmp_path / "sotu" / "train" / "memory", tmp_path / "gcide" / "train" / "memory"], router=tmp_path / "saved" / "router"
    )
    with torch.no_grad():
        assert routed.mixing_mode == "routed" and torch.equal(routed(ids).logits, model(ids).logits)
    with pytest.raises(MlpmemError, match="other memories"):  # the same router, the memories in the other order
        MLPMemoryForCausalLM.from_memory(
            [tmp_path / "gcide" / "train" / "memory", tmp_path / "sotu" / "train" / "memory"], router=tmp_path / "saved" / "router"
        )


def test_refusals(two_memory_parts, tmp_path):
    lm, tok, a, ma, b, mb = two_memory_parts
    # memories for different tokenizers or base models
    with pytest.raises(MlpmemError, match="different tokenizers"):
        MLPMemoryForCausalLM.from_parts(
            lm, a, dict(ma, tokenizer_hash="1" * 16), name="a", memories=[("b", b, dict(mb, tokenizer_hash="0" * 16))]
        )
    model = two(two_memory_parts)
    other_fp = dict(model_fingerprint(lm), weights_sha256="f" * 16)
    with pytest.raises(MlpmemError, match="different base models"):
        model.add_memory(random_memory(lm, 4), name="c", meta=dict(ma, model_fingerprint=other_fp, tokenizer_hash=None))
    assert model.memory_names == ["a", "b"]  # a refused memory leaves nothing behind
    with pytest.raises(MlpmemError, match="tokenizer"):  # the LM's own tokenizer against the memory's record
        model.add_memory(random_memory(lm, 4), name="c", meta=dict(ma, tokenizer_hash="0" * 16))
    # a router fitted for other memories: on attaching, and in a saved folder
    other = MLPMemoryForCausalLM.from_parts(lm, b, mb, tokenizer=tok, name="b", memories=[("a", a, ma)])
    with pytest.raises(MlpmemError, match="other memories"):
        model.set_router(random_router(2), other.router_meta())
    with pytest.raises(MlpmemError, match="weighs 3 memories"):
        model.set_router(random_router(3))
    model.set_router(random_router(2))
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "router" / "router_config.json").read_text())
    cfg["meta"]["memory_fingerprints"] = other.router_meta()["memory_fingerprints"]
    (tmp_path / "m" / "router" / "router_config.json").write_text(json.dumps(cfg))
    forget_integrity(tmp_path / "m")
    with pytest.raises(MlpmemError, match="other memories"):
        MLPMemoryForCausalLM.from_pretrained(tmp_path / "m")
    # weights and lambdas outside [0, 1], weights that do not sum to 1 or miss a memory
    ids = ids_of(tok)
    for bad in ([1.2, -0.1, -0.1], [0.5, 0.5, 0.5], [0.5, 0.5], [0.5, float("nan"), 0.5]):
        with pytest.raises(MlpmemError, match="mixture weights"):
            model(ids, weights=bad)
        with pytest.raises(MlpmemError, match="mixture weights"):
            model.set_lambda(weights=bad)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(MlpmemError, match="lambda"):
            model(ids, lambda_=bad)
    with pytest.raises(MlpmemError, match="both"):
        model(ids, mixing="routed", lambda_=0.3)
    with pytest.raises(MlpmemError, match="needs a gate"):
        model.set_lambda(mode="gated")
    from mlpmem.modeling.gating import MixingGate, memory_fingerprint

    gated = two(two_memory_parts, gate=MixingGate(), gate_meta={"memory_fingerprint": memory_fingerprint(a)})  # the first memory's gate
    assert gated.mixing_mode == "fixed"  # a gate weighs one memory against the LM: not the default with two
    with pytest.raises(MlpmemError, match="for one memory"):
        gated.set_lambda(mode="gated")
    with pytest.raises(MlpmemError, match="for one memory"):
        gated(ids, mixing="gated")
    with pytest.raises(MlpmemError, match="already has a memory named"):
        model.add_memory(random_memory(lm, 4), name="b", meta=ma)
    for bad_name in ("lm", "has.dot", "1st", "a b"):
        with pytest.raises(MlpmemError, match="cannot name a memory"):
            model.add_memory(random_memory(lm, 4), name=bad_name, meta=ma)
    with pytest.raises(MlpmemError, match="not a memory folder"):
        model.add_memory(tmp_path / "nowhere")
    with pytest.raises(MlpmemError, match="without a meta"):
        model.add_memory(nn.Linear(32, 4))
    with pytest.raises(MlpmemError, match="layer 7"):
        model.add_memory(random_memory(lm, 4), name="c", meta=dict(ma, layer=7))
    # N = 0: the last memory cannot be removed
    model.remove_memory("a")
    with pytest.raises(MlpmemError, match="at least one"):
        model.remove_memory("b")


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory, tiny_llama):
    """A finished run's kNN-LM parts, as the pipeline lays them out: corpus, datastore, flat index, knn.json (k, T)."""
    from helpers import tiny_knn_run

    return tiny_knn_run(tmp_path_factory.mktemp("knn") / "run", tiny_llama)


def test_lm_memory_and_knn_lm_in_one_model(two_memory_parts, knn_run, tmp_path):
    """The real kNN-LM retriever (mlpmem.retrieval) as a component: naive mixture, save by reference, no full export."""
    from mlpmem.retrieval import KNNRetriever

    lm, tok, a, ma, b, mb = two_memory_parts
    knn = KNNRetriever.from_run(knn_run)
    site_k = (int(knn.meta["layer"]) % 2, knn.meta["site"])
    model = MLPMemoryForCausalLM.from_parts(lm, a, ma, tokenizer=tok, name="a", memories=[("knn", knn, knn.meta)], weights=[0.5, 0.2, 0.3])
    ids = ids_of(tok)
    lp_lm, (ha, hk) = reads(lm, ids, [SITE_A, site_k])
    with torch.no_grad():
        lp_k = knn(hk).double()
        assert torch.isinf(lp_k).any() and not torch.isnan(lp_k).any()  # tokens no neighbour has: -inf, mixed safely
        want = naive_mixture([lp_lm, a(ha).double().log_softmax(-1), lp_k], torch.tensor([0.5, 0.2, 0.3]))
        torch.testing.assert_close(model(ids).logits.double(), want, **CLOSE)
        only_knn = MLPMemoryForCausalLM.from_memory([], knn=knn_run, lambda_=0.3)  # LM + kNN-LM alone
        assert only_knn.memory_names == ["knn"]
        torch.testing.assert_close(only_knn(ids).logits.double(), naive_mixture([lp_lm, lp_k], torch.tensor([0.7, 0.3])), **CLOSE)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["extra_memories"][0]["kind"] == "knn" and not (tmp_path / "m" / "memories" / "knn").exists()  # by reference, no index copy
    loaded = MLPMemoryForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    model.set_router(random_router(2))  # a router over a memory and a retriever
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    with pytest.raises(MlpmemError, match="full export holds MLP memories only"):
        model.save_pretrained(tmp_path / "full", full_export=True, tokenizer=tok)


def test_lm_eval_backend_takes_several_memories_and_knn(two_memory_parts, knn_run, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from mlpmem.lm_eval_backend import load_mixture

    lm, tok, a, ma, b, mb = two_memory_parts
    save_memory(tmp_path / "a", a, ma)
    save_memory(tmp_path / "b", b, mb)
    ids = ids_of(tok)
    direct = two(two_memory_parts, weights=[0.5, 0.3, 0.2])
    # model_args as lm-eval parses them (commas split arguments, so lists take ';'), device and batch size as from the CLI
    backend = get_model("mlpmem").create_from_arg_string(
        f"memory={tmp_path / 'a'};{tmp_path / 'b'},names=a;b,weights=0.5;0.3;0.2", {"batch_size": 1, "device": "cpu"}
    )
    model = backend.model
    assert model.memory_names == ["a", "b"] and model.fixed_weights() == [0.5, 0.3, 0.2]
    assert backend.get_model_info()["mlpmem"]["memories"] == ["a", "b"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    ctx, cont = tok.decode(ids[0, :3]), tok.decode(ids[0, 3:6])
    ((logp, _),) = backend.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)])
    full = tok(ctx + cont, return_tensors="pt").input_ids
    n_ctx = len(tok(ctx).input_ids)
    with torch.no_grad():
        want = direct(full).logits[0, n_ctx - 1 : -1].gather(-1, full[0, n_ctx:, None]).sum()
    assert logp == pytest.approx(float(want), rel=1e-5, abs=1e-5)
    # knn=RUN: LM + kNN-LM alone, and LM + memory + kNN-LM, through the same class
    knn_only, _ = load_mixture(knn=str(knn_run), lambda_=0.3)
    assert knn_only.memory_names == ["knn"] and type(knn_only.memory).__name__ == "KNNRetriever"
    both, _ = load_mixture(memory=str(tmp_path / "a"), knn=str(knn_run), lambda_=0.4)
    assert [type(m).__name__ for m in both.components().values()] == ["MLPMemory", "KNNRetriever"] and both.fixed_weights() == [
        0.6,
        0.2,
        0.2,
    ]
    with pytest.raises(MlpmemError, match="mixture weights"):
        load_mixture(memory=f"{tmp_path / 'a'};{tmp_path / 'b'}", weights="0.5;0.5")
    with pytest.raises(MlpmemError, match="mixing must be"):
        load_mixture(memory=str(tmp_path / "a"), mixing="sometimes")


def test_generate_side_by_side_uses_a_saved_router(two_memory_parts, tmp_path):
    """`mlpmem generate` on a saved model with a router mixes by the router per token (a lambda per call would ask
    for the fixed mixture and drop the router without a word)."""
    from mlpmem.cli import main
    from mlpmem.generation import GenerateConfig, generate_side_by_side

    lm, tok, *_ = two_memory_parts
    model = two(two_memory_parts, router=random_router(2, seed=3), weights=[0.2, 0.4, 0.4])
    model.save_pretrained(tmp_path / "saved")
    p = tok("war", return_tensors="pt").input_ids
    with torch.no_grad():
        routed = model.generate(p, mixing="routed", max_new_tokens=8, do_sample=False)[0, p.shape[1] :]
        fixed = model.generate(p, lambda_=0.9, max_new_tokens=8, do_sample=False)[0, p.shape[1] :]
    assert not torch.equal(routed, fixed)  # the check below can tell the two apart
    rows = generate_side_by_side(str(tmp_path / "saved"), ["the union and", "war"], GenerateConfig(max_new_tokens=8))
    assert [r["mixing"] for r in rows] == ["routed", "routed"]
    assert rows[1]["memory"] == tok.decode(routed, skip_special_tokens=True)
    # an explicit lambda_ is the fixed mixture with it (--lambda on the command line), as everywhere
    rows = generate_side_by_side(str(tmp_path / "saved"), ["the union and", "war"], GenerateConfig(max_new_tokens=8, lambda_=0.9))
    assert [r["mixing"] for r in rows] == ["fixed", "fixed"] and rows[1]["memory"] == tok.decode(fixed, skip_special_tokens=True)
    assert main(["generate", str(tmp_path / "saved"), "war", "--max-new-tokens", "4", "--mixing", "routed"]) == 0
    assert main(["generate", str(tmp_path / "saved"), "war", "--mixing", "routd"]) == 2  # a clear error, no traceback
