"""What tests share, in one plain module (not a test module): ``from helpers import ...`` in any test file.

- tiny builders: ``make_texts``, ``tiny_tokenizer``, ``save_tiny_model``, ``write_corpus_jsonl``, ``tiny_knn_run``, ``tiny_recipe``
- ``run_cli``: the ``mlpmem`` CLI in this process
- ``memory_meta``: the meta a memory records about the LM it reads
- named tuples for the LM + memory parts that module fixtures hand to their tests

Fixtures (``tiny_models``, ``tiny_llama``, ``tiny_corpus_file``, ``torch_threads``) and pytest hooks live in conftest.py.
Datastore and training-data folders written from arrays: fake_store.py and fake_train_data.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from torch import nn

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were their one all we can her has there been if more when will would who so no union congress states nation "
    "people government year law war peace trade money public great country"
).split()


def make_texts(n_docs: int = 12, words_per_doc: int = 120, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_doc)) + "." for _ in range(n_docs)]


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 120) trained on ``make_texts(40)``; <eos> is also the pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(make_texts(40), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    return tok


def save_tiny_model(kind: str, folder: Path, tok) -> Path:
    """A random 2-layer ``kind`` ("llama" or "gpt2") model, hidden size 32, saved with ``tok`` in ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    # vocab a little larger than the tokenizer, as in real models (scatter into the logits size)
    v = len(tok) + 8
    if kind == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=v,
            max_position_embeddings=256,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
        )
    else:
        cfg = GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=v, n_positions=256, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id
        )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


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


def tiny_recipe(tmp_path, model, corpus, **train):
    """A pipeline recipe (dict) small enough for a test: run folder ``tmp_path / "run"``; ``train`` overrides train settings."""
    return {
        "out": str(tmp_path / "run"),
        "model": str(model),
        "corpus": {
            "source": str(corpus),
            "valid_fraction": 0.2,
            "test_fraction": 0.2,
            "train_tokens": 2000,
            "valid_tokens": 300,
            "test_tokens": 400,
        },
        "datastore": {"context": 64, "stride": 32, "batch_size": 4},
        "knn": {"k": 32, "temperatures": [1.0, 4.0]},
        "targets": {"top_m": 16},
        "train": {"n_blocks": 1, "epochs": 1.0, "batch_size": 256, "eval_every": 0, "ckpt_every": 0, **train},
        # fixed: the default (auto) would fit a gate on these 300 valid tokens, a minute of tests for what test_gate covers
        "eval": {"mixing": "fixed"},
    }


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Run the `mlpmem` CLI in this process: (exit code, stderr), asserting no traceback reached the user."""
    from mlpmem.cli import main

    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def memory_meta(model_id: str, tok, layer: int, site: str, lm: nn.Module | None = None, **extra: Any) -> dict:
    """The meta a memory records about its LM: model id, tokenizer hash, the site it reads (layer, site), with ``lm``
    that model's weights fingerprint, then any ``extra`` keys (results, ...)."""
    from mlpmem.models import model_fingerprint, tokenizer_hash

    meta = {"model_id": model_id, "tokenizer_hash": tokenizer_hash(tok), "layer": layer, "site": site}
    if lm is not None:
        meta["model_fingerprint"] = model_fingerprint(lm)
    return {**meta, **extra}


# LM + memory parts that module fixtures build once for their tests; they unpack as the plain tuples they replace.
class MemoryParts(NamedTuple):
    """An LM, its tokenizer, one memory and that memory's meta."""

    lm: nn.Module
    tok: Any
    mem: nn.Module
    meta: dict


class ArchMemoryParts(NamedTuple):
    """``MemoryParts`` for one tiny architecture, named first ("llama", "gpt2")."""

    arch: str
    lm: nn.Module
    tok: Any
    mem: nn.Module
    meta: dict


class GatedMemoryParts(NamedTuple):
    """``MemoryParts`` plus a mixing gate and the gate's meta."""

    lm: nn.Module
    tok: Any
    mem: nn.Module
    meta: dict
    gate: nn.Module
    gate_meta: dict


class TwoMemoryParts(NamedTuple):
    """An LM, its tokenizer and two memories ``a`` and ``b`` with their metas (they may read different sites)."""

    lm: nn.Module
    tok: Any
    mem_a: nn.Module
    meta_a: dict
    mem_b: nn.Module
    meta_b: dict


def forget_integrity(folder: Path) -> None:
    """Drop a saved model's integrity record (as a save made before it existed), so a test that edits one of its files
    reaches the check behind it (tokenizer, gate, router) instead of the integrity check, which refuses any edit."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg.pop("integrity", None)
    (Path(folder) / "config.json").write_text(json.dumps(cfg))
