"""MLPMemoryForCausalLM: forward against a naive reference, every decoding method, save/load, Auto classes, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ArchMemoryParts, forget_integrity, memory_meta

from mlpmem.errors import MlpmemError
from mlpmem.interpolate import interpolate_logprobs
from mlpmem.memory import MemoryConfig, MLPMemory, init_from_lm, lm_settings
from mlpmem.models import load_model, logits_size, tokenizer_hash
from mlpmem.modeling.read_site import decoder_layers

hf = pytest.importorskip("mlpmem.transformers_integration")
MLPMemoryForCausalLM = hf.MLPMemoryForCausalLM

# llama reads the kNN-LM key (last layer's FFN input), gpt2 the first layer's output: both sites covered
SITES = {"llama": (1, "ffn_input"), "gpt2": (0, "output")}


def random_memory(lm, seed: int = 1) -> MLPMemory:
    torch.manual_seed(seed)
    mem = MLPMemory(MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1, zero_init_blocks=False))
    mem.head.weight.data.normal_(0.0, 0.5)  # peaked enough to change the LM's choices
    return mem.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def arch_parts(request, tiny_models) -> ArchMemoryParts:
    lm, tok, model_id = load_model(str(tiny_models[request.param]))
    layer, site = SITES[request.param]
    meta = memory_meta(model_id, tok, layer, site, lm=lm)
    return ArchMemoryParts(request.param, lm, tok, random_memory(lm), meta)


@pytest.fixture(scope="module")
def model(arch_parts):
    _, lm, tok, mem, meta = arch_parts
    return MLPMemoryForCausalLM.from_parts(lm, mem, meta, tokenizer=tok, lambda_=0.5).eval()


def ref_logprobs(lm, memory, meta, ids: torch.Tensor, lam: float, temp: float = 1.0) -> torch.Tensor:
    """Naive reference: full forward without cache, own hook, interpolate_logprobs. ids [B, T] -> [B, T, V]."""
    layer = decoder_layers(lm)[meta["layer"]]
    seen = []
    if meta["site"] == "ffn_input":
        handle = layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    else:
        handle = layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            logits = lm(ids, use_cache=False).logits
            q = memory(seen[0]).float() / temp
    finally:
        handle.remove()
    return interpolate_logprobs(logits.float().log_softmax(-1), q.log_softmax(-1), lam)


def ref_greedy(lm, memory, meta, ids: torch.Tensor, n: int, lam: float, eos: int | None) -> torch.Tensor:
    """Greedy decoding of one sequence [1, T] by full recomputation each step, stopping at eos."""
    for _ in range(n):
        nxt = ref_logprobs(lm, memory, meta, ids, lam)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        if eos is not None and nxt.item() == eos:
            break
    return ids


def prompts(tok, texts=("the union and the people of", "war", "congress has a law that the")):
    return [tok(t, return_tensors="pt").input_ids for t in texts]


# float32 log-probs computed by kernels of other shapes (fewer rows, another thread split) sum
# in another order: they agree to a few ulps of their scale, not bit for bit. 32 ulps is
# ~4e-6 relative; the mistakes these tests look for (wrong lambda, position or layer) are 1e-2+
F32 = torch.finfo(torch.float32).eps
CLOSE = dict(rtol=32 * F32, atol=32 * F32)


def test_forward_matches_reference_and_lambda_ends(arch_parts, model, torch_threads):
    _, lm, tok, mem, meta = arch_parts
    ids = torch.cat([p[:, :3] for p in prompts(tok)], 0)
    with torch.no_grad():
        for lam in (0.5, 0.1):
            torch.testing.assert_close(model(ids, lambda_=lam).logits, ref_logprobs(lm, mem, meta, ids, lam), **CLOSE)
        torch.testing.assert_close(
            model(ids, lambda_=0.5, memory_temperature=2.0).logits, ref_logprobs(lm, mem, meta, ids, 0.5, 2.0), **CLOSE
        )
        # lambda = 0 is the base LM bit for bit: the same call of the same kernels on the same inputs
        assert torch.equal(model(ids, lambda_=0.0).logits, lm(ids).logits.float().log_softmax(-1))
        torch.testing.assert_close(model(ids, lambda_=1.0).logits, ref_logprobs(lm, mem, meta, ids, 1.0), **CLOSE)
        # keeping 2 positions runs the head on 2 rows instead of all: another kernel shape
        kept = model(ids, logits_to_keep=2).logits
        torch.testing.assert_close(kept, model(ids).logits[:, -2:], **CLOSE)
        # the memory matters here (else the generation tests below prove little)
        assert not torch.equal(model(ids).logits.argmax(-1), model(ids, lambda_=0.0).logits.argmax(-1))


def test_lambda_settings(model):
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        default = model(ids).logits
        with model.mixing(lambda_=0.0):
            assert model.lambda_ == 0.0
            zero = model(ids).logits
        assert model.lambda_ == 0.5
        assert torch.equal(zero, model(ids, lambda_=0.0).logits)
        assert torch.equal(default, model(ids).logits)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(MlpmemError, match="lambda"):
            model(ids, lambda_=bad)
        with pytest.raises(MlpmemError, match="lambda"):
            model.set_lambda(bad)
    with pytest.raises(MlpmemError, match="temperature"):
        model(ids, memory_temperature=0.0)
    assert model.lambda_ == 0.5


def test_greedy_equals_reference_loop(arch_parts, model):
    _, lm, tok, mem, meta = arch_parts
    for p in prompts(tok):
        out = model.generate(p, max_new_tokens=8, do_sample=False)
        ref = ref_greedy(lm, mem, meta, p, 8, 0.5, model.generation_config.eos_token_id)
        assert out.tolist() == ref.tolist()
        # per-call lambda reaches every step of the loop
        out2 = model.generate(p, max_new_tokens=8, do_sample=False, lambda_=0.2)
        assert out2.tolist() == ref_greedy(lm, mem, meta, p, 8, 0.2, model.generation_config.eos_token_id).tolist()


def test_lambda_zero_generate_is_base_model(arch_parts, model):
    _, lm, tok, _, _ = arch_parts
    for p in prompts(tok):
        assert torch.equal(
            model.generate(p, max_new_tokens=8, do_sample=False, lambda_=0.0), lm.generate(p, max_new_tokens=8, do_sample=False)
        )


def test_left_padded_batch_equals_one_by_one(arch_parts, model):
    _, _, tok, _, _ = arch_parts
    tok.padding_side = "left"
    texts = ["the union and the people of", "war", "congress has a law that the"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    eos, width = model.generation_config.eos_token_id, batch.input_ids.shape[1]
    for i, p in enumerate(prompts(tok, texts)):
        single = model.generate(p, max_new_tokens=6, do_sample=False)[0, p.shape[1] :].tolist()
        got = out[i, width:].tolist()
        assert got[: len(single)] == single
        assert all(t == tok.pad_token_id for t in got[len(single) :]) and (len(single) == 6 or single[-1] == eos)


def test_beam_search_cache_equals_no_cache_and_scores_are_mixture(arch_parts, model):
    _, lm, tok, mem, meta = arch_parts
    p = prompts(tok)[0]
    kw = dict(
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    cached = model.generate(p, **kw)
    uncached = model.generate(p, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    eos = model.generation_config.eos_token_id
    for seq, score in zip(cached.sequences, cached.sequences_scores):
        # with length_penalty 0 a beam's score is the sum of its tokens' log-probs under the mixture
        gen = seq[p.shape[1] :].tolist()
        if eos in gen:
            gen = gen[: gen.index(eos) + 1]
        full = torch.cat([p[0], torch.tensor(gen)])[None]
        lp = ref_logprobs(lm, mem, meta, full, 0.5)[0, p.shape[1] - 1 : -1]
        want = lp.gather(-1, full[0, p.shape[1] :, None]).sum()
        torch.testing.assert_close(score, want, rtol=0, atol=1e-3)


def test_sampling_first_step_distribution(arch_parts, model):
    _, lm, tok, mem, meta = arch_parts
    p = prompts(tok)[2]
    temp, top_k, top_p = 0.7, 20, 0.9
    out = model.generate(
        p, do_sample=True, temperature=temp, top_k=top_k, top_p=top_p, max_new_tokens=1, output_scores=True, return_dict_in_generate=True
    )
    got = out.scores[0][0].softmax(-1)
    # reference: temperature, then top-k, then top-p (smallest top set reaching top_p), renormalised
    x = ref_logprobs(lm, mem, meta, p, 0.5)[0, -1] / temp
    x[x < x.topk(top_k).values[-1]] = -float("inf")
    probs = x.softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    drop = order[(cum - probs[order]) >= top_p]
    x[drop] = -float("inf")
    torch.testing.assert_close(got, x.softmax(-1), rtol=0, atol=1e-5)
    assert got[out.sequences[0, -1]] > 0


def test_decode_step_runs_memory_on_one_position(arch_parts, model):
    _, _, tok, _, _ = arch_parts
    shapes = []
    handle = model.memory.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    try:
        tok.padding_side = "left"
        batch = tok(["the union and the people of", "war"], return_tensors="pt", padding=True)
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert shapes == [(2, 1, 32)] * 4  # prefill keeps the last position only, then one row per sequence per step
    assert not model.memory._forward_pre_hooks and not any(m._forward_hooks or m._forward_pre_hooks for m in model.lm.modules())


def test_lm_copy_memory_at_lambda_one_is_the_lm(arch_parts):
    _, lm, tok, _, _ = arch_parts
    settings = lm_settings(lm, "lm_copy")
    mem = MLPMemory(MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1, init="lm_copy", **settings))
    init_from_lm(mem, lm)
    meta = {"tokenizer_hash": tokenizer_hash(tok), "layer": -1, "site": "output"}
    m = MLPMemoryForCausalLM.from_parts(lm, mem.eval(), meta, tokenizer=tok, lambda_=1.0)
    p = prompts(tok)[0]
    with torch.no_grad():
        torch.testing.assert_close(m(p).logits, lm(p).logits.float().log_softmax(-1), rtol=0, atol=1e-5)
    assert torch.equal(m.generate(p, max_new_tokens=6, do_sample=False), lm.generate(p, max_new_tokens=6, do_sample=False))


def test_memory_with_the_lms_head_runs_it_in_one_product(arch_parts):
    """A memory whose head is the LM's (lm_copy, frozen head) shares the LM's head call; the mixture is unchanged."""
    _, lm, tok, _, _ = arch_parts
    torch.manual_seed(3)
    cfg = MemoryConfig(
        d_in=32, vocab_size=logits_size(lm), n_blocks=1, init="lm_copy", freeze_head=True, zero_init_blocks=False, head_rank=4
    )
    mem = MLPMemory(MemoryConfig(**{**cfg.__dict__, **lm_settings(lm, "lm_copy")}))
    init_from_lm(mem, lm)
    with torch.no_grad():
        for w in [*mem.blocks.parameters(), *mem.head_delta.parameters()]:
            w.normal_(0.0, 1.0)  # blocks far from the identity and a correction beside the head: the LM's choices change
    meta = {"tokenizer_hash": tokenizer_hash(tok), "layer": -1, "site": "output"}
    m = MLPMemoryForCausalLM.from_parts(lm, mem.eval(), meta, tokenizer=tok, lambda_=0.5).eval()
    head, rows, own = lm.get_output_embeddings(), [], []
    # the LM's head is called once per forward and gives the LM its own rows; the memory's head is not called
    handles = [
        head.register_forward_hook(lambda mod, a, o: rows.append(o.shape[0])),
        mem.head.register_forward_pre_hook(lambda mod, a: own.append(1)),
    ]
    ids = torch.cat([p[:, :3] for p in prompts(tok)], 0)
    try:
        assert m.head_shared("memory")
        with torch.no_grad():
            got = m(ids).logits
        assert rows == [ids.shape[0]] and own == []  # one head call, computing the memory's rows too
        with torch.no_grad():
            torch.testing.assert_close(got, ref_logprobs(lm, mem, meta, ids, 0.5), **CLOSE)
            torch.testing.assert_close(m(ids, logits_to_keep=1).logits, got[:, -1:], **CLOSE)
            assert not torch.equal(got.argmax(-1), m(ids, lambda_=0.0).logits.argmax(-1))  # the memory matters
        p = prompts(tok)[0]
        assert torch.equal(m.generate(p, max_new_tokens=5, do_sample=False), ref_greedy(lm, mem, meta, p, 5, 0.5, None))
        # a head changed in place (a training step) is no longer the LM's: the memory runs its own again
        with torch.no_grad():
            mem.head.weight.add_(0.5)
        rows.clear(), own.clear()
        assert not m.head_shared("memory")
        with torch.no_grad():
            got = m(ids).logits
            assert rows == [ids.shape[0]] and own == [1]
            torch.testing.assert_close(got, ref_logprobs(lm, mem, meta, ids, 0.5), **CLOSE)
    finally:
        for h in handles:
            h.remove()
    assert not any(mod._forward_hooks or mod._forward_pre_hooks or "forward" in mod.__dict__ for mod in lm.modules())


@pytest.mark.parametrize("full_export", [False, True])
def test_save_load_round_trip(arch_parts, model, tmp_path, full_export):
    _, lm, tok, _, _ = arch_parts
    folder = tmp_path / "saved"
    model.save_pretrained(folder, full_export=full_export)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "mlpmem" and cfg["lambda_"] == 0.5 and cfg["memory_meta"]["site"] == model.site.site
    assert cfg["text_config"]["model_type"] == lm.config.model_type and cfg["base_weights"] == ("included" if full_export else "reference")
    # a full export is one weights file with both parts; by reference, only the memory (a memory folder)
    assert (folder / "model.safetensors").exists() == full_export and (folder / "memory" / "model.safetensors").exists() != full_export
    if full_export:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert {k.split(".")[0] for k in f.keys()} == {"lm", "memory"}
    if full_export:  # self-contained: the reference may be gone
        cfg["base_model"] = str(tmp_path / "nowhere")
        (folder / "config.json").write_text(json.dumps(cfg))
    loaded = MLPMemoryForCausalLM.from_pretrained(folder, lambda_=0.3)
    assert loaded.lambda_ == 0.3
    p = prompts(tok)[0]
    with torch.no_grad():
        assert torch.equal(loaded(p, lambda_=0.5).logits, model(p).logits)
    again = MLPMemoryForCausalLM.from_pretrained(folder, base_model=lm)  # base passed as an object
    assert again.lm is lm and again.lambda_ == 0.5


def test_auto_classes_load_it(model, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model.save_pretrained(tmp_path / "m")
    assert type(AutoConfig.from_pretrained(tmp_path / "m")).__name__ == "MLPMemoryConfig"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, MLPMemoryForCausalLM)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_refusals(arch_parts, model, tmp_path):
    _, lm, tok, mem, meta = arch_parts
    other_tok = type(tok).from_pretrained(lm.config.name_or_path)
    other_tok.add_tokens(["zzzq"])  # a different tokenizer definition
    with pytest.raises(MlpmemError, match="tokenizer"):
        MLPMemoryForCausalLM.from_parts(lm, mem, meta, tokenizer=other_tok)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(MlpmemError, match="tokenizer"):
        MLPMemoryForCausalLM.from_pretrained(tmp_path / "m", tokenizer=other_tok)
    # a memory trained with another tokenizer, loaded with its recorded base model
    cfg = json.loads((tmp_path / "m" / "memory" / "memory_config.json").read_text())
    cfg["meta"]["tokenizer_hash"] = "0" * 16
    (tmp_path / "m" / "memory" / "memory_config.json").write_text(json.dumps(cfg))
    forget_integrity(tmp_path / "m")
    with pytest.raises(MlpmemError, match="tokenizer"):
        MLPMemoryForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(MlpmemError, match="layer 5"):
        MLPMemoryForCausalLM.from_parts(lm, mem, dict(meta, layer=5))
    with pytest.raises(MlpmemError, match="lambda"):
        MLPMemoryForCausalLM.from_parts(lm, mem, meta, lambda_=2.0)
    with pytest.raises(MlpmemError, match="config.json is missing"):
        MLPMemoryForCausalLM.from_pretrained(tmp_path / "empty")
    model.save_pretrained(tmp_path / "partial")
    (tmp_path / "partial" / "memory" / "model.safetensors").unlink()
    with pytest.raises(MlpmemError, match="model.safetensors is missing"):
        MLPMemoryForCausalLM.from_pretrained(tmp_path / "partial")
    model.save_pretrained(tmp_path / "full", full_export=True)
    (tmp_path / "full" / "model.safetensors").unlink()
    with pytest.raises(MlpmemError, match="incomplete"):
        MLPMemoryForCausalLM.from_pretrained(tmp_path / "full")


def test_remote_code_loads_without_importing_mlpmem_hf(tiny_llama, tmp_path):
    import os
    import subprocess
    import sys

    lm, tok, model_id = load_model(str(tiny_llama))
    meta = memory_meta(model_id, tok, -1, "ffn_input")
    MLPMemoryForCausalLM.from_parts(lm, random_memory(lm), meta, tokenizer=tok, lambda_=0.5).save_pretrained(tmp_path / "m")
    code = (
        "import sys; from transformers import AutoModelForCausalLM; assert 'mlpmem.transformers_integration' not in sys.modules; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); print(type(m).__name__, m.lambda_)"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["MLPMemoryForCausalLM", "0.5"]


def test_export_from_memory_folder(arch_parts, model, tmp_path):
    from mlpmem.memory import save_memory

    _, lm, tok, mem, meta = arch_parts
    save_memory(tmp_path / "mem", mem, meta)
    out = hf.export_hf(tmp_path / "mem", tmp_path / "hf", lambda_=0.5)  # base model: the one in the memory's meta
    loaded = MLPMemoryForCausalLM.from_pretrained(out)
    p = prompts(tok)[1]
    with torch.no_grad():
        assert torch.equal(loaded(p).logits, model(p).logits)


def test_generate_cli_side_by_side(arch_parts, tmp_path, capsys):
    from mlpmem.cli import main
    from mlpmem.memory import save_memory

    _, lm, tok, mem, meta = arch_parts
    save_memory(tmp_path / "mem", mem, meta)
    (tmp_path / "prompts.txt").write_text("the union and\nwar\n")
    assert (
        main(
            [
                "generate",
                str(tmp_path / "mem"),
                "congress has",
                "--prompts-file",
                str(tmp_path / "prompts.txt"),
                "--max-new-tokens",
                "6",
                "--lambda",
                "0.9",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("--- base LM:") == 3 and out.count("--- LM + memory (lambda=0.9):") == 3
    from mlpmem.generation import GenerateConfig, generate_side_by_side

    rows = generate_side_by_side(str(tmp_path / "mem"), ["the union and", "war"], GenerateConfig(max_new_tokens=6, lambda_=0.9))
    assert any(r["base"] != r["memory"] for r in rows)  # a peaked random memory at lambda 0.9 changes the text
    assert main(["generate", str(tmp_path / "mem")]) == 2  # no prompts: a clear error


def test_generate_side_by_side_with_a_full_export(arch_parts, model, tmp_path):
    """A full export loads on transformers' path (no tokenizer attached): generation takes the one saved with it."""
    from mlpmem.generation import GenerateConfig, generate_side_by_side

    _, lm, tok, _, _ = arch_parts
    model.save_pretrained(tmp_path / "full", full_export=True)
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    (tmp_path / "full" / "config.json").write_text(json.dumps(dict(cfg, base_model=str(tmp_path / "gone"))))  # nothing else to find
    rows = generate_side_by_side(str(tmp_path / "full"), ["the union and", "war"], GenerateConfig(max_new_tokens=6, lambda_=0.5))
    p = tok("war", return_tensors="pt").input_ids
    assert rows[1]["memory"] == tok.decode(model.generate(p, max_new_tokens=6, do_sample=False)[0, p.shape[1] :], skip_special_tokens=True)


def test_saving_never_replaces_a_users_folder(arch_parts, model, tmp_path):
    from mlpmem.errors import MlpmemError
    from mlpmem.memory import save_memory

    user = tmp_path / "thesis"
    (user / "memory").mkdir(parents=True)
    (user / "memory" / "notes.txt").write_text("precious")
    with pytest.raises(MlpmemError, match="no earlier save"):
        model.save_pretrained(user, full_export=True)
    assert (user / "memory" / "notes.txt").read_text() == "precious"
    model.save_pretrained(tmp_path / "again", full_export=True)
    model.save_pretrained(tmp_path / "again")  # over an earlier save of ours: replaced, as transformers does
    _, _, _, mem, meta = arch_parts
    save_memory(tmp_path / "mem", mem, meta)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2")
    with pytest.raises(MlpmemError):  # export_hf claims its folder like every stage
        hf.export_hf(tmp_path / "mem", tmp_path / "mine")
    assert (tmp_path / "mine" / "data.csv").read_text() == "1,2"


def test_a_pruned_memory_mixes_on_its_tokens_as_full_rows_would(arch_parts):
    """A memory pruned to S tokens mixes (fixed and gated) on its S log-probs: the same output as the same memory
    giving full rows (-inf outside S) through the general path."""
    from mlpmem.modeling.gating import MixingGate, memory_fingerprint

    _, lm, tok, _, _ = arch_parts
    torch.manual_seed(5)
    cfg = MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1, init="lm_copy", zero_init_blocks=False)
    mem = MLPMemory(MemoryConfig(**{**cfg.__dict__, **lm_settings(lm, "lm_copy")}))
    init_from_lm(mem, lm)
    pruned = mem.prune_head(torch.randperm(logits_size(lm))[:9]).eval()

    class FullRows(torch.nn.Module):  # the same memory, seen by the model class as any module giving full rows
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def forward(self, h):
            return self.m(h)

    gate = MixingGate("mlp", hidden=4)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(0, 0.5)
        gate.scale.fill_(20.0)  # features (KL up to 100) to about unit size: a gate that does not saturate
    meta = {"tokenizer_hash": tokenizer_hash(tok), "layer": -1, "site": "output"}
    ids = torch.cat([p[:, :3] for p in prompts(tok)], 0)
    outs = {}
    for name, m in (("pruned", pruned), ("full", FullRows(pruned))):
        g = dict(gate=gate, gate_meta={"memory_fingerprint": memory_fingerprint(m)})
        model = MLPMemoryForCausalLM.from_parts(lm, m, meta, tokenizer=tok, **g).eval()
        with torch.no_grad():
            outs[name] = (model(ids).logits, model(ids, lambda_=0.4).logits, model(ids, lambda_=1.0).logits)
    for got, want in zip(outs["pruned"], outs["full"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.isinf(outs["pruned"][2]).any() and not torch.isinf(outs["pruned"][0]).any()


def test_int8_memory_runs_its_quantized_copy_and_keeps_its_weights(arch_parts):
    """use_int8_memories: the memory's linear layers in int8 at inference, close to float32 (not equal: the copy is
    used), the float32 weights untouched and still what training and the shared-head check see; lambda 0 is the LM."""
    _, lm, tok, _, _ = arch_parts
    torch.manual_seed(4)
    cfg = MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1, init="lm_copy", freeze_head=True, zero_init_blocks=False)
    mem = MLPMemory(MemoryConfig(**{**cfg.__dict__, **lm_settings(lm, "lm_copy")}))
    init_from_lm(mem, lm)
    meta = {"tokenizer_hash": tokenizer_hash(tok), "layer": -1, "site": "output"}
    m = MLPMemoryForCausalLM.from_parts(lm, mem.eval(), meta, tokenizer=tok, lambda_=0.5).eval()
    ids = torch.cat([p[:, :3] for p in prompts(tok)], 0)
    weights = {k: v.clone() for k, v in mem.state_dict().items()}
    with torch.no_grad():
        full = m(ids).logits
    assert m.head_shared("memory")
    m.use_int8_memories()
    assert not m.head_shared("memory")  # the int8 head runs on its own
    made = mem._int8[0]
    m.use_int8_memories()  # asked again with the same weights (lm-eval, after the move): the same copy
    assert mem._int8[0] is made
    h = torch.randn(4, 32)
    f32 = mem(h).detach()  # with autograd on, the memory runs its float32 weights
    with torch.no_grad():
        q8 = mem(h)
    assert not torch.equal(q8, f32) and (q8.softmax(-1) - f32.softmax(-1)).abs().max() < 0.02
    with torch.no_grad():
        int8 = m(ids).logits
        assert not torch.equal(int8, full)
        assert (int8.exp() - full.exp()).abs().max() < 0.02  # probabilities: per-channel int8 keeps them close
        assert torch.equal(m(ids, lambda_=0.0).logits, lm(ids).logits.float().log_softmax(-1))
    assert all(torch.equal(weights[k], v) for k, v in mem.state_dict().items())
    with torch.no_grad():
        mem.blocks[0].ffn.up.weight.mul_(3.0)  # weights changed after: the int8 copy is made again from them
        changed = m(ids).logits
    mem.use_int8(False)
    with torch.no_grad():
        torch.testing.assert_close(changed.exp(), m(ids).logits.exp(), atol=0.02, rtol=0)
        assert not torch.equal(changed, int8)
    with pytest.raises(MlpmemError, match="float32 memory on the CPU"):
        MLPMemory(MemoryConfig(d_in=8, vocab_size=10)).to(torch.bfloat16).use_int8()
    from mlpmem.modeling.mlp_memory import check_memory_dtype

    assert check_memory_dtype("float32") is None and check_memory_dtype("int8") == "int8"
    with pytest.raises(MlpmemError, match="memory_dtype 'int4' is not known"):  # from_memory and lm-eval check it before loading
        check_memory_dtype("int4")
