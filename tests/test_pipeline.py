import json

import pytest

from mlpmem.cli import main as cli_main
from mlpmem.errors import MlpmemError
from mlpmem.pipeline import load_recipe, run_pipeline

REPORT_KEYS = {"model", "corpus", "n_train_tokens", "n_test_tokens", "ppl", "lambda", "knn_temperature", "tokens_per_s", "memory_params", "base_params"}


def tiny_recipe(tmp_path, model, corpus, **train):
    return {
        "out": str(tmp_path / "run"), "model": str(model),
        "corpus": {"source": str(corpus), "valid_fraction": 0.2, "test_fraction": 0.2, "train_tokens": 2000, "valid_tokens": 400, "test_tokens": 400},
        "datastore": {"context": 64, "stride": 32, "batch_size": 4},
        "knn": {"k": 32, "temperatures": [1.0, 4.0]},
        "targets": {"top_m": 16},
        "train": {"n_blocks": 1, "epochs": 1.0, "batch_size": 256, "eval_every": 0, "ckpt_every": 0, **train},
    }


def test_recipe_runs_end_to_end_and_skips_finished_stages(tmp_path, tiny_llama, tiny_corpus_file):
    r = run_pipeline(load_recipe(tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file, init="lm_copy", input_site="output")))
    assert REPORT_KEYS <= set(r)
    assert set(r["ppl"]) >= {"base", "knn_lm", "mlp_memory"}
    assert set(r["tokens_per_s"]) >= {"base", "knn_lm", "mlp_memory"}
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["ppl"] == r["ppl"]
    assert (tmp_path / "run" / "report.md").exists() and (tmp_path / "run" / "lambda_curves.png").exists()
    # an interpolation with a tuned lambda never does worse than lambda=0 on valid, so on test it stays close to base
    assert r["ppl"]["mlp_memory"] < r["ppl"]["base"] * 1.05
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.npy")}
    r2 = run_pipeline(load_recipe(tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file, init="lm_copy", input_site="output")))
    assert r2["ppl"]["base"] == r["ppl"]["base"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rebuilt
    # `mlpmem train --init lm_copy` reads what `mlpmem run` trained on: the last layer's output, not the kNN key
    run = tmp_path / "run"
    assert cli_main(["train", "--datastore", str(run / "datastore"), "--targets", str(run / "targets"), "--out", str(tmp_path / "cli"),
                     "--init", "lm_copy", "--n-blocks", "1", "--epochs", "0.2", "--batch-size", "256", "--eval-every", "0", "--ckpt-every", "0"]) == 0
    meta = lambda d: json.loads((d / "memory" / "memory_config.json").read_text())["meta"]  # noqa: E731
    cli, piped = meta(tmp_path / "cli"), meta(run / "train")
    assert (cli["layer"], cli["site"]) == (piped["layer"], piped["site"]) and cli["site"] == "output"


def test_recipe_problems_are_reported_together(tmp_path):
    bad = {"out": str(tmp_path), "corpus": {"sorce": "x", "train_tokens": "many"}, "train": {"lr": "fast"}, "extra": 1, "targets": {"k": 3}}
    with pytest.raises(MlpmemError) as e:
        load_recipe(bad)
    msg = str(e.value)
    for part in ("corpus.sorce", "corpus.train_tokens", "train.lr", "extra", "targets.k"):
        assert part in msg
