"""Knowledge probe: items come from the training text, are deterministic, and run as an lm-eval task."""

from __future__ import annotations

import json

import pytest

from mlpmem.corpus import Corpus, CorpusConfig, build_corpus
from mlpmem.errors import MlpmemError
from mlpmem.models import load_tokenizer
from mlpmem.probe import build_probe


@pytest.fixture(scope="module")
def corpus(tiny_llama, tmp_path_factory):
    from helpers import make_texts

    root = tmp_path_factory.mktemp("probe")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(n_docs=12, words_per_doc=150)))
    return build_corpus(root / "corpus", CorpusConfig(source=str(src), model=str(tiny_llama)))


def read_items(folder):
    return [json.loads(x) for x in (folder / "items.jsonl").read_text().splitlines()]


def test_items_come_from_the_training_text(corpus, tiny_llama, tmp_path):
    out = build_probe(corpus, tmp_path / "p", n_items=12, seed=3, context_tokens=16, continuation_tokens=6)
    items = read_items(out)
    assert len(items) == 12
    tok = load_tokenizer(str(tiny_llama))
    c = Corpus(corpus)
    tokens, owner = c.tokens("train"), c.doc_index("train")
    train_ids = {d["id"] for d in json.loads((corpus / "documents.json").read_text())["train"]}
    labels = set()
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert all(ch.startswith(" ") for ch in it["choices"])  # no cue from where a choice starts
        s, truth = it["source"]["position"], it["choices"][it["label"]]
        assert it["context"] == tok.decode(tokens[s : s + 16].tolist())
        assert truth == tok.decode(tokens[s + 16 : s + 22].tolist())
        assert it["source"]["document"] in train_ids
        for q, ch in zip(it["source"]["choice_positions"], it["choices"]):
            assert ch == tok.decode(tokens[q : q + 6].tolist())
            assert (owner[q] == owner[s]) == (ch == truth)  # distractors come from other documents
        labels.add(it["label"])
    assert len(labels) > 1  # the answer is not always in the same place
    assert (out / "manifest.json").exists() and (out / "probe.yaml").exists()


def test_deterministic_and_seeded(corpus, tmp_path):
    a = build_probe(corpus, tmp_path / "a", n_items=8, seed=0)
    b = build_probe(corpus, tmp_path / "b", n_items=8, seed=0)
    c = build_probe(corpus, tmp_path / "c", n_items=8, seed=1)
    assert (a / "items.jsonl").read_bytes() == (b / "items.jsonl").read_bytes()
    assert (a / "items.jsonl").read_bytes() != (c / "items.jsonl").read_bytes()
    assert build_probe(corpus, a, n_items=8, seed=0) == a  # finished: skipped
    with pytest.raises(MlpmemError, match="different configuration"):
        build_probe(corpus, a, n_items=9, seed=0)


def test_too_small_corpus_is_refused(corpus, tmp_path):
    with pytest.raises(MlpmemError, match="no room"):
        build_probe(corpus, tmp_path / "p", n_items=4, context_tokens=5000)


def test_probe_runs_in_lm_eval(corpus, tiny_llama, tmp_path):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import mlpmem.lm_eval_backend  # noqa: F401

    out = build_probe(corpus, tmp_path / "p", n_items=6, seed=0, task_name="tiny_probe")
    tm = TaskManager(include_path=str(out), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_llama), "dtype": "float32"},
        tasks=["tiny_probe"],
        task_manager=tm,
        device="cpu",
        batch_size=4,
        bootstrap_iters=0,
        log_samples=True,
    )
    r = res["results"]["tiny_probe"]
    assert 0.0 <= r["acc,none"] <= 1.0 and "acc_norm,none" in r
    sample = res["samples"]["tiny_probe"][0]
    # lm-eval scores exactly context + choice (no delimiter added between them)
    assert sample["arguments"][0][0] + sample["arguments"][0][1] == sample["doc"]["context"] + sample["doc"]["choices"][0]
