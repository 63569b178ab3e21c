"""One rule for every writer: save_pretrained and export write only into a new or empty folder, or one mlpmem marked as
that kind (an earlier save or export); a model someone else wrote, a memory folder, a run's stage folder are refused
with one paragraph, and nothing in them changes."""

from __future__ import annotations

import hashlib
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
    from mlpmem.hf import MLPMemoryForCausalLM
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
    from mlpmem.hf import export_hf

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
