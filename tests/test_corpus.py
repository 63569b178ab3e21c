import json

import numpy as np
import pytest

from mlpmem.corpus import Corpus, CorpusConfig, Document, build_corpus, load_documents, split_documents, window_batches, windows
from mlpmem.errors import MlpmemError


def test_split_is_deterministic_and_disjoint():
    docs = [Document(f"d{i}", f"text {i}") for i in range(50)]
    a = split_documents(docs, 0.1, 0.2, seed=3)
    b = split_documents(list(docs), 0.1, 0.2, seed=3)
    assert a == b
    allidx = a["train"] + a["valid"] + a["test"]
    assert sorted(allidx) == list(range(50))  # every document once, none in two splits
    assert len(a["test"]) == 10 and len(a["valid"]) == 5
    assert split_documents(docs, 0.1, 0.2, seed=4) != a
    # a document's split does not depend on the others: dropping one keeps the rest in place
    c = split_documents(docs[1:] + [Document("new", "x")], 0.1, 0.2, seed=3)
    moved = {docs[i].id for i in a["test"]} ^ {(docs[1:] + [Document("new", "x")])[i].id for i in c["test"]}
    assert len(moved) <= 4


@pytest.mark.parametrize("n,c,s", [(10, 4, 2), (100, 16, 8), (100, 16, 16), (17, 16, 5), (3, 8, 4), (2, 4, 1), (1000, 64, 48)])
def test_windows_predict_every_position_once(n, c, s):
    W = windows(n, c, s)
    kept = np.concatenate([np.arange(k, min(e, n - 1)) for b, e, k in W])
    assert np.array_equal(kept, np.arange(n - 1))
    assert np.all(W[:, 1] - W[:, 0] <= c)
    assert np.all(W[:, 2] >= W[:, 0])
    # context of every kept position after the first window is at least c - s
    for b, e, k in W[1:]:
        assert k - b >= c - s


def test_windows_rejects_bad_stride():
    with pytest.raises(MlpmemError):
        windows(10, 4, 5)


def test_documents_from_txt_rules(tmp_path):
    (tmp_path / "a.txt").write_text("one block\n\nsecond block\n\n\nthird")
    (tmp_path / "b.txt").write_text("other file")
    assert len(load_documents(CorpusConfig(source=str(tmp_path)))) == 2
    assert len(load_documents(CorpusConfig(source=str(tmp_path), txt_documents="blank_line"))) == 4


def test_documents_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a b c", "d e", None, "f"]}), tmp_path / "x.parquet")
    docs = load_documents(CorpusConfig(source=str(tmp_path / "x.parquet"), text_field="body"))
    assert [d.text for d in docs] == ["a b c", "d e", "f"]


def test_builtin_corpus_loads():
    docs = load_documents(CorpusConfig())
    assert len(docs) == 233 and "Fellow-Citizens" in docs[0].text


@pytest.mark.parametrize(
    "content,expect",
    [
        (None, "does not exist"),
        ("", "empty"),
        ("\n\n", "empty"),
        ('{"txt": "x"}\n', "no string field 'text'"),
        ("not json\n", "not valid JSON"),
    ],
)
def test_bad_corpus_gives_clear_error(tmp_path, content, expect):
    path = tmp_path / "c.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MlpmemError, match=expect):
        load_documents(CorpusConfig(source=str(path)))


def test_unreadable_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(MlpmemError, match="UTF-8"):
        load_documents(CorpusConfig(source=str(path)))


def test_build_corpus_streams(tmp_path, tiny_llama, tiny_corpus_file):
    from transformers import AutoTokenizer

    out = build_corpus(tmp_path / "corpus", CorpusConfig(source=str(tiny_corpus_file), model=str(tiny_llama), train_tokens=1500))
    c = Corpus(out)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    train = c.tokens("train")
    assert len(train) == 1500
    assert (train == tok.eos_token_id).sum() >= 1  # documents separated
    doc = c.doc_index("train")
    assert np.all(np.diff(doc) >= 0)
    docs = json.loads((out / "documents.json").read_text())
    ids = {s: {d["id"] for d in docs[s]} for s in docs}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["valid"]) and not (ids["valid"] & ids["test"])
    # a second build with the same config is a no-op; a different config is refused
    assert build_corpus(out, CorpusConfig(source=str(tiny_corpus_file), model=str(tiny_llama), train_tokens=1500)) == out
    with pytest.raises(MlpmemError, match="different configuration"):
        build_corpus(out, CorpusConfig(source=str(tiny_corpus_file), model=str(tiny_llama), train_tokens=400))


def test_single_document_needs_more(tmp_path, tiny_llama):
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(MlpmemError, match="blank_line"):
        build_corpus(tmp_path / "out", CorpusConfig(source=str(tmp_path / "one.txt"), model=str(tiny_llama)))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_duplicates_dropped_first_kept_and_counted():
    from mlpmem.corpus import drop_duplicates

    docs = [Document("a", "x"), Document("b", "y"), Document("c", "x"), Document("d", "x ")]
    kept, n = drop_duplicates(docs)
    assert [d.id for d in kept] == ["a", "b", "d"] and n == 1  # exact text: "x " is another text


def test_corpus_built_before_dedup_is_refused_when_the_source_has_duplicates(tmp_path, tiny_llama):
    from helpers import make_texts

    texts = make_texts(6, 40)
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + [texts[0]]))
    cfg = CorpusConfig(source=str(src), model=str(tiny_llama))
    out = build_corpus(tmp_path / "c", cfg)
    m = json.loads((out / "manifest.json").read_text())
    del m["n_duplicates_dropped"]  # as an older version wrote it
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MlpmemError, match="before duplicates were removed.*--overwrite"):
        build_corpus(out, cfg)
    assert build_corpus(out, cfg, overwrite=True) == out


def test_window_batches_cover_every_window_once_in_equal_length_batches():
    W = windows(1000, 64, 48)  # the last windows are shorter
    batches = list(window_batches(W, 4))
    assert np.array_equal(np.concatenate(batches), W)
    for g in batches:
        assert 1 <= len(g) <= 4 and len(set((g[:, 1] - g[:, 0]).tolist())) == 1
    for a, b in zip(batches, batches[1:]):  # a batch ends only when full or when the length changes
        assert len(a) == 4 or (a[0, 1] - a[0, 0]) != (b[0, 1] - b[0, 0])
    assert len(batches) < len(W)
