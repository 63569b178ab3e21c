import json

import numpy as np
import pytest
from helpers import tiny_recipe

from mlpmem.cli import main as cli_main
from mlpmem.errors import MlpmemError
from mlpmem.interpolate import fit_mixture_em
from mlpmem.pipeline import load_recipe, run_pipeline

REPORT_KEYS = {
    "model",
    "corpus",
    "n_train_tokens",
    "n_test_tokens",
    "ppl",
    "lambda",
    "knn_temperature",
    "tokens_per_s",
    "memory_params",
    "base_params",
}


def test_recipe_runs_end_to_end_and_skips_finished_stages(tmp_path, tiny_llama, tiny_corpus_file, monkeypatch):
    import mlpmem.evaluate as ev
    import mlpmem.interpolate as ip

    fitted = []  # the number of positions every lambda and temperature was fitted on
    real_fit, real_tune = ip.fit_lambda_em, ev.tune_knn_for
    monkeypatch.setattr(ip, "fit_lambda_em", lambda x, y, *a, **k: fitted.append(len(x)) or real_fit(x, y, *a, **k))
    monkeypatch.setattr(ip, "fit_mixture_em", lambda lps, *a, **k: fitted.append(len(lps[0])) or fit_mixture_em(lps, *a, **k))
    monkeypatch.setattr(ev, "tune_knn_for", lambda cfg, valid: fitted.append(valid.n) or real_tune(cfg, valid))
    # no train.init: the default start (lm_copy, on the last layer's output) at every entry point
    r = run_pipeline(load_recipe(tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file)))
    n_valid = r["n_valid_tokens"] - 1
    assert n_valid != r["n_test_tokens"] - 1  # sizes tell the splits apart
    assert fitted and set(fitted) == {n_valid}, (fitted, n_valid)  # T and every lambda come from valid only
    assert REPORT_KEYS <= set(r)
    assert set(r["ppl"]) >= {"base", "knn_lm", "mlp_memory"}
    assert set(r["tokens_per_s"]) >= {"base", "knn_lm", "mlp_memory"}
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["ppl"] == r["ppl"]
    assert (tmp_path / "run" / "report.md").exists() and (tmp_path / "run" / "lambda_curves.png").exists()
    # the memory learned the retriever (held-out KL to kNN targets and CE fell from its start, a copy of the
    # LM's head path), and on test the mixture beats the LM: a useless memory would get lambda ~ 0 and tie
    start, end = r["train"]["valid_start"], r["train"]["valid"]
    assert end["kl"] < 0.95 * start["kl"] and end["ce"] < start["ce"], (start, end)
    assert r["train"]["worse_than_start"] is False and on_disk["train"]["worse_than_start"] is False
    assert r["memory_input"]["site"] == "output"
    assert r["ppl"]["mlp_memory"] < 0.99 * r["ppl"]["base"] and r["lambda"]["mlp_memory"] > 0.05
    assert r["n_test_tokens"] - 1 == r["n_scored_tokens"]  # every method over the same test positions
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.npy")}
    # `mlpmem run` calls the stages' build functions through the stage registry (mlpmem.stages)
    from mlpmem import stages

    called, spies = [], {}
    for st in stages.STAGES:
        spies[st.name] = (lambda real, name: lambda *a, **k: called.append(name) or real(*a, **k))(st.build_fn(), st.name)
    monkeypatch.setattr(stages.Stage, "build_fn", lambda st: spies[st.name])
    r2 = run_pipeline(load_recipe(tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file)))
    assert sorted(set(called)) == ["corpus", "datastore", "index", "targets", "train"], called
    assert r2["ppl"]["base"] == r["ppl"]["base"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rebuilt
    # `mlpmem train` (its default init, lm_copy) reads what `mlpmem run` trained on: the last layer's output, not the kNN key
    run = tmp_path / "run"
    assert (
        cli_main(
            [
                "train",
                "--datastore",
                str(run / "datastore"),
                "--targets",
                str(run / "targets"),
                "--out",
                str(tmp_path / "cli"),
                "--n-blocks",
                "1",
                "--epochs",
                "0.2",
                "--batch-size",
                "256",
                "--eval-every",
                "0",
                "--ckpt-every",
                "0",
            ]
        )
        == 0
    )
    meta = lambda d: json.loads((d / "memory" / "memory_config.json").read_text())["meta"]  # noqa: E731
    cli, piped = meta(tmp_path / "cli"), meta(run / "train")
    assert (cli["layer"], cli["site"]) == (piped["layer"], piped["site"]) and cli["site"] == "output"
    assert json.loads((tmp_path / "cli" / "memory" / "memory_config.json").read_text())["config"]["init"] == "lm_copy"


def test_recipe_problems_are_reported_together(tmp_path):
    bad = {"out": str(tmp_path), "corpus": {"sorce": "x", "train_tokens": "many"}, "train": {"lr": "fast"}, "extra": 1, "targets": {"k": 3}}
    with pytest.raises(MlpmemError) as e:
        load_recipe(bad)
    msg = str(e.value)
    for part in ("corpus.sorce", "corpus.train_tokens", "train.lr", "extra", "targets.k"):
        assert part in msg


def test_knn_tuning_cache_follows_its_inputs(tmp_path):
    """The cached T/lambda are reused only while config and every input manifest are unchanged."""
    from mlpmem.evaluate import KnnConfig, Scored
    from mlpmem.evaluate import tune_knn_cached

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 50)
    sc = Scored(
        labels=labels,
        lm_logprob=np.log(rng.uniform(0.1, 0.5, 50)),
        knn_dists=np.sort(rng.random((50, 4)), 1).astype(np.float32),
        knn_values=np.where(rng.random((50, 4)) < 0.5, labels[:, None], 0).astype(np.int32),
    )
    calls = []
    score = lambda: calls.append(1) or sc  # noqa: E731
    ins = {}
    for name in ("corpus", "index"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text('{"shards": [1, 2]}')
        ins[name] = tmp_path / name
    cfg = KnnConfig(temperatures=[1.0, 2.0])
    first = tune_knn_cached(tmp_path / "knn.json", cfg, score, ins)
    assert tune_knn_cached(tmp_path / "knn.json", cfg, score, ins) == first and len(calls) == 1
    (tmp_path / "index" / "manifest.json").write_text('{"shards": [1, 3]}')  # a later shard changed
    tune_knn_cached(tmp_path / "knn.json", cfg, score, ins)
    tune_knn_cached(tmp_path / "knn.json", KnnConfig(temperatures=[1.0, 4.0]), score, ins)
    assert len(calls) == 3


def test_report_says_when_the_memory_ended_worse_than_it_started():
    from mlpmem.pipeline import render_report

    r = {
        "model": "m",
        "corpus": "c",
        "n_train_tokens": 10,
        "n_test_tokens": 5,
        "k": 4,
        "knn_temperature": 1.0,
        "memory_params": 1e6,
        "base_params": 1e8,
        "memory_input": {"layer": 1, "site": "output"},
        "ppl": {"base": 10.0, "mlp_memory": 10.0},
        "tokens_per_s": {},
        "lambda": {"knn_lm": 0.1, "mlp_memory": 0.0},
        "train": {
            "valid_start": {"kl": 1.0, "ce": 2.0, "ppl_memory": 7.4},
            "valid": {"kl": 0.5, "ce": 1.9, "ppl_memory": 6.7},
            "worse_than_start": False,
        },
    }
    assert "1.000 -> 0.500" in render_report(r) and "7.400 -> 6.700" in render_report(r) and "ended worse" not in render_report(r)
    r["train"]["worse_than_start"] = True
    assert "WARNING: the memory ended worse than it started" in render_report(r)


def test_a_recipe_without_train_init_gets_lm_copy():
    """The best measured start is the default of a user's recipe, as of the built-in one and `run --corpus`; plain on request."""
    from mlpmem.pipeline import quick_recipe

    assert load_recipe({"out": "x", "corpus": {"source": "builtin:sotu"}}, check_paths=False).sections["train"].init == "lm_copy"
    assert quick_recipe("builtin:sotu", "smollm2-135m", "x").sections["train"].init == "lm_copy"
    assert (
        load_recipe({"out": "x", "corpus": {"source": "builtin:sotu"}, "train": {"init": "plain"}}, check_paths=False)
        .sections["train"]
        .init
        == "plain"
    )


def test_the_smallest_store_keeps_codes_values_and_targets_only(tmp_path, tiny_llama, tiny_corpus_file):
    """train.mode online: the memory's input (the last layer's output for lm_copy) is recomputed, so the
    datastore stores no second feature array; with an index that searches its codes (rerank: false) and
    index.keep_keys: false, the keys go too once the memory is trained. The run still scores kNN-LM and
    the memory, and a rerun finds every stage done."""
    recipe = tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file, init="lm_copy", input_site="output", mode="online")
    with pytest.raises(MlpmemError, match="index.keep_keys"):  # an index that re-ranks needs them
        load_recipe({**recipe, "index": {"kind": "IVF4,PQ8", "keep_keys": False}})
    recipe["index"] = {"kind": "IVF4,PQ8", "rerank": False, "keep_keys": False}
    r = run_pipeline(load_recipe(recipe))
    ds_dir = tmp_path / "run" / "datastore"
    ds = json.loads((ds_dir / "manifest.json").read_text())
    assert list(ds["features"]) == ["keys"] and not list(ds_dir.glob("h*.npy"))
    assert sorted(p.name.split("-")[0] for p in ds_dir.glob("*.npy")) == ["values"]  # the keys were removed
    assert list((tmp_path / "run" / "valid").glob("keys-*.npy"))  # valid's keys are queries, not the store: kept
    assert r["memory_input"]["site"] == "output" and r["ppl"]["mlp_memory"] < r["ppl"]["base"]
    assert np.isfinite(r["ppl"]["knn_lm"])
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.npy")}
    again = run_pipeline(load_recipe(recipe))  # finished stages stay done without the keys
    assert again["ppl"]["knn_lm"] == pytest.approx(r["ppl"]["knn_lm"], rel=1e-6)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_dotted_overrides_change_one_setting_each(tmp_path, capsys):
    r = load_recipe(
        "sotu", check_paths=False, overrides=["train.epochs=3", "datastore.batch_tokens=4096", "device=cpu", "knn.temperatures=[1, 2]"]
    )
    assert r.sections["train"].epochs == 3 and r.sections["datastore"].batch_tokens == 4096 and r.device == "cpu"
    assert r.sections["knn"].temperatures == [1, 2] and r.sections["train"].init == "lm_copy"  # the rest of the recipe stays
    with pytest.raises(MlpmemError, match="SECTION.KEY=VALUE"):
        load_recipe("sotu", check_paths=False, overrides=["train.epochs"])
    with pytest.raises(MlpmemError, match="epoch"):  # a misspelt key is one of the recipe's problems, named
        load_recipe("sotu", check_paths=False, overrides=["train.epoch=3"])
    # on the command line: the overrides follow the recipe (a missing corpus file stops it before any stage)
    rc = cli_main(["run", "sotu", "corpus.source=" + str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the tests above can fail
# each runs against a deliberately broken implementation and must go red (a test that passes whatever
# the code does is a defect): one thing broken at a time


def _negate_loss(monkeypatch):
    import mlpmem.train.loop as train  # the loop calls the loss

    real = train.sparse_kd_loss

    def negated(*args):
        loss, parts = real(*args)
        return -loss, parts

    monkeypatch.setattr(train, "sparse_kd_loss", negated)


def _valid_is_really_test(monkeypatch, corpus_dir_of):
    """Where valid is asked for, score the test split instead (lambda and T tuned on test)."""
    import mlpmem.evaluate as ev

    real = ev.score_online

    def swapped(model, tokens, *args, **kw):
        if "valid" in kw.get("desc", ""):
            from mlpmem.corpus import Corpus

            tokens = Corpus(corpus_dir_of()).tokens("test")
        return real(model, tokens, *args, **kw)

    monkeypatch.setattr(ev, "score_online", swapped)


def test_pipeline_test_catches_a_memory_that_learned_nothing(tmp_path, tiny_llama, tiny_corpus_file, monkeypatch):
    _negate_loss(monkeypatch)
    with pytest.raises(AssertionError):
        test_recipe_runs_end_to_end_and_skips_finished_stages(tmp_path, tiny_llama, tiny_corpus_file, monkeypatch)


def test_pipeline_test_catches_tuning_on_test(tmp_path, tiny_llama, tiny_corpus_file, monkeypatch):
    _valid_is_really_test(monkeypatch, lambda: tmp_path / "run" / "corpus")
    with pytest.raises(AssertionError):
        test_recipe_runs_end_to_end_and_skips_finished_stages(tmp_path, tiny_llama, tiny_corpus_file, monkeypatch)


def test_overwrite_removes_a_gate_the_new_run_does_not_fit(tmp_path, tiny_llama, tiny_corpus_file):
    """A run that fitted a gate, rerun with --overwrite and fixed mixing: the old gate (fitted for the replaced memory)
    goes, so the new memory loads; without its removal every load would be refused as a gate for another memory."""
    from mlpmem.transformers_integration import MLPMemoryForCausalLM

    recipe = tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file)
    run_pipeline(load_recipe({**recipe, "eval": {"mixing": "gated"}}))
    assert (tmp_path / "run" / "gate" / "gate_config.json").exists()
    run_pipeline(load_recipe({**recipe, "train": {**recipe["train"], "lr": 3e-3}}), overwrite=True)
    assert not (tmp_path / "run" / "gate" / "gate_config.json").exists()
    assert MLPMemoryForCausalLM.from_memory(tmp_path / "run" / "train" / "memory").mixing_mode == "fixed"


@pytest.mark.parametrize("valid_tokens, mixing, need", [(3, "fixed", 32), (120, "gated", 257)])
def test_a_valid_split_too_small_to_fit_on_is_refused_before_the_datastore(
    tmp_path, tiny_llama, tiny_corpus_file, valid_tokens, mixing, need
):
    """A 3-token valid split gave a report with kNN-LM perplexity inf and exit 0: now the run stops after the corpus, naming
    the minimum, and builds no datastore."""
    recipe = tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file)
    recipe["corpus"]["valid_tokens"] = valid_tokens
    recipe["eval"] = {"mixing": mixing}
    with pytest.raises(MlpmemError, match=f"needs at least {need}"):
        run_pipeline(load_recipe(recipe))
    assert not (tmp_path / "run" / "datastore").exists()
