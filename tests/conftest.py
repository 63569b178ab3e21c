"""Shared fixtures: tiny random models built from configs, a tiny tokenizer and corpus."""

from __future__ import annotations

import json
import os
from pathlib import Path

# tests never touch a hub: fail fast instead of waiting on network timeouts
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
         "you were their one all we can her has there been if more when will would who so no union congress states nation "
         "people government year law war peace trade money public great country").split()


def make_texts(n_docs: int = 12, words_per_doc: int = 120, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_doc)) + "." for _ in range(n_docs)]


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(make_texts(40), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    return tok


def _save_model(kind: str, folder: Path, tok) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    # vocab a little larger than the tokenizer, as in real models (scatter into the logits size)
    v = len(tok) + 8
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=v, max_position_embeddings=256, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    else:
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=v, n_positions=256, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tok = _tokenizer(root)
    return {k: _save_model(k, root / k, tok) for k in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def write_corpus_jsonl(path: Path) -> Path:
    """The tiny corpus as JSONL, one document per line."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts()))
    return path


def tiny_knn_run(out: Path, tiny_llama: Path) -> Path:
    """A finished run's kNN-LM parts in ``out``, as the pipeline lays them out: corpus, datastore, flat index, knn.json (k, T)."""
    from mlpmem.corpus import CorpusConfig, build_corpus
    from mlpmem.datastore import DatastoreConfig, build_datastore
    from mlpmem.index import IndexConfig, build_index

    src = out.parent / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(n_docs=8, words_per_doc=60)))
    build_corpus(out / "corpus", CorpusConfig(source=str(src), model=str(tiny_llama), valid_fraction=0.25, test_fraction=0.25))
    build_datastore(out / "corpus", out / "datastore", DatastoreConfig(model=str(tiny_llama), context=32, stride=16, batch_size=4))
    build_index(out / "datastore", out / "index", IndexConfig(kind="flat"))
    (out / "knn.json").write_text(json.dumps({"temperature": 2.0, "lambda": 0.3, "key": {"config": {"k": 8}}}))
    return out


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Run the `mlpmem` CLI in this process: (exit code, stderr), asserting no traceback reached the user."""
    from mlpmem.cli import main

    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


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
