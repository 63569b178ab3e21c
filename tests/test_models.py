import pytest
import torch

from mlpmem.errors import MlpmemError
from mlpmem.models import load_model
from mlpmem.modeling.read_site import ReadSite, capture, decoder_layers, resolve_layer, run_captured


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hooks_match_hidden_states(tiny_models, kind):
    model, tok, _ = load_model(str(tiny_models[kind]))
    ids = torch.randint(0, len(tok), (2, 20))
    n_hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    with torch.no_grad():
        model(input_ids=ids, output_hidden_states=True)  # transformers installs its own recorders on first use
    before = n_hooks()
    sites = [ReadSite(0, "output"), ReadSite(1, "ffn_input"), ReadSite(1, "output")]
    with torch.no_grad(), capture(model, sites) as got:
        out = model(input_ids=ids, output_hidden_states=True)
    # output of layer 0 is the input of layer 1
    assert torch.allclose(got[ReadSite(0, "output")], out.hidden_states[1], atol=1e-6)
    # the feed-forward input is the norm of the residual stream that the MLP adds to
    layer = decoder_layers(model)[1]
    norm = getattr(layer, "post_attention_layernorm", None) or layer.ln_2
    resid = got[ReadSite(1, "output")] - layer.mlp(got[ReadSite(1, "ffn_input")])
    assert torch.allclose(norm(resid), got[ReadSite(1, "ffn_input")], atol=1e-5)
    # hooks are gone afterwards
    assert n_hooks() == before


def test_stop_early_gives_same_states(tiny_llama):
    model, tok, _ = load_model(str(tiny_llama))
    ids = torch.randint(0, len(tok), (1, 16))
    with torch.no_grad(), capture(model, [ReadSite(0, "ffn_input")]) as full:
        model(input_ids=ids)
    with torch.no_grad(), capture(model, [ReadSite(0, "ffn_input")], stop_early=True) as early:
        assert run_captured(model, input_ids=ids) is None
    assert torch.equal(full[ReadSite(0, "ffn_input")], early[ReadSite(0, "ffn_input")])


def test_layer_out_of_range(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    assert resolve_layer(model, -1) == 1
    with pytest.raises(MlpmemError, match="out of range"):
        resolve_layer(model, 2)


def test_unknown_model_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MlpmemError, match="could not load model"):
        load_model("no-such-org/no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlpmemError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_gguf_path(tmp_path, monkeypatch):
    """A .gguf path: missing file and unreadable file give clear errors; a converted copy is reused, a changed file reconverted."""
    from mlpmem import models

    monkeypatch.setenv("MLPMEM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MlpmemError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(MlpmemError, match="could not load the GGUF"):
        load_model(str(bad))
    assert not (tmp_path / "cache" / "models" / "bad").exists()

    calls = []
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, out, marker=None: calls.append((gguf, out, marker)) or out)
    out = tmp_path / "cache" / "models" / "bad"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    (out / "mlpmem_gguf.json").write_text('{"gguf_file": "bad.gguf", "bytes": %d}' % bad.stat().st_size)
    path, model_id = models.resolve_model(str(bad))
    assert path == str(out) and model_id == str(bad.resolve()) and not calls
    bad.write_bytes(b"another file, same name")
    models.resolve_model(str(bad))
    assert len(calls) == 1 and calls[0][2]["bytes"] == bad.stat().st_size


def test_gguf_conversion_leaves_a_finished_copy_of_another_process(tiny_llama, tmp_path, monkeypatch):
    """Processes started together on a fresh machine (torchrun's ranks) each convert: one that finishes second keeps
    the first one's folder (which may be loading) instead of deleting it, and works in a folder of its own."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlpmem import models

    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: real_model(tiny_llama))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok(tiny_llama))
    gguf, out = tmp_path / "m.gguf", tmp_path / "cache" / "m"
    gguf.write_bytes(b"x")
    marker = {"gguf_file": "m.gguf", "bytes": 1}
    other = out.with_name("m.partial-1")  # another process, mid-conversion
    other.mkdir(parents=True)
    models._convert_gguf(gguf, out, marker)  # the first to finish
    first = (out / "model.safetensors").stat().st_ino
    models._convert_gguf(gguf, out, marker)  # the second: the first one's folder stays
    assert (out / "model.safetensors").stat().st_ino == first
    assert other.exists() and sorted(p.name for p in out.parent.iterdir()) == ["m", "m.partial-1"]
    (out / "mlpmem_gguf.json").write_text(json.dumps({**marker, "bytes": 2}))  # a copy of another file: replaced
    models._convert_gguf(gguf, out, marker)
    assert json.loads((out / "mlpmem_gguf.json").read_text()) == marker


def _bert_folder(folder, tok, is_decoder: bool):
    from transformers import AutoModelForCausalLM, BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=len(tok) + 8,
        max_position_embeddings=64,
        is_decoder=is_decoder,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)  # transformers gives BertLMHeadModel
    tok.save_pretrained(folder)
    return folder


def test_non_causal_models_are_refused(tiny_llama, tmp_path):
    """An encoder loaded as a causal LM (BERT: its keys see the token they predict) is refused; the same model as a decoder is not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(MlpmemError, match="not causal"):
        load_model(str(_bert_folder(tmp_path / "bert", tok, is_decoder=False)))
    model, _, _ = load_model(str(_bert_folder(tmp_path / "bert_decoder", tok, is_decoder=True)))
    assert type(model).__name__ == "BertLMHeadModel"


def test_fingerprint_identifies_weights(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from mlpmem.models import model_fingerprint

    a, _, _ = load_model(str(tiny_llama))
    fp = model_fingerprint(a)
    # the same weights reloaded, and loaded as bfloat16 (rounded before hashing), give the same fingerprint
    assert model_fingerprint(load_model(str(tiny_llama))[0]) == fp
    assert model_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)) == fp
    # another random model of the same shape does not, nor a change of one weight away from the head (a fine-tune)
    torch.manual_seed(7)
    b = AutoModelForCausalLM.from_config(a.config)
    other = model_fingerprint(b)
    assert other != fp and {k: v for k, v in other.items() if k != "weights_sha256"} == {
        k: v for k, v in fp.items() if k != "weights_sha256"
    }
    tuned = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.add_(0.05)
    assert model_fingerprint(tuned) != fp


def test_memory_base_fingerprint_refuses_another_model_for_offline_training(tiny_models, tmp_path):
    """`train --init lm_copy --model OTHER` on a datastore of MODEL: offline, the LM must be the datastore's model."""
    from mlpmem.models import memory_base_fingerprint, model_fingerprint

    llama, _, llama_id = load_model(str(tiny_models["llama"]))
    gpt2, _, gpt2_id = load_model(str(tiny_models["gpt2"]))
    assert memory_base_fingerprint(llama_id, None, llama, online=False) == model_fingerprint(llama)
    with pytest.raises(MlpmemError, match="datastore was built with") as e:
        memory_base_fingerprint(llama_id, None, gpt2, online=False)  # loads the datastore's model to compare
    assert llama_id in str(e.value) and gpt2_id in str(e.value)
    with pytest.raises(MlpmemError, match="other weights"):
        memory_base_fingerprint("anything", model_fingerprint(llama), gpt2, online=False)  # a recorded fingerprint is enough
    # online training reads the LM's own hidden states: the LM is the memory's base
    assert memory_base_fingerprint(llama_id, model_fingerprint(llama), gpt2, online=True) == model_fingerprint(gpt2)
    assert memory_base_fingerprint(llama_id, None, None, online=False) is None


def test_train_records_the_base_fingerprint_and_refuses_another_lm(tmp_path, monkeypatch):
    """train_memory stores the datastore model's fingerprint in the memory's meta; an --init lm_copy LM with other weights is refused."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fake_train_data import write_train_data
    from mlpmem import models
    from mlpmem.memory import load_memory
    from mlpmem.train import TrainConfig, train_memory

    def tiny(seed):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(
            LlamaConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=50
            )
        ).eval()

    lm, other = tiny(0), tiny(1)
    ds, tg = write_train_data(tmp_path, n=200, layer=1, site="output")  # a datastore of model "test/model"
    monkeypatch.setattr(models, "load_model", lambda name, *a, **k: (lm, None, name))  # "test/model" is `lm`
    cfg = TrainConfig(n_blocks=1, batch_size=50, epochs=0.5, lr=1e-2, precision="fp32", init="lm_copy")
    train_memory(ds, tg, tmp_path / "m", cfg, init_lm=lm)
    assert load_memory(tmp_path / "m" / "memory")[1]["model_fingerprint"] == models.model_fingerprint(lm)
    with pytest.raises(MlpmemError, match="datastore was built with 'test/model'"):
        train_memory(ds, tg, tmp_path / "m2", cfg, init_lm=other)


def test_tokenizer_hash_ignores_padding_and_truncation_settings(tiny_llama):
    """Calling a tokenizer with padding=True / truncation switches those settings on in place: the
    tokenizer is the same, so its hash (checked against every datastore and memory) must be too."""
    from transformers import AutoTokenizer

    from mlpmem.models import tokenizer_hash

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    before = tokenizer_hash(tok)
    tok(["the union", "of the states and the people"], padding=True, truncation=True, max_length=4)
    assert tokenizer_hash(tok) == before
    assert before == tokenizer_hash(AutoTokenizer.from_pretrained(tiny_llama))
