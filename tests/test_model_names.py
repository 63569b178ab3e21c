"""Models by hub name from a local Hugging Face cache (no network), as a user who has them cached would load them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from mlpmem.models import DEFAULT_MODEL, model_label


def _fake_hub_cache(root, repo_id: str, folder) -> None:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV/...}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)


def test_hub_name_loads_from_the_local_cache(tmp_path, tiny_llama):
    # the base SmolLM2 (not the Instruct GGUF default) by its hub name, as a user with it in the cache has it;
    # a fresh process, because huggingface_hub reads HF_HUB_CACHE once, at import
    _fake_hub_cache(tmp_path / "hub", "HuggingFaceTB/SmolLM2-135M", tiny_llama)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "from mlpmem.models import load_model, model_label; m, t, i = load_model('HuggingFaceTB/SmolLM2-135M'); "
        "print(i, m.config.hidden_size, model_label(i))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["HuggingFaceTB/SmolLM2-135M", "32", "HuggingFaceTB/SmolLM2-135M"]  # reported as it is


def test_the_offline_default_is_labelled_honestly():
    label = model_label(DEFAULT_MODEL)
    assert "Instruct" in label and "Q4_1" in label and "dequantised" in label
