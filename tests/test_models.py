import pytest
import torch

from mlpmem.errors import MlpmemError
from mlpmem.models import Site, capture, decoder_layers, load_model, resolve_layer, run_captured


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hooks_match_hidden_states(tiny_models, kind):
    model, tok, _ = load_model(str(tiny_models[kind]))
    ids = torch.randint(0, len(tok), (2, 20))
    n_hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    with torch.no_grad():
        model(input_ids=ids, output_hidden_states=True)  # transformers installs its own recorders on first use
    before = n_hooks()
    sites = [Site(0, "output"), Site(1, "ffn_input"), Site(1, "output")]
    with torch.no_grad(), capture(model, sites) as got:
        out = model(input_ids=ids, output_hidden_states=True)
    # output of layer 0 is the input of layer 1
    assert torch.allclose(got[Site(0, "output")], out.hidden_states[1], atol=1e-6)
    # the feed-forward input is the norm of the residual stream that the MLP adds to
    layer = decoder_layers(model)[1]
    norm = getattr(layer, "post_attention_layernorm", None) or layer.ln_2
    resid = got[Site(1, "output")] - layer.mlp(got[Site(1, "ffn_input")])
    assert torch.allclose(norm(resid), got[Site(1, "ffn_input")], atol=1e-5)
    # hooks are gone afterwards
    assert n_hooks() == before


def test_stop_early_gives_same_states(tiny_llama):
    model, tok, _ = load_model(str(tiny_llama))
    ids = torch.randint(0, len(tok), (1, 16))
    with torch.no_grad(), capture(model, [Site(0, "ffn_input")]) as full:
        model(input_ids=ids)
    with torch.no_grad(), capture(model, [Site(0, "ffn_input")], stop_early=True) as early:
        assert run_captured(model, input_ids=ids) is None
    assert torch.equal(full[Site(0, "ffn_input")], early[Site(0, "ffn_input")])


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
