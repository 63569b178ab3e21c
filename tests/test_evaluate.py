"""Evaluation: scoring against naive references, tuning on valid only, the same tokens for every method."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import mlpmem.evaluate as ev
from mlpmem.corpus import Corpus, CorpusConfig, build_corpus
from mlpmem.datastore import DatastoreConfig, build_datastore
from mlpmem.evaluate import KnnConfig, Scored, run_knnlm, score_online, score_stored, summarize, tune_knn
from mlpmem.index import IndexConfig, KnnIndex, build_index
from mlpmem.memory import MemoryConfig, MLPMemory
from mlpmem.models import load_model
from mlpmem.modeling.read_site import ReadSite
from mlpmem.datastore import Datastore

C, S, K = 32, 16, 8


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    """A corpus, a train datastore + Flat index and a scored valid datastore from the tiny Llama."""
    from helpers import make_texts

    root = tmp_path_factory.mktemp("ev")
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(n_docs=16, words_per_doc=60)))
    corpus = build_corpus(root / "corpus", CorpusConfig(source=str(src), model=str(tiny_llama), valid_fraction=0.25, test_fraction=0.25))
    # recompute: scoring runs every window from scratch, and stored rows are compared with scored ones below
    cfg = DatastoreConfig(model=str(tiny_llama), context=C, stride=S, batch_size=4, extra_sites=["0:output"], mode="recompute")
    build_datastore(corpus, root / "ds", cfg)
    build_datastore(corpus, root / "valid", DatastoreConfig(**{**cfg.__dict__, "split": "valid", "lm_logprob": True}))
    build_index(root / "ds", root / "ix", IndexConfig(kind="flat"))
    model = load_model(str(tiny_llama))
    return {
        "root": root,
        "corpus": corpus,
        "model": model,
        "ds": Datastore(root / "ds"),
        "valid": Datastore(root / "valid"),
        "index": KnnIndex.open(root / "ix"),
    }


def naive_lm_logprob(model, tokens: np.ndarray) -> np.ndarray:
    """Log-prob of every next token from one forward over the whole stream (it fits the model's positions)."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens.astype(np.int64))[None]).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(tokens[1:].astype(np.int64))[:, None])[:, 0].numpy()


def naive_knn(train_keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = ((queries.astype(np.float64)[:, None] - train_keys.astype(np.float64)[None]) ** 2).sum(-1)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


def test_score_online_against_naive_references(run, torch_threads):
    model = run["model"][0]
    tokens = Corpus(run["corpus"]).tokens("valid")[: C + 1]  # one window: the naive forward sees the same context
    memory = MLPMemory(MemoryConfig(d_in=32, vocab_size=model.config.vocab_size, n_blocks=1)).eval()
    sc = score_online(model, tokens, C, S, ReadSite(1, "ffn_input"), run["index"], run["ds"].values(), K, memory, ReadSite(0, "output"))
    assert np.array_equal(sc.labels, tokens[1:])  # every position once, in order
    np.testing.assert_allclose(sc.lm_logprob, naive_lm_logprob(model, tokens), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        from mlpmem.modeling.read_site import capture

        with capture(model, [ReadSite(1, "ffn_input"), ReadSite(0, "output")]) as got:
            model(input_ids=torch.from_numpy(tokens[:-1].astype(np.int64))[None])
        q = got[ReadSite(1, "ffn_input")][0].numpy()
        mem = torch.log_softmax(memory(got[ReadSite(0, "output")][0]).double(), -1)
    ref_d, ref_ids = naive_knn(run["ds"].load("keys"), q, K)
    np.testing.assert_allclose(sc.knn_dists, ref_d, rtol=1e-4, atol=1e-4)
    assert (sc.knn_values == run["ds"].values()[ref_ids]).mean() > 0.99  # equal up to float ties
    np.testing.assert_allclose(
        sc.memory_logprob, mem.gather(-1, torch.from_numpy(tokens[1:].astype(np.int64))[:, None])[:, 0].numpy(), rtol=1e-5, atol=1e-5
    )
    assert set(sc.seconds) == {"lm", "knn", "memory"} and all(v > 0 for v in sc.seconds.values())


def test_score_stored_agrees_with_score_online(run):
    valid = run["valid"]
    stored = score_stored(valid, run["index"], run["ds"].values(), K)
    online = score_online(
        run["model"][0], Corpus(run["corpus"]).tokens("valid"), C, S, ReadSite(1, "ffn_input"), run["index"], run["ds"].values(), K
    )
    assert np.array_equal(stored.labels, online.labels)
    np.testing.assert_allclose(stored.lm_logprob, online.lm_logprob, atol=1e-4)
    # stored keys are float16: distances agree to float16 precision, neighbours up to near-ties
    np.testing.assert_allclose(stored.knn_dists, online.knn_dists, rtol=1e-2, atol=1e-3)
    assert (stored.knn_values == online.knn_values).mean() > 0.9


def _naive_knn_ppl(sc: Scored, T: float, lam: float) -> float:
    """Perplexity of (1 - lam) p_LM + lam p_kNN with a Python loop over positions and neighbours."""
    nll = 0.0
    for i in range(sc.n):
        w = np.exp(-(sc.knn_dists[i] - sc.knn_dists[i].min()) / T)
        w /= w.sum()
        p_knn = sum(wj for wj, v in zip(w, sc.knn_values[i]) if v == sc.labels[i])
        nll -= math.log((1 - lam) * math.exp(sc.lm_logprob[i]) + lam * p_knn)
    return math.exp(nll / sc.n)


def _synthetic(n: int = 300, seed: int = 0) -> Scored:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    values = np.where(rng.random((n, 6)) < 0.5, labels[:, None], rng.integers(0, 5, (n, 6)))
    dists = np.sort(rng.gamma(2.0, 2.0, (n, 6)), axis=1).astype(np.float32)
    return Scored(labels=labels, lm_logprob=np.log(rng.uniform(0.05, 0.5, n)), knn_dists=dists, knn_values=values.astype(np.int32))


def test_tune_knn_finds_the_naive_optimum():
    sc = _synthetic()
    grid = [0.5, 2.0, 8.0]
    r = tune_knn(sc, grid)
    lams = np.linspace(0.001, 0.999, 200)
    naive = {T: min(_naive_knn_ppl(sc, T, lam) for lam in lams) for T in grid}
    assert r["temperature"] == min(naive, key=naive.get)
    assert r["valid_ppl"] == pytest.approx(naive[r["temperature"]], rel=1e-3)
    assert r["valid_ppl"] <= naive[r["temperature"]] * (1 + 1e-9)  # EM's lambda is at least as good as a grid


def test_summarize_against_naive_mixture():
    sc = _synthetic(seed=1)
    sc.memory_logprob = np.log(np.random.default_rng(2).uniform(0.01, 0.9, sc.n))
    sc.seconds = {"lm": 2.0, "knn": 1.0, "memory": 0.5}
    r = summarize(sc, 2.0, 0.3, 0.4)
    assert r["n_tokens"] == sc.n
    assert r["ppl"]["base"] == pytest.approx(math.exp(-sc.lm_logprob.mean()), rel=1e-12)
    assert r["ppl"]["knn_lm"] == pytest.approx(_naive_knn_ppl(sc, 2.0, 0.3), rel=1e-6)  # kNN weights are float32
    mem = np.log(0.6 * np.exp(sc.lm_logprob) + 0.4 * np.exp(sc.memory_logprob))
    assert r["ppl"]["mlp_memory"] == pytest.approx(math.exp(-mem.mean()), rel=1e-9)
    assert r["tokens_per_s"] == pytest.approx({"base": sc.n / 2.0, "knn_lm": sc.n / 3.0, "mlp_memory": sc.n / 2.5})
    assert r["ppl"]["memory_alone"] == pytest.approx(math.exp(-sc.memory_logprob.mean()), rel=1e-9)
    sc.memory_logprob[0] = -np.inf  # a pruned head: no mass on a token outside it; mixed, still finite
    r = summarize(sc, 2.0, 0.3, 0.4)
    assert "memory_alone" not in r["ppl"] and "memory_alone" not in r["vs_base"] and np.isfinite(r["ppl"]["mlp_memory"])
    sc.memory_logprob = sc.memory_logprob[:-1]  # a method scored over other tokens is refused
    with pytest.raises(ValueError, match="different tokens"):
        summarize(sc, 2.0, 0.3, 0.4)


def test_run_knnlm_tunes_on_valid_only(run, monkeypatch):
    seen = []
    real = ev.tune_knn_for
    monkeypatch.setattr(ev, "tune_knn_for", lambda cfg, valid: seen.append(valid) or real(cfg, valid))
    cfg = KnnConfig(k=K, temperatures=[1.0, 4.0, 16.0], batch_size=4)
    corpus = Corpus(run["corpus"])
    r_test = run_knnlm(
        run["corpus"], run["root"] / "ds", run["root"] / "ix", run["root"] / "knn_test", cfg, "test", model_bundle=run["model"]
    )
    r_valid = run_knnlm(
        run["corpus"], run["root"] / "ds", run["root"] / "ix", run["root"] / "knn_valid", cfg, "valid", model_bundle=run["model"]
    )
    # tuning saw the valid tokens both times, whatever split was scored; T and lambda do not depend on it
    assert [v.n for v in seen] == [len(corpus.tokens("valid")) - 1] * 2
    assert np.array_equal(seen[0].labels, corpus.tokens("valid")[1:])
    assert (r_test["knn_temperature"], r_test["lambda"]) == (r_valid["knn_temperature"], r_valid["lambda"])
    assert r_test["n_tokens"] == len(corpus.tokens("test")) - 1 and r_valid["n_tokens"] == len(corpus.tokens("valid")) - 1
    assert r_valid["ppl"]["knn_lm"] == pytest.approx(r_valid["tuning"]["valid_ppl"], rel=1e-9)  # same tokens, same maths
    assert (run["root"] / "knn_test" / "lambda_knnlm.png").exists()


def test_knnlm_scores_with_the_datastores_prefix(run, tmp_path, monkeypatch):
    """A datastore built with <bos> before every window (datastore.bos) is searched with keys extracted the same way:
    run_knnlm passes its recorded prefix to the scoring, and the LM's log-probs then equal a prefixed scoring."""
    import copy

    model, tok, model_id = run["model"]
    tok = copy.deepcopy(tok)
    tok.bos_token = "<eos>"
    cfg = DatastoreConfig(model=model_id, context=C, stride=S, batch_size=4, bos=True)
    build_datastore(run["corpus"], tmp_path / "ds", cfg, (model, tok, model_id))
    build_index(tmp_path / "ds", tmp_path / "ix", IndexConfig(kind="flat"))
    seen = []
    real = ev.score_online
    monkeypatch.setattr(ev, "score_online", lambda *a, **k: seen.append(k.get("prefix")) or real(*a, **k))
    r = run_knnlm(
        run["corpus"],
        tmp_path / "ds",
        tmp_path / "ix",
        tmp_path / "knn",
        KnnConfig(k=8, temperatures=[1.0]),
        "test",
        model_bundle=(model, tok, model_id),
    )
    assert seen == [(tok.bos_token_id,)] * 2
    tokens = Corpus(run["corpus"]).tokens("test")
    plain = real(model, tokens, C, S, None)
    prefixed = real(model, tokens, C, S, None, prefix=(tok.bos_token_id,))
    assert r["ppl"]["base"] == pytest.approx(float(np.exp(-prefixed.lm_logprob.mean())), rel=1e-6)
    assert not np.allclose(plain.lm_logprob, prefixed.lm_logprob)


# ---------------------------------------------------------------- the tests above can fail
# each runs against a deliberately broken implementation and must go red (a test that passes whatever
# the code does is a defect): one thing broken at a time


def test_knnlm_test_catches_tuning_on_the_scored_split(run, monkeypatch):
    real = ev.score_online

    def valid_is_test(model, tokens, *args, **kw):
        if kw.get("desc") == "scoring valid":
            from mlpmem.corpus import Corpus

            tokens = Corpus(run["corpus"]).tokens("test")
        return real(model, tokens, *args, **kw)

    monkeypatch.setattr(ev, "score_online", valid_is_test)
    with pytest.raises(AssertionError):
        test_run_knnlm_tunes_on_valid_only(run, monkeypatch)


def test_summarize_test_catches_a_wrong_lambda(monkeypatch):
    real = ev.interpolate_logprobs
    monkeypatch.setattr(ev, "interpolate_logprobs", lambda lp, other, lam: real(lp, other, min(1.0, lam * 1.01)))
    with pytest.raises(AssertionError):
        test_summarize_against_naive_mixture()


def test_scoring_test_catches_labels_shifted_by_one(run, monkeypatch):
    real = ev.iter_batches

    def shifted(*args, **kw):
        for b in real(*args, **kw):
            b.labels = np.roll(b.labels, 1)
            yield b

    monkeypatch.setattr(ev, "iter_batches", shifted)
    with pytest.raises(AssertionError):
        test_score_online_against_naive_references(run, 1)
