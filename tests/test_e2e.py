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
    }
    r = run_pipeline(load_recipe(recipe))
    ppl = r["ppl"]
    # SmolLM2-135M on 19th-20th century speeches: a sane perplexity, not a broken pipeline's thousands
    assert 5 < ppl["base"] < 80, ppl
    assert ppl["knn_lm"] <= ppl["base"] * 1.02
    assert ppl["mlp_memory"] <= ppl["base"] * 1.02
    assert r["base_params"] > 1e8 and r["memory_params"] > 1e6
    ds = json.loads((tmp_path / "run" / "datastore" / "manifest.json").read_text())
    assert ds["d"] == 576 and ds["layer"] == 29 and ds["vocab_size"] == 49152
    # the stored values are the corpus's next tokens
    tokens = np.load(tmp_path / "run" / "corpus" / "tokens.train.npy")
    vals = np.concatenate([np.load(tmp_path / "run" / "datastore" / s["arrays"]["values"]["file"]) for s in ds["shards"]])
    assert np.array_equal(vals, tokens[1:])
