"""The memory model: shapes, identity start, exact LM copy, save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch

from mlpmem.errors import MlpmemError
from mlpmem.memory import MemoryConfig, MLPMemory, find_final_norm, init_from_lm, lm_settings, load_memory, save_memory


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_gpt2():
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def last_layer_output(lm, ids):
    """(logits, output of the last decoder layer before the final norm)."""
    dec = lm.get_decoder()
    layers = getattr(dec, "layers", None) or dec.h
    seen = []
    hook = layers[-1].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            logits = lm(ids).logits
    finally:
        hook.remove()
    return logits, seen[0]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "rmsnorm_plus_one"])
def test_shapes_and_projection(activation, norm):
    m = MLPMemory(MemoryConfig(d_in=12, vocab_size=50, width=16, n_blocks=2, activation=activation, norm=norm))
    assert m(torch.randn(3, 5, 12)).shape == (3, 5, 50)
    assert m(torch.randn(7, 12, dtype=torch.float16)).dtype == torch.float32
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())


def test_zero_init_blocks_are_identity():
    torch.manual_seed(0)
    m = MLPMemory(MemoryConfig(d_in=16, vocab_size=50, n_blocks=3))
    h = torch.randn(4, 16)
    assert torch.equal(m(h), m.head(m.norm(h)))
    m2 = MLPMemory(MemoryConfig(d_in=16, vocab_size=50, n_blocks=3, zero_init_blocks=False))
    assert not torch.allclose(m2(h), m2.head(m2.norm(h)))


def test_blocks_learn_from_zero_init():
    torch.manual_seed(0)
    m = MLPMemory(MemoryConfig(d_in=16, vocab_size=50, n_blocks=2))
    m(torch.randn(8, 16)).logsumexp(-1).sum().backward()
    assert m.blocks[0].ffn.down.weight.grad.abs().sum() > 0


def test_freeze_head():
    m = MLPMemory(MemoryConfig(d_in=16, vocab_size=50, freeze_head=True, head_bias=True))
    assert not m.head.weight.requires_grad and not m.head.bias.requires_grad
    assert m.num_parameters(trainable_only=True) == m.num_parameters() - 16 * 50 - 50


def test_bad_config():
    with pytest.raises(MlpmemError, match="activation"):
        MemoryConfig(d_in=4, vocab_size=5, activation="relu")
    with pytest.raises(MlpmemError, match="norm"):
        MemoryConfig(d_in=4, vocab_size=5, norm="batchnorm")


@pytest.mark.parametrize("make_lm", [tiny_llama, tiny_gpt2])
def test_lm_copy_equals_lm_logits(make_lm):
    lm = make_lm()
    d, vocab = lm.get_output_embeddings().weight.shape[1], lm.get_output_embeddings().weight.shape[0]
    cfg = MemoryConfig(d_in=d, vocab_size=vocab, n_blocks=2, init="lm_copy", **lm_settings(lm, "lm_copy"))
    m = MLPMemory(cfg)
    init_from_lm(m, lm)
    logits, h = last_layer_output(lm, torch.randint(0, 100, (2, 7)))
    with torch.no_grad():
        torch.testing.assert_close(m(h), logits, rtol=1e-6, atol=1e-6)
    # a copy, not a shared tensor: training the memory must not move the LM
    assert m.head.weight.data_ptr() != lm.get_output_embeddings().weight.data_ptr()


def test_lm_copy_detects_norm_kinds():
    assert lm_settings(tiny_llama(), "lm_copy")["norm"] == "rmsnorm"
    assert lm_settings(tiny_gpt2(), "lm_copy")["norm"] == "layernorm"
    assert type(find_final_norm(tiny_gpt2())).__name__ == "LayerNorm"

    class GemmaRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.eps = 1e-6
            self.weight = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (out * (1.0 + self.weight.float())).type_as(x)

    from mlpmem.memory import Norm, _copy_norm, norm_kind

    g = GemmaRMSNorm()
    assert norm_kind(g) == ("rmsnorm_plus_one", 1e-6)
    n = Norm(8, "rmsnorm_plus_one", 1e-6)
    with torch.no_grad():
        _copy_norm(n, g)
    x = torch.randn(3, 8)
    torch.testing.assert_close(n(x), g(x))


def test_lm_head_dims_must_fit():
    lm = tiny_llama()
    with pytest.raises(MlpmemError, match="output embedding"):
        init_from_lm(MLPMemory(MemoryConfig(d_in=32, vocab_size=99)), lm, "lm_head")
    with pytest.raises(MlpmemError, match="output embedding"):
        init_from_lm(MLPMemory(MemoryConfig(d_in=32, vocab_size=100, width=16)), lm, "lm_head")
    with pytest.raises(MlpmemError, match="final norm"):  # llama norm into a layernorm memory
        init_from_lm(MLPMemory(MemoryConfig(d_in=32, vocab_size=100)), lm, "lm_copy")
    # lm_head works through a projection from another input size
    m = MLPMemory(MemoryConfig(d_in=20, vocab_size=100, width=32))
    init_from_lm(m, lm, "lm_head")
    assert torch.equal(m.head.weight, lm.get_output_embeddings().weight)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = MLPMemory(
        MemoryConfig(
            d_in=16, vocab_size=50, width=24, n_blocks=2, activation="swiglu", norm="rmsnorm", zero_init_blocks=False, freeze_head=True
        )
    )
    meta = {"model_id": "tiny", "tokenizer_hash": "abc", "layer": 1, "site": "ffn_input"}
    save_memory(tmp_path / "mem", m, meta)
    assert not list((tmp_path / "mem").glob("*.partial"))
    m2, meta2 = load_memory(tmp_path / "mem", expect={"model_id": "tiny", "layer": 1})
    assert meta2 == meta and m2.config == m.config
    assert not m2.head.weight.requires_grad
    h = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(m(h), m2(h))


def test_save_tied_lm_copy(tmp_path):
    # gpt-2 ties its input and output embeddings; the memory copy must still save
    lm = tiny_gpt2()
    m = MLPMemory(MemoryConfig(d_in=32, vocab_size=100, init="lm_copy", **lm_settings(lm, "lm_copy")))
    init_from_lm(m, lm)
    save_memory(tmp_path / "mem", m, {})
    m2, _ = load_memory(tmp_path / "mem")
    assert torch.equal(m2.head.weight, lm.get_output_embeddings().weight)


def test_load_refuses_wrong_model_and_partial_folder(tmp_path):
    m = MLPMemory(MemoryConfig(d_in=16, vocab_size=50))
    save_memory(tmp_path / "mem", m, {"model_id": "a", "tokenizer_hash": "h", "layer": 3, "site": "output"})
    with pytest.raises(MlpmemError, match="model_id 'a'.*'b'"):
        load_memory(tmp_path / "mem", expect={"model_id": "b"})
    with pytest.raises(MlpmemError, match="layer 3"):
        load_memory(tmp_path / "mem", expect={"layer": 2})
    with pytest.raises(MlpmemError, match="missing"):
        load_memory(tmp_path / "nothing")
    (tmp_path / "mem" / "model.safetensors").unlink()
    with pytest.raises(MlpmemError, match="model.safetensors is missing"):
        load_memory(tmp_path / "mem")
    save_memory(tmp_path / "mem", m, {})
    (tmp_path / "mem" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MlpmemError, match="not readable"):
        load_memory(tmp_path / "mem")
    cfg = json.loads((tmp_path / "mem" / "memory_config.json").read_text())
    cfg["config"]["n_blocks"] = 3
    save_memory(tmp_path / "mem", m, {})
    (tmp_path / "mem" / "memory_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlpmemError, match="do not fit"):
        load_memory(tmp_path / "mem")
    cfg["config"].update(n_blocks=4, head="low_rank")  # a memory kind of a newer version: named, not half-built
    (tmp_path / "mem" / "memory_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlpmemError, match=r"does not know \(head\).*upgrade mlpmem"):
        load_memory(tmp_path / "mem")


def test_block_dropout_acts_in_training_only_and_leaves_the_saved_memory_alone(tmp_path):
    from mlpmem.memory import add_block_dropout

    torch.manual_seed(0)
    m = MLPMemory(MemoryConfig(d_in=8, vocab_size=20, n_blocks=2, zero_init_blocks=False))
    h = torch.randn(64, 8)
    clean = m.eval()(h)
    handles = add_block_dropout(m, 0.5)
    assert len(handles) == 2
    assert torch.equal(m.eval()(h), clean)  # off in eval mode
    m.train()
    assert not torch.allclose(m(h), clean)  # on in train mode
    assert add_block_dropout(m, 0.0) == []
    save_memory(tmp_path / "m", m, {})
    assert torch.equal(load_memory(tmp_path / "m")[0](h), clean)  # the saved memory carries no dropout
    for hd in handles:
        hd.remove()
    assert torch.equal(m(h), clean)


def test_the_memory_input_is_decided_in_one_place():
    from mlpmem.memory import MemoryInput, resolve_memory_input

    # unset: the datastore's key; stored as the keys
    assert resolve_memory_input(None, None, "plain", "offline", 5, "ffn_input", n_layers=8) == MemoryInput(5, "ffn_input", "stored", "keys")
    # lm_copy: the last layer's output, stored as an extra array (or recomputed online)
    assert resolve_memory_input(None, None, "lm_copy", "offline", 5, "ffn_input", n_layers=8) == MemoryInput(
        7, "output", "stored", "h7.output"
    )
    assert resolve_memory_input(None, None, "lm_copy", "online", 5, "ffn_input", n_layers=8) == MemoryInput(7, "output", "recomputed", None)
    assert resolve_memory_input(-1, "output", "plain", "offline", 7, "output", n_layers=8).array == "keys"
    with pytest.raises(MlpmemError, match="needs the model"):
        resolve_memory_input(-2, None, "plain", "offline", 5, "ffn_input")
    with pytest.raises(MlpmemError, match="out of range"):
        resolve_memory_input(8, None, "plain", "offline", 5, "ffn_input", n_layers=8)
    # what a memory's meta records, and reads back (memories saved before input_source too)
    spec = MemoryInput(7, "output", "stored", "h7.output")
    assert MemoryInput.from_meta({**spec.as_meta(), "model_id": "m"}) == spec
    assert MemoryInput.from_meta({"layer": 3, "site": "output", "input_array": "online"}) == MemoryInput(3, "output", "recomputed", None)
    assert MemoryInput.from_meta({"layer": 3, "site": "ffn_input", "input_array": "keys"}).source == "stored"
    assert spec.array_in(7, "output") == "keys" and spec.array_in(5, "ffn_input") == "h7.output"


def test_a_pruned_head_keeps_its_tokens_logits_and_gives_the_rest_no_mass(tmp_path):
    torch.manual_seed(0)
    m = MLPMemory(MemoryConfig(d_in=16, vocab_size=50, n_blocks=2, zero_init_blocks=False, head_bias=True, head_rank=3)).eval()
    torch.nn.init.normal_(m.head_delta[1].weight)  # the correction's rows must follow the head's
    keep = torch.tensor([1, 3, 7, 40])
    pruned = m.prune_head([40, 3, 7, 7, 1])  # any order, repeats
    assert pruned.config.head_tokens == 4 and pruned.head.weight.shape == (4, 16) and torch.equal(pruned.head_ids, keep)
    h = torch.randn(5, 16)
    with torch.no_grad():
        full, out = m(h), pruned(h)
    rest = torch.ones(50, dtype=torch.bool)
    rest[keep] = False
    assert torch.allclose(out[:, keep], full[:, keep], atol=1e-6) and torch.isneginf(out[:, rest]).all()
    # the log-probs are the full head's renormalised over the kept tokens
    assert torch.allclose(out.log_softmax(-1)[:, keep], full[:, keep].log_softmax(-1), atol=1e-6)
    assert not pruned.head_is(torch.nn.Linear(16, 50))  # never run as the LM's head
    save_memory(tmp_path / "mem", pruned, {})
    again, _ = load_memory(tmp_path / "mem")
    with torch.no_grad():
        assert again.config == pruned.config and torch.equal(again(h), out)
        assert torch.allclose(again.use_int8()(h)[:, keep], out[:, keep], atol=0.1)  # int8 runs on a pruned head too
    for bad in ([], [50], [-1]):
        with pytest.raises(MlpmemError, match="token ids"):
            m.prune_head(bad)
    with pytest.raises(MlpmemError, match="pruned already"):
        pruned.prune_head([1])


def test_int8_gives_each_row_its_own_activation_scale():
    """A row of small values batched with a row of large ones keeps its precision (the kernel alone scales the batch
    as one: ~40% error on the small row), so scoring in batches matches decoding one row at a time."""
    from mlpmem.modeling.mlp_memory import RowScaledInt8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 300)
    x = torch.randn(2, 64) * torch.tensor([[1e-2], [1e2]])
    q8 = RowScaledInt8Linear(linear)
    with torch.no_grad():
        want, got = linear(x), q8(x)
        alone = torch.cat([q8(x[i : i + 1]) for i in range(2)])  # one row: the kernel's own scale, no scaling
    err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    assert err < 0.05, err
    err = ((alone - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    assert err < 0.05, err
