"""KNNRetriever: kNN-LM as a component, against a naive loop and against the evaluator's kNN-LM perplexity."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from mlpmem.corpus import Corpus, CorpusConfig, build_corpus, windows
from mlpmem.datastore import DatastoreConfig, build_datastore
from mlpmem.errors import MlpmemError
from mlpmem.evaluate import KnnConfig, score_online
from mlpmem.interpolate import interpolate_logprobs
from mlpmem.index import IndexConfig, KnnIndex, build_index
from mlpmem.interpolate import perplexity
from mlpmem.modeling.read_site import ReadSite, capture
from mlpmem.models import load_model
from mlpmem.evaluate import tune_knn_cached
from mlpmem.retrieval import REFERENCE_FILE, KNNRetriever, knn_component, knn_logprobs
from mlpmem.datastore import Datastore

C, S, K = 32, 16, 8


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    """A run folder as the pipeline lays it out (corpus, datastore, index, knn.json), built by the stage functions."""
    from helpers import make_texts

    root = tmp_path_factory.mktemp("retrieval")
    out = root / "run"
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(n_docs=16, words_per_doc=60)))
    build_corpus(out / "corpus", CorpusConfig(source=str(src), model=str(tiny_llama), valid_fraction=0.25, test_fraction=0.25))
    cfg = DatastoreConfig(model=str(tiny_llama), context=C, stride=S, batch_size=4)
    build_datastore(out / "corpus", out / "datastore", cfg)
    build_datastore(out / "corpus", out / "valid", DatastoreConfig(**{**cfg.__dict__, "split": "valid"}))
    build_index(out / "datastore", out / "index", IndexConfig(kind="flat"))
    model, tok, _ = load_model(str(tiny_llama))
    ds = Datastore(out / "datastore")
    index = KnnIndex.open(out / "index", ds)
    corpus = Corpus(out / "corpus")
    key = ReadSite(ds.layer, ds.site)
    score = lambda: score_online(model, corpus.tokens("valid"), C, S, key, index, ds.values(), K)  # noqa: E731
    tune_knn_cached(
        out / "knn.json", KnnConfig(k=K, temperatures=[0.5, 2.0, 8.0]), score, {"corpus": out / "corpus", "index": out / "index"}
    )
    return {"out": out, "model": model, "tok": tok, "ds": ds, "index": index, "corpus": corpus, "key": key}


def naive_knn_logprobs(train_keys: np.ndarray, train_values: np.ndarray, queries: np.ndarray, k: int, T: float, V: int) -> np.ndarray:
    """Exact search in float64, softmax(-d / T) over the k nearest, scatter-add by value: a loop per query and neighbour."""
    keys = train_keys.astype(np.float64)
    out = np.zeros((len(queries), V))
    for i, q in enumerate(queries.astype(np.float64)):
        d = ((keys - q) ** 2).sum(1)
        nn = np.argsort(d, kind="stable")[:k]
        w = np.exp(-(d[nn] - d[nn].min()) / T)
        w /= w.sum()
        for j, wj in zip(nn, w):
            out[i, train_values[j]] += wj
    with np.errstate(divide="ignore"):
        return np.log(out)


def test_logprobs_equal_the_naive_reference(run):
    r = KNNRetriever.from_run(run["out"])
    ds = run["ds"]
    q = Datastore(run["out"] / "valid").rows("keys", 0, 24).astype(np.float32)
    got = r(torch.from_numpy(q).reshape(4, 6, -1))  # any leading shape
    assert got.shape == (4, 6, ds.vocab_size) and got.dtype == torch.float32
    got = got.reshape(24, -1).double().numpy()
    ref = naive_knn_logprobs(ds.load("keys"), ds.values(), q, r.k, r.temperature, ds.vocab_size)
    np.testing.assert_allclose(np.exp(got), np.exp(ref), rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.isneginf(got), np.isneginf(ref))  # tokens no neighbour has: log 0, exactly
    np.testing.assert_allclose(np.exp(got).sum(1), 1.0, atol=1e-5)


def test_knn_logprobs_missing_hits_and_empty_rows():
    d = np.array([[1.0, 2.0, np.inf], [np.inf, np.inf, np.inf]], dtype=np.float32)
    v = np.array([[3, 3, -1], [-1, -1, -1]], dtype=np.int32)
    lp = knn_logprobs(d, v, 1.0, 5)
    assert lp[0, 3].item() == pytest.approx(0.0, abs=1e-6)  # both neighbours say token 3
    assert torch.isneginf(lp[0, [0, 1, 2, 4]]).all() and torch.isneginf(lp[1]).all()
    # mixing: -inf never gives NaN, and tokens without a neighbour keep the LM's share
    lm = torch.log_softmax(torch.randn(2, 5), -1)
    mixed = interpolate_logprobs(lm, lp, 0.3)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[1], lm[1] + math.log(0.7))
    # a row with no neighbour at all keeps only the LM's 1 - lambda (generation renormalises it: the LM decodes)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.tensor([1.0, 0.7]))


def _model_path_ppl(model, retriever: KNNRetriever, tokens: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
    """LM + retriever over full vocabulary rows, as the model class mixes them: hook at the datastore's site, windows of C/S."""
    lps = []
    for begin, end, keep in windows(len(tokens), C, S):
        ids = torch.from_numpy(tokens[begin:end].astype(np.int64))[None]
        site = ReadSite(retriever.meta["layer"], retriever.meta["site"])
        with torch.no_grad(), capture(model, [site]) as store:
            logits = model(input_ids=ids).logits[0].float()
        stop = min(end, len(tokens) - 1)
        rows = slice(keep - begin, stop - begin)
        mixed = interpolate_logprobs(torch.log_softmax(logits[rows], -1), retriever(store[site][0, rows]), lam)
        lps.append(mixed.gather(-1, torch.from_numpy(tokens[keep + 1 : stop + 1].astype(np.int64))[:, None])[:, 0].double().numpy())
    lp = np.concatenate(lps)
    return perplexity(lp), lp


def test_mixed_with_the_lm_gives_the_evaluators_knn_lm_perplexity(run):
    r = KNNRetriever.from_run(run["out"])
    lam = r.meta["lambda"]
    assert 0 < lam < 1
    tokens = run["corpus"].tokens("test")
    sc = score_online(run["model"], tokens, C, S, run["key"], run["index"], run["ds"].values(), K)
    ev_lp = interpolate_logprobs(sc.lm_logprob, sc.knn_logprob(r.temperature), lam)
    ppl, lp = _model_path_ppl(run["model"], r, tokens, lam)
    assert len(lp) == sc.n
    np.testing.assert_allclose(lp, ev_lp, rtol=1e-4, atol=1e-4)
    assert ppl == pytest.approx(perplexity(ev_lp), rel=1e-4)
    assert ppl != pytest.approx(perplexity(sc.lm_logprob), rel=1e-3)  # the kNN part moved it: the comparison can fail


def test_from_run_reads_the_runs_choices_and_explicit_args_win(run):
    knn = json.loads((run["out"] / "knn.json").read_text())
    r = KNNRetriever.from_run(run["out"])
    assert (r.k, r.temperature, r.meta["lambda"]) == (K, knn["temperature"], knn["lambda"])
    assert r.meta["settings_from"] == "knn.json"
    assert {"layer", "site", "tokenizer_hash", "model_id", "index_kind", "datastore", "k", "temperature"} <= set(r.meta)
    assert r.meta["layer"] == run["ds"].layer and r.meta["site"] == run["ds"].site and r.meta["index_kind"] == "Flat"
    r2 = KNNRetriever.from_run(run["out"], k=3, temperature=0.75)
    assert (r2.k, r2.temperature) == (3, 0.75)
    assert r.returns_logprobs and r.num_parameters() == 0 and not list(r.parameters()) and r.state_dict() == {}


def test_from_run_falls_back_to_the_report(run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("datastore", "index"):
        (out / name).symlink_to(run["out"] / name)
    (out / "report.json").write_text(json.dumps({"knn_temperature": 4.0, "k": 5, "lambda": {"knn_lm": 0.2}}))
    r = KNNRetriever.from_run(out)
    assert (r.k, r.temperature, r.meta["lambda"], r.meta["settings_from"]) == (5, 4.0, 0.2, "report.json")


def test_save_keeps_a_reference_and_load_refuses_changed_folders(run, tmp_path):
    copy = tmp_path / "run"
    for name in ("datastore", "index"):
        shutil.copytree(run["out"] / name, copy / name)
    shutil.copy(run["out"] / "knn.json", copy / "knn.json")
    r = KNNRetriever.from_run(copy)
    path = r.save(tmp_path / "saved")
    assert path.name == REFERENCE_FILE and sorted(p.name for p in path.parent.iterdir()) == [REFERENCE_FILE]  # no weights
    back = KNNRetriever.load(tmp_path / "saved")
    assert (back.k, back.temperature, back.meta["lambda"]) == (r.k, r.temperature, r.meta["lambda"])
    h = torch.from_numpy(Datastore(run["out"] / "valid").rows("keys", 0, 5).astype(np.float32))
    torch.testing.assert_close(back(h), r(h))
    manifest = copy / "index" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"Flat"', '"Flat" '))
    with pytest.raises(MlpmemError, match="changed since"):
        KNNRetriever.load(tmp_path / "saved")


@pytest.mark.parametrize("missing", ["index", "datastore"])
def test_run_folder_without_index_or_datastore_is_refused(run, tmp_path, missing):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(run["out"] / "knn.json", out / "knn.json")
    for name in ("datastore", "index"):
        if name != missing:
            (out / name).symlink_to(run["out"] / name)
    with pytest.raises(MlpmemError, match=f"no finished kNN {missing}"):
        KNNRetriever.from_run(out)
    with pytest.raises(MlpmemError, match="does not exist"):
        KNNRetriever.from_run(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "bad", [{"k": 0}, {"k": -3}, {"k": True}, {"k": 10**9}, {"temperature": 0.0}, {"temperature": -1.0}, {"temperature": float("nan")}]
)
def test_bad_k_or_temperature_is_refused(run, bad):
    with pytest.raises(MlpmemError):
        KNNRetriever.from_run(run["out"], **bad)


def test_hidden_size_other_than_the_index_is_refused(run, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    r = KNNRetriever.from_run(run["out"])
    with pytest.raises(MlpmemError, match="32-dim keys"):
        r(torch.zeros(2, r.d + 1))
    wide = AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=run["ds"].vocab_size,
        )
    )
    with pytest.raises(MlpmemError, match="hidden size 48"):
        knn_component(run["out"], wide)


def test_tokenizer_other_than_the_datastores_is_refused(run, tiny_llama):
    from transformers import AutoTokenizer

    r = knn_component(run["out"], run["model"], run["tok"])  # the datastore's own model and tokenizer pass
    assert r.k == K
    other = AutoTokenizer.from_pretrained(str(tiny_llama))
    other.add_tokens(["<another-token>"])
    with pytest.raises(MlpmemError, match="tokenizer"):
        knn_component(run["out"], run["model"], other)
    with pytest.raises(MlpmemError, match="tokenizer"):
        knn_component(run["out"], tokenizer=other)


def test_lm_with_other_weights_is_refused(run):
    from transformers import AutoModelForCausalLM

    assert run["ds"].manifest.get("model_fingerprint")  # this datastore records its model's weights
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(run["model"].config)  # same sizes and tokenizer, other weights
    with pytest.raises(MlpmemError, match="other weights"):
        knn_component(run["out"], other, run["tok"])
