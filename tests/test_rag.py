"""RAG baseline: chunking, BM25 retrieval, the prompt it builds, the lm-eval wrapper, and clear errors."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("bm25s")

from mlpmem.errors import MlpmemError  # noqa: E402
from mlpmem.rag import BM25Retriever, RetrievalLM, augment, chunk  # noqa: E402

DOCS = [
    "cactus (noun): a succulent plant of arid regions with spines.",
    "violin (noun): a bowed stringed instrument with four strings.",
    "glacier (noun): a slowly moving mass of ice.",
    "ferret (noun): a domesticated polecat used to hunt rabbits.",
]


def test_chunk_packs_whole_documents_and_cuts_long_ones():
    assert chunk(DOCS, 20) == [DOCS[0] + " " + DOCS[1], DOCS[2] + " " + DOCS[3]]  # 10 + 10 words, then 9 + 10
    long = " ".join(f"w{i}" for i in range(25))
    assert chunk([long], 10) == [" ".join(f"w{i}" for i in range(a, min(a + 10, 25))) for a in (0, 10, 20)]
    assert sum(len(p.split()) for p in chunk(DOCS, 7)) == sum(len(d.split()) for d in DOCS)  # no word lost or repeated


def test_bm25_finds_the_passage_with_the_answer():
    r = BM25Retriever(DOCS)
    assert r.search(["a bowed instrument with strings"], 1) == [[DOCS[1]]]
    top = r.search(["moving mass of ice", "polecat hunting rabbits"], 2)
    assert top[0][0] == DOCS[2] and top[1][0] == DOCS[3]
    assert r.search(["the of and"], 2) == [[]]  # nothing but stopwords: no passage rather than a random one
    assert len(r.search(["ice"], 10)[0]) == 1  # k above the index size is capped; zero-score passages are dropped


def test_empty_index_is_a_clear_error():
    with pytest.raises(MlpmemError, match="retrieval index is empty"):
        BM25Retriever(["", "   "])


def test_rag_settings_from_a_preset_or_k_and_chunk_words():
    from mlpmem.rag import RagConfig, rag_config

    assert rag_config("top3x100") == RagConfig(3, 100) and rag_config("top5x100") == RagConfig(5, 100)  # as users deploy RAG
    assert rag_config() == RagConfig(3, 48) and rag_config(k="1", chunk_words="16") == RagConfig(1, 16)  # lm-eval passes strings
    assert rag_config(k=5) == RagConfig(5, 48)
    with pytest.raises(MlpmemError, match="no RAG preset 'top9'") as e:
        rag_config("top9")
    assert "top3x100, top5x100" in str(e.value)
    with pytest.raises(MlpmemError, match="sets k and chunk_words"):
        rag_config("top3x100", k=1)  # which one would win is not for us to guess
    with pytest.raises(MlpmemError, match="k >= 1"):
        rag_config(k=0)


def test_augment():
    assert augment("Question: x?\nAnswer:", ["p1", "p2"]) == "Background:\np1\np2\n\nQuestion: x?\nAnswer:"
    assert augment("Q", []) == "Q"


class Recorder:
    """A stand-in lm-eval LM that records the contexts it was asked about."""

    rank, world_size = 0, 1

    def __init__(self):
        self.seen = []

    def loglikelihood(self, requests, disable_tqdm=False):
        self.seen += [r.args[0] for r in requests]
        return [(0.0, True) for _ in requests]

    def generate_until(self, requests, disable_tqdm=False):
        self.seen += [r.args[0] for r in requests]
        return ["x" for _ in requests]


def test_wrapper_puts_passages_for_the_doc_query_before_the_prompt():
    from lm_eval.api.instance import Instance

    inner = Recorder()
    lm = RetrievalLM(inner, BM25Retriever(DOCS), k=1)
    # the prompt alone would retrieve the violin: the doc's query must win
    doc = {"query": "a slowly moving mass of ice", "prompt": "Name the bowed stringed instrument."}
    reqs = [
        Instance("loglikelihood", doc, ("Name the bowed stringed instrument.", " glacier"), 0),
        Instance("generate_until", {"prompt": "What is cactus?"}, ("What is cactus?", {"until": ["\n"]}), 0),
    ]
    lm.loglikelihood(reqs[:1])
    lm.generate_until(reqs[1:])
    assert inner.seen[0] == f"Background:\n{DOCS[2]}\n\nName the bowed stringed instrument."  # by the doc's query, not the prompt
    assert inner.seen[1] == f"Background:\n{DOCS[0]}\n\nWhat is cactus?"  # no query field: the prompt is the query
    assert reqs[0].args[1] == " glacier" and lm.rank == 0


def test_rag_backend_scores_a_task_and_refuses_a_foreign_task_folder(tiny_llama, tmp_path):
    """mlpmem-rag on a tiny model: lm-eval runs it end to end; a corpus with no text and a mismatched task folder are refused."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mlpmem.corpus import CorpusConfig, build_corpus
    from mlpmem.rag import RagLM, SharedContextLM, split_texts

    src = tmp_path / "docs.jsonl"
    # 3 copies of each document (told apart by a note): 10 of the 12 land in train, so each fact is in the index
    src.write_text("".join(json.dumps({"text": f"{d} Note {i}."}) + "\n" for i in range(3) for d in DOCS))
    corpus = build_corpus(tmp_path / "corpus", CorpusConfig(source=str(src), model=str(tiny_llama), valid_fraction=0.1, test_fraction=0.1))
    task = tmp_path / "task"
    task.mkdir()
    (task / "items.jsonl").write_text(
        "".join(
            json.dumps({"query": q, "prompt": "Which?", "choices": [" a", " b"], "label": 0}) + "\n" for q in ("ice", "violin", "ferret")
        )
    )
    (task / "t.yaml").write_text(
        f"task: rag_t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {task / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: prompt\ndoc_to_choice: choices\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    lm = RagLM(corpus=str(corpus), pretrained=str(tiny_llama), k=2, chunk_words=8, device="cpu", batch_size=2)
    assert isinstance(lm.inner, SharedContextLM)  # each prompt once for all its choices, by default
    assert not isinstance(
        RagLM(corpus=str(corpus), pretrained=str(tiny_llama), chunk_words=8, device="cpu", shared_context="false").inner, SharedContextLM
    )
    five = RagLM(corpus=str(corpus), pretrained=str(tiny_llama), preset="top5x100", device="cpu")
    assert five.k == 5 and five.retriever.passages == chunk(split_texts(corpus), 100)  # the text in passages of 100 words
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["rag_t"],
        task_manager=TaskManager(include_path=str(task), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    ctx = [
        s["arguments"]["gen_args_0"]["arg_0"] if isinstance(s["arguments"], dict) else s["arguments"][0][0] for s in out["samples"]["rag_t"]
    ]
    assert len(ctx) == 3 and all(c.startswith("Background:\n") and c.endswith("Which?") for c in ctx)
    with pytest.raises(MlpmemError, match="tasks_source|no finished `tasks` stage"):
        RagLM(corpus=str(corpus), pretrained=str(tiny_llama), tasks=str(task))


def test_command_line_prints_bad_input_without_a_traceback(monkeypatch, capsys):
    from mlpmem import lm_eval_cli, rag

    def fail():
        rag.BM25Retriever([])  # what an empty corpus split gives

    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", fail)
    with pytest.raises(SystemExit) as e:
        lm_eval_cli.main(["--model", "mlpmem-rag"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("mlpmem: error: the retrieval index is empty") and "Traceback" not in err


def test_shared_context_scoring_equals_hflm(tiny_llama, tmp_path):
    """SharedContextLM (each context once, its continuations over the repeated KV cache) gives HFLM's log-likelihoods and
    greedy flags: plain model and LM + memory at lambda 0.5; contexts shared by 1 to 3 continuations of 1 to 4 tokens."""
    import torch
    from helpers import memory_meta
    from lm_eval.api.instance import Instance

    from mlpmem.lm_eval_backend import MLPMemoryLM
    from mlpmem.memory import MemoryConfig, MLPMemory, save_memory
    from mlpmem.models import load_model, logits_size
    from mlpmem.rag import SharedContextLM, plain_hflm

    lm, tok, model_id = load_model(str(tiny_llama))
    torch.manual_seed(2)
    mem = MLPMemory(MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1, zero_init_blocks=False))
    mem.head.weight.data.normal_(0.0, 0.5)
    save_memory(tmp_path / "memory", mem, memory_meta(model_id, tok, 1, "ffn_input"))
    pairs = [
        ("the union of", " the states"),
        ("the union of", " a"),
        ("the union of", " many more of them"),
        ("a slowly moving mass", " of ice"),
        ("", " glacier ice"),
        ("Question: which?\nAnswer:", " b"),
    ]
    for hflm in (
        plain_hflm(str(tiny_llama), device="cpu", batch_size=4),
        MLPMemoryLM(memory=str(tmp_path / "memory"), lambda_=0.5, device="cpu", batch_size=4, shared_context=False),
    ):
        want = hflm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
        got = SharedContextLM(hflm).loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
        assert [g for _, g in got] == [g for _, g in want]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
        assert len({lp for lp, _ in got}) == len(pairs)  # distinct numbers: a mix-up of rows would show


def test_missing_bm25s_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bm25s", None)  # as if the rag extra were not installed
    with pytest.raises(MlpmemError, match="needs the bm25s package") as e:
        BM25Retriever(DOCS)
    assert "mlpmem[rag]" in str(e.value)
