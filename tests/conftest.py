"""Shared fixtures and pytest hooks only; the builders and other helpers they use are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

# tests never touch a hub: fail fast instead of waiting on network timeouts
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from helpers import save_tiny_model, tiny_tokenizer, write_corpus_jsonl


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    return {k: save_tiny_model(k, root / k, tok) for k in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture
def tiny_corpus_file(tmp_path) -> Path:
    return write_corpus_jsonl(tmp_path / "corpus.jsonl")


# Numerically sensitive tests take the `torch_threads` fixture and run once per thread count:
# another count changes torch's reduction order (and its float results) on every CPU.
def pytest_addoption(parser):
    parser.addoption("--torch-threads", default="1,2", help="thread counts for tests that take the torch_threads fixture (default 1,2)")


def pytest_generate_tests(metafunc):
    if "torch_threads" in metafunc.fixturenames:
        counts = [int(x) for x in metafunc.config.getoption("--torch-threads").split(",")]
        metafunc.parametrize("torch_threads", counts, indirect=True, ids=[f"threads{n}" for n in counts])


@pytest.fixture
def torch_threads(request):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)
