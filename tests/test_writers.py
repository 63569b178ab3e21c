"""One rule for every writer: save_pretrained and export write only into a new or empty folder, or one mlpmem marked as
that kind (an earlier save or export); a model someone else wrote, a memory folder, a run's stage folder are refused
with one paragraph, and nothing in them changes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import memory_meta

from mlpmem.errors import MlpmemError


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    """A memory folder of the train stage (in a run's layout) and an LM + memory model over the tiny llama."""
    from mlpmem.transformers_integration import MLPMemoryForCausalLM
    from mlpmem.memory import MemoryConfig, MLPMemory, save_memory
    from mlpmem.models import load_model

    lm, tok, model_id = load_model(str(tiny_llama))
    mem = MLPMemory(MemoryConfig(d_in=lm.config.hidden_size, vocab_size=lm.get_output_embeddings().weight.shape[0], n_blocks=1))
    meta = memory_meta(model_id, tok, 1, "output", lm)
    run = tmp_path_factory.mktemp("writers") / "run"
    save_memory(run / "train" / "memory", mem, meta)
    model = MLPMemoryForCausalLM.from_parts(lm, mem, meta, tokenizer=tok, lambda_=0.3)
    return run, model


def test_save_pretrained_refuses_folders_it_did_not_write(saved, tiny_llama, tmp_path):
    run, model = saved
    hf_model = tmp_path / "someone_elses_model"
    shutil.copytree(tiny_llama, hf_model)
    memory = run / "train" / "memory"
    for folder, match in ((hf_model, "no earlier save"), (memory, "memory folder"), (run / "train", "`memory` folder")):
        if folder == run / "train":
            (folder / ".mlpmem").write_text('{"kind": "memory"}')
        before = _digest(folder)
        with pytest.raises(MlpmemError, match=match):
            model.save_pretrained(folder)
        with pytest.raises(MlpmemError, match=match):
            model.save_pretrained(folder, full_export=True)
        assert _digest(folder) == before, folder
    model.save_pretrained(tmp_path / "ours")
    model.save_pretrained(tmp_path / "ours", full_export=True)  # an earlier save of ours: replaced


def test_export_refuses_a_model_folder_and_reuses_its_own(saved, tiny_llama, tmp_path):
    from mlpmem.transformers_integration import export_hf

    run, _ = saved
    hf_model = tmp_path / "someone_elses_model"
    shutil.copytree(tiny_llama, hf_model)
    before = _digest(hf_model)
    with pytest.raises(MlpmemError, match="not written by mlpmem"):
        export_hf(run / "train" / "memory", hf_model)
    assert _digest(hf_model) == before
    export_hf(run / "train" / "memory", tmp_path / "export", lambda_=0.2)
    export_hf(run / "train" / "memory", tmp_path / "export", lambda_=0.2, full_export=True)  # its own folder again
    assert (tmp_path / "export" / "model.safetensors").exists()


def test_a_saved_model_that_changed_is_refused_on_load(saved, tmp_path):
    """Exports carry their integrity: a flipped byte, a missing file, swapped memory folders or a weights file without
    a memory tensor are refused on load, by reference and in full, instead of loading (or initialising) other weights."""
    from safetensors.torch import load_file, save_file

    from mlpmem.transformers_integration import MLPMemoryForCausalLM

    run, model = saved
    extra = MLPMemoryForCausalLM.from_parts(model.lm, model.memory, model.component_meta("memory"), tokenizer=model.tokenizer)
    extra.add_memory(type(model.memory)(model.memory.config), name="b", meta=model.component_meta("memory"))
    for full in (False, True):
        good = tmp_path / f"good{int(full)}"
        (model if full else extra).save_pretrained(good, full_export=full)
        MLPMemoryForCausalLM.from_pretrained(good)  # as saved: loads

        flipped = tmp_path / f"flipped{int(full)}"
        shutil.copytree(good, flipped)
        target = flipped / ("model.safetensors" if full else "memory/model.safetensors")
        data = bytearray(target.read_bytes())
        data[-3] ^= 0x01
        target.write_bytes(bytes(data))
        with pytest.raises(MlpmemError, match="not the file its save wrote"):
            MLPMemoryForCausalLM.from_pretrained(flipped)

        missing = tmp_path / f"missing{int(full)}"
        shutil.copytree(good, missing)
        (missing / ("tokenizer.json" if full else "memories/b/memory_config.json")).unlink()
        with pytest.raises(MlpmemError, match="is missing"):
            MLPMemoryForCausalLM.from_pretrained(missing)

    swapped = tmp_path / "swapped"
    shutil.copytree(tmp_path / "good0", swapped)
    a, b = swapped / "memory" / "model.safetensors", swapped / "memories" / "b" / "model.safetensors"
    tmp = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(tmp)
    with pytest.raises(MlpmemError, match="not the file its save wrote"):
        MLPMemoryForCausalLM.from_pretrained(swapped)

    # a weights file rewritten without a memory tensor, its record hand-edited to match: the tensor list still says
    lacking = tmp_path / "lacking"
    shutil.copytree(tmp_path / "good1", lacking)
    state = load_file(lacking / "model.safetensors")
    state.pop(next(k for k in state if k.startswith("memory.")))
    save_file(state, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((lacking / "config.json").read_text())
    cfg["integrity"]["files"].pop("model.safetensors")
    (lacking / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlpmemError, match="lack memory"):
        MLPMemoryForCausalLM.from_pretrained(lacking)
