"""End to end on the real offline model (SmolLM2-135M) and a slice of the real corpus."""

import json

import numpy as np
import pytest

from mlpmem.pipeline import load_recipe, run_pipeline

pytestmark = pytest.mark.slow


def test_real_model_real_corpus(tmp_path):
    recipe = {
        "out": str(tmp_path / "run"),
        "corpus": {"source": "builtin:sotu", "train_tokens": 3000, "valid_tokens": 600, "test_tokens": 600},
        "datastore": {"context": 256, "stride": 128},
        "knn": {"k": 64, "temperatures": [1.0, 2.0, 4.0]},
        "targets": {"top_m": 32},
        "train": {"init": "lm_copy", "input_site": "output", "epochs": 1.0, "batch_size": 256, "eval_every": 0, "ckpt_every": 0},
        "eval": {"mixing": "fixed"},  # the default fits a gate on LM samples: minutes here, covered by test_gate on a tiny model
    }
    r = run_pipeline(load_recipe(recipe))
    ppl = r["ppl"]
    # SmolLM2-135M on 19th-20th century speeches: a sane perplexity, not a broken pipeline's thousands
    assert 5 < ppl["base"] < 80, ppl
    # kNN-LM over 3k tokens is a weak baseline: its lambda, fitted on 600 valid tokens, need not carry to test
    assert ppl["knn_lm"] <= ppl["base"] * 1.03
    # the memory learned the retriever on held-out text (it starts as an exact copy of the LM's head path, so its
    # start is the LM itself), and the mixture beats the LM on test with a lambda fitted on valid
    start, end = r["train"]["valid_start"], r["train"]["valid"]
    assert end["kl"] < 0.95 * start["kl"], (start, end)
    assert ppl["mlp_memory"] < ppl["base"] and r["lambda"]["mlp_memory"] > 0.05, (ppl, r["lambda"])
    assert r["model"].startswith("SmolLM2-135M-Instruct (GGUF Q4_1") and r["model_id"] == "smollm2-135m"
    assert r["base_params"] > 1e8 and r["memory_params"] > 1e6
    ds = json.loads((tmp_path / "run" / "datastore" / "manifest.json").read_text())
    assert ds["d"] == 576 and ds["layer"] == 29 and ds["vocab_size"] == 49152
    # the stored values are the corpus's next tokens
    tokens = np.load(tmp_path / "run" / "corpus" / "tokens.train.npy")
    vals = np.concatenate([np.load(tmp_path / "run" / "datastore" / s["arrays"]["values"]["file"]) for s in ds["shards"]])
    assert np.array_equal(vals, tokens[1:])
