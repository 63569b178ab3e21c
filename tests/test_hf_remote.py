"""The LM + memory as a hub-native model: cls(config), the standard from_pretrained (hub cache,
revision, local_files_only, dtype="auto"), the self-contained remote-code file, old folders, the card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import MemoryParts, memory_meta

from mlpmem.errors import MlpmemError
from mlpmem.memory import MemoryConfig, MLPMemory
from mlpmem.models import load_model, logits_size, model_fingerprint
from mlpmem.modeling.read_site import ReadSite, capture

hf = pytest.importorskip("mlpmem.transformers_integration")
MLPMemoryForCausalLM = hf.MLPMemoryForCausalLM
from mlpmem.modeling.saving import model_card  # noqa: E402

REV = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the hub cache names snapshots


@pytest.fixture(scope="module")
def memory_parts(tiny_llama) -> MemoryParts:
    lm, tok, model_id = load_model(str(tiny_llama))
    torch.manual_seed(1)
    mem = MLPMemory(MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1, zero_init_blocks=False))
    mem.head.weight.data.normal_(0.0, 0.5)  # peaked enough to change the LM's choices
    meta = memory_meta(model_id, tok, 1, "ffn_input", lm=lm, results={"ppl": {"lm": 31.5, "lm+memory": 27.25}})
    return MemoryParts(lm, tok, mem.eval(), meta)


@pytest.fixture(scope="module")
def model(memory_parts):
    lm, tok, mem, meta = memory_parts
    return MLPMemoryForCausalLM.from_parts(lm, mem, meta, tokenizer=tok, lambda_=0.5)


@pytest.fixture(scope="module")
def full(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "full"
    model.save_pretrained(folder, full_export=True)
    return folder


def ids() -> torch.Tensor:
    return torch.tensor([[3, 14, 15, 9, 2, 6], [5, 3, 5, 8, 9, 7]])


def hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """A Hugging Face hub cache holding ``folder`` as revision REV of ``repo`` (refs/main points at it), built by hand."""
    entry = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / REV)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(REV)
    return root


def test_cls_config_builds_both_parts(model):
    built = MLPMemoryForCausalLM(model.config)
    assert type(built.lm) is type(model.lm) and isinstance(built.memory, MLPMemory)
    assert built.state_dict().keys() == model.state_dict().keys()
    assert built.site == model.site and built.lambda_ == 0.5
    # freshly built, not copied: the weights are new (the memory starts by its own init)
    assert not torch.equal(built.memory.head.weight, model.memory.head.weight)
    # parts handed to from_parts keep their weights (post_init must not initialise them again)
    trained = MLPMemory(MemoryConfig(**model.config.memory_config))
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_(0.0, 0.3)  # stands for trained weights
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    again = MLPMemoryForCausalLM.from_parts(
        built.lm, trained, dict(model.config.memory_meta, model_fingerprint=model_fingerprint(built.lm))
    )
    assert all(torch.equal(v, before[k]) for k, v in again.memory.state_dict().items())


def test_full_export_loads_on_the_standard_path_from_a_hub_cache(model, full, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    # no override may run for a full export: transformers' own from_pretrained loads it
    calls = []
    original = PreTrainedModel.from_pretrained.__func__
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: calls.append(a[0]) or original(cls, *a, **k)))
    cache = hub_cache(tmp_path / "cache", "org/lm-memory", full)
    want = model(ids()).logits
    with torch.no_grad():
        for kw in ({}, {"revision": REV}, {"revision": "main", "token": "hf_unused"}):
            loaded = AutoModelForCausalLM.from_pretrained("org/lm-memory", cache_dir=cache, local_files_only=True, **kw)
            assert isinstance(loaded, MLPMemoryForCausalLM)
            assert torch.equal(loaded(ids()).logits, want)
    assert calls == ["org/lm-memory"] * 3
    with pytest.raises(OSError):  # another revision is not in the cache, and the network is not asked
        AutoModelForCausalLM.from_pretrained("org/lm-memory", cache_dir=cache, local_files_only=True, revision="f" * 40)
    # lambda_ overrides the saved value as any config attribute does
    assert MLPMemoryForCausalLM.from_pretrained("org/lm-memory", cache_dir=cache, local_files_only=True, lambda_=0.2).lambda_ == 0.2


def test_by_reference_and_base_model_from_a_hub_cache(model, memory_parts, full, tmp_path):
    lm, tok, _, _ = memory_parts
    model.save_pretrained(tmp_path / "ref")  # by reference: memory/ only, the base named in the config
    assert not (tmp_path / "ref" / "model.safetensors").exists()
    cache = hub_cache(tmp_path / "cache", "org/ref", tmp_path / "ref")
    hub_cache(cache, "org/full", full)
    want = model(ids()).logits
    with torch.no_grad():
        by_ref = MLPMemoryForCausalLM.from_pretrained("org/ref", cache_dir=cache, local_files_only=True, revision=REV)
        assert torch.equal(by_ref(ids()).logits, want)
        # base_model= with a full export: the memory's weights come out of the full weights file
        other_base = MLPMemoryForCausalLM.from_pretrained("org/full", cache_dir=cache, local_files_only=True, base_model=lm)
        assert other_base.lm is lm and torch.equal(other_base(ids()).logits, want)


def test_dtype_auto_restores_the_checkpoint_dtype(memory_parts, tmp_path):
    import copy

    lm, tok, mem, meta = memory_parts
    half = copy.deepcopy(lm).to(torch.bfloat16)
    MLPMemoryForCausalLM.from_parts(half, mem, meta, tokenizer=tok).save_pretrained(tmp_path / "bf16", full_export=True)
    loaded = MLPMemoryForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert loaded.lm.dtype == torch.bfloat16
    assert loaded.memory.head.weight.dtype == torch.float32  # the memory stays float32 (see _keep_in_fp32_modules_strict)
    assert MLPMemoryForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).lm.dtype == torch.float32
    # by reference, the base is loaded in its checkpoint's dtype too
    half.save_pretrained(tmp_path / "half_base")
    tok.save_pretrained(tmp_path / "half_base")
    MLPMemoryForCausalLM.from_parts(half, mem, meta, tokenizer=tok, base_model=str(tmp_path / "half_base")).save_pretrained(
        tmp_path / "ref"
    )
    by_ref = MLPMemoryForCausalLM.from_pretrained(tmp_path / "ref", dtype="auto")
    assert by_ref.lm.dtype == torch.bfloat16 and by_ref.memory.head.weight.dtype == torch.float32


def test_remote_code_without_mlpmem_generates_the_same_tokens(model, memory_parts, full, tmp_path):
    """The exported folder loads with trust_remote_code=True in a process where `import mlpmem` fails."""
    lm, tok, _, _ = memory_parts
    model.save_pretrained(tmp_path / "ref")  # by reference to the tiny model's folder
    prompt = tok("the union and the people of", return_tensors="pt").input_ids
    want = model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    want_beam = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, lambda_=0.3)[0].tolist()
    code = (
        "import sys, json, torch\n"
        "sys.modules['mlpmem'] = None  # any `import mlpmem...` now raises ImportError\n"
        "from transformers import AutoModelForCausalLM\n"
        "out = {}\n"
        "for name in sys.argv[2:]:\n"
        "    m = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True)\n"
        "    assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "    p = torch.tensor([json.loads(sys.argv[1])])\n"
        "    out[name] = [m.generate(p, max_new_tokens=8, do_sample=False)[0].tolist(),\n"
        "                 m.generate(p, max_new_tokens=6, num_beams=3, do_sample=False, lambda_=0.3)[0].tolist()]\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-c", code, json.dumps(prompt[0].tolist()), str(full), str(tmp_path / "ref")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got == {str(full): [want, want_beam], str(tmp_path / "ref"): [want, want_beam]}
    assert want != lm.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()  # the memory mattered
    # the saved file is the package's own, imports no mlpmem outside try blocks, and is what auto_map names
    import mlpmem.modeling.modeling_mlpmem
    from transformers.dynamic_module_utils import get_imports

    assert (full / "modeling_mlpmem.py").read_text() == Path(mlpmem.modeling.modeling_mlpmem.__file__).read_text()
    assert "mlpmem" not in get_imports(full / "modeling_mlpmem.py")
    assert json.loads((full / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == "modeling_mlpmem.MLPMemoryForCausalLM"


def test_no_private_generation_hooks_overridden():
    """No private methods of transformers are overridden or duck-typed (``_reorder_cache``,
    ``_prepare_cache_for_generation``, ...): they change between minor versions. The one
    private method is ``_init_weights``, the hook transformers documents for custom models."""
    own = {k for k, v in vars(MLPMemoryForCausalLM).items() if k.startswith("_") and not k.startswith("__") and callable(v)}
    assert own == {"_init_weights"}, own


def test_capture_reads_the_layers_tensors(tiny_models):
    """The one hook (mlpmem.modeling.read_site.capture, used by the datastore and the model class) reads, at both
    sites, the tensors transformers itself reports: a layer's output is hidden_states[layer + 1], and the input of
    a layer's feed-forward block is its post-attention norm applied to the residual stream."""
    for kind in ("llama", "gpt2"):
        lm, _, _ = load_model(str(tiny_models[kind]))
        for layer, site in ((0, "output"), (1, "ffn_input"), (1, "output")):
            with torch.no_grad(), capture(lm, [ReadSite(layer, site)]) as got:
                out = lm(ids(), output_hidden_states=True)
            h = got[ReadSite(layer, site)]
            if site == "output" and layer < lm.config.num_hidden_layers - 1:  # the last one is reported after the final norm
                assert torch.equal(h, out.hidden_states[layer + 1])
            elif site == "ffn_input":
                assert h.shape == out.hidden_states[layer].shape and not torch.equal(h, out.hidden_states[layer])


def test_folders_of_the_previous_format_still_load(model, memory_parts, tmp_path):
    lm, tok, _, _ = memory_parts
    want = model(ids()).logits
    # by reference: config.json without text_config / base_weights, the memory in memory/
    model.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("text_config", "base_weights"):
        cfg.pop(key)
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        assert torch.equal(MLPMemoryForCausalLM.from_pretrained(tmp_path / "old")(ids()).logits, want)
        # a full export of that format: the base in base/, named by base_subfolder
        lm.save_pretrained(tmp_path / "old" / "base")
        tok.save_pretrained(tmp_path / "old" / "base")
        cfg.update(base_subfolder="base", base_model=str(tmp_path / "gone"))
        (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
        assert torch.equal(MLPMemoryForCausalLM.from_pretrained(tmp_path / "old")(ids()).logits, want)
    with pytest.raises(MlpmemError, match="text_config"):  # cls(config) cannot build a base it has no config of
        MLPMemoryForCausalLM(hf.MLPMemoryConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}))


def test_model_card(full, tmp_path, model):
    card = (full / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "| lambda (memory weight) | 0.5 |" in card
    assert str(model.config.base_model) in card and "included" in card
    assert '"lm+memory": 27.25' in card  # the run's results from the memory's meta
    model.save_pretrained(tmp_path / "ref")
    assert "loaded by reference" in (tmp_path / "ref" / "README.md").read_text()
    # the offline default's alias is named for what it is: the Instruct model, Q4_1, dequantised
    alias = hf.MLPMemoryConfig(**{**model.config.to_dict(), "base_model": "smollm2-135m"})
    card = model_card(alias, True, 1, 1)
    assert "# SmolLM2-135M-Instruct (GGUF Q4_1" in card and "`smollm2-135m` = SmolLM2-135M-Instruct" in card


def test_fingerprint_checked_when_pairing(memory_parts, tiny_models, tmp_path, caplog):
    lm, tok, mem, meta = memory_parts
    other, _, other_id = load_model(str(tiny_models["llama"]))
    torch.manual_seed(5)
    for p in other.parameters():
        p.data.normal_(0.0, 0.02)  # same architecture and tokenizer, other weights
    with pytest.raises(MlpmemError, match="other weights") as e:
        MLPMemoryForCausalLM.from_parts(other, mem, meta, tokenizer=tok)
    assert meta["model_id"] in str(e.value) and "weights_sha256" in str(e.value)
    # through a saved folder with base_model=, as `mlpmem generate --base-model` does
    MLPMemoryForCausalLM.from_parts(lm, mem, meta, tokenizer=tok).save_pretrained(tmp_path / "m")
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(MlpmemError, match="other weights"):
        MLPMemoryForCausalLM.from_pretrained(tmp_path / "m", base_model=str(tmp_path / "other"))
    # `mlpmem generate MEMORY --base-model OTHER`: a train-stage memory folder with another base
    from mlpmem.generation import GenerateConfig, generate_side_by_side
    from mlpmem.memory import save_memory

    save_memory(tmp_path / "mem", mem, meta)
    with pytest.raises(MlpmemError, match="other weights") as e:
        generate_side_by_side(str(tmp_path / "mem"), ["war"], GenerateConfig(max_new_tokens=2), base_model=str(tmp_path / "other"))
    assert str(tmp_path / "other") in str(e.value) and meta["model_id"] in str(e.value) and "use the base model" in str(e.value)
    # a memory saved before fingerprints existed: a warning, not a refusal
    old_meta = {k: v for k, v in meta.items() if k != "model_fingerprint"}
    with caplog.at_level("WARNING"):
        MLPMemoryForCausalLM.from_parts(other, mem, old_meta, tokenizer=tok)
    assert "records no fingerprint" in caplog.text


def test_an_interrupted_full_export_is_not_taken_for_a_finished_one(model, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def crash(self, folder, **kw):  # as transformers does: config.json first, then the weights, here cut short
        self.config.save_pretrained(folder)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "m", full_export=True)
    assert not (tmp_path / "m" / "config.json").exists()
    with pytest.raises(MlpmemError, match="config.json is missing"):
        MLPMemoryForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(MlpmemError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "m", push_to_hub=True)


def test_export_card_shows_the_runs_results(memory_parts, tmp_path):
    """export_hf of a run's memory: the card shows what the train stage and the pipeline measured next to it."""
    from mlpmem.memory import save_memory

    lm, tok, mem, meta = memory_parts
    run = tmp_path / "run"
    save_memory(run / "train" / "memory", mem, {k: v for k, v in meta.items() if k != "results"})
    (run / "train" / "manifest.json").write_text(json.dumps({"valid": {"kl": 1.25, "ce": 3.5}, "steps": 40}))
    (run / "report.json").write_text(json.dumps({"ppl": {"lm": 40.5, "lm+memory": 35.75}, "corpus": "builtin:sotu"}))
    out = hf.export_hf(run / "train" / "memory", tmp_path / "hf", lambda_=0.3, full_export=True)
    card = (out / "README.md").read_text()
    assert '"lm+memory": 35.75' in card and '"kl": 1.25' in card and "builtin:sotu" in card and "| lambda (memory weight) | 0.3 |" in card
    assert json.loads((out / "config.json").read_text())["memory_meta"]["results"]["steps"] == 40
