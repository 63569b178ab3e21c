"""`mlpmem plan`: its size model against the files a real run writes, and its refusals."""

import numpy as np
import pytest

from mlpmem.errors import MlpmemError
from mlpmem.pipeline import load_recipe
from mlpmem.plan import Throughputs, estimate, plan, render_plan, search_qps, split_tokens


def _du(folder, pattern="*.npy"):
    return sum(p.stat().st_size for p in folder.rglob(pattern))


def test_plan_sizes_match_a_real_run_and_times_follow_the_throughputs(tmp_path, tiny_llama, tiny_corpus_file):
    from helpers import tiny_recipe

    from mlpmem.pipeline import run_pipeline

    recipe = load_recipe(tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file))
    p = plan(recipe)  # calibrates on this machine with the tiny model
    stages = {s["stage"]: s for s in p["stages"]}
    assert all(s["seconds"] >= 0 and s["disk_bytes"] >= 0 for s in p["stages"]) and p["total"]["seconds"] > 0
    assert "datastore (train)" in render_plan(p)
    run_pipeline(recipe)
    out = tmp_path / "run"
    tokens = split_tokens(recipe)  # now read from the built corpus
    assert tokens == p["tokens"]  # the caps predicted the split sizes
    # disk: the datastore (train + valid) and the targets, within 2% of what was written (npy headers)
    ds_real = _du(out / "datastore") + _du(out / "valid")
    assert stages["datastore (train) and scored valid split"]["disk_bytes"] == pytest.approx(ds_real, rel=0.02)
    tg_real = _du(out / "targets") + _du(out / "valid_targets")
    assert stages["kNN targets"]["disk_bytes"] == pytest.approx(tg_real, rel=0.02)


def test_estimate_scales_with_the_corpus_and_the_throughputs():
    recipe = load_recipe("sotu", check_paths=False)
    tp = Throughputs(extract_rows_s=200, score_rows_s=100, search_qps=100, search_rows=50_000, train_positions_s=1000)
    small = estimate(recipe, {"train": 100_000, "valid": 1000, "test": 1000}, tp, 576, 49152, 500_000_000, 100_000_000)
    big = estimate(recipe, {"train": 200_000, "valid": 1000, "test": 1000}, tp, 576, 49152, 500_000_000, 100_000_000)
    by = lambda xs: {n.stage: n for n in xs}  # noqa: E731
    s, b = by(small), by(big)
    assert b["memory training"].seconds == pytest.approx(2 * s["memory training"].seconds)
    assert b["kNN targets"].seconds > 3.5 * s["kNN targets"].seconds  # Flat: twice the queries, each over twice the keys
    assert s["memory training"].seconds == pytest.approx(recipe.sections["train"].epochs * 100_000 / 1000)
    # IVF scans a fixed number of keys: beyond the Flat range the search rate stops falling
    assert search_qps(tp, 10_000_000, flat=False) == search_qps(tp, 1_000_000, flat=False)
    assert search_qps(tp, 100_000, flat=True) == pytest.approx(50)


def test_plan_refuses_an_uncapped_corpus_of_unknown_size(tmp_path):
    recipe = load_recipe({"out": str(tmp_path / "r"), "corpus": {"source": str(tmp_path / "c.jsonl")}}, check_paths=False)
    with pytest.raises(MlpmemError, match="train-tokens"):
        split_tokens(recipe)
    assert split_tokens(recipe, 5000)["train"] == 5000


def test_checkpoints_on_disk_counts_what_the_run_writes():
    from mlpmem.plan import checkpoints_on_disk
    from mlpmem.train import TrainConfig

    assert checkpoints_on_disk(TrainConfig(epochs=2, batch_size=1024, ckpt_every=500, keep_last=2), 60_000) == 1  # 118 steps: the final one
    assert (
        checkpoints_on_disk(TrainConfig(epochs=10, batch_size=1000, ckpt_every=100, keep_last=2), 100_000) == 3
    )  # keep_last + the one being written
    assert checkpoints_on_disk(TrainConfig(epochs=1, batch_size=100, ckpt_every=100, keep_last=5), 30_000) == 3  # steps 100, 200, 300


def test_online_training_plans_a_datastore_of_keys_alone():
    """As the pipeline stores the memory's input only for offline training, so does the plan count it."""
    tp = Throughputs(extract_rows_s=200, score_rows_s=100, search_qps=100, search_rows=50_000, train_positions_s=1000)
    tokens, d = {"train": 10_000, "valid": 1000, "test": 1000}, 576
    plans = {
        mode: {
            n.stage: n
            for n in estimate(load_recipe("sotu", check_paths=False, overrides=[f"train.mode={mode}"]), tokens, tp, d, 49152, 1, 1)
        }
        for mode in ("offline", "online")
    }
    disk = {mode: p["datastore (train) and scored valid split"].disk_bytes for mode, p in plans.items()}
    assert disk["online"] == 10_000 * (2 * d + 4) + 1000 * (2 * d + 8)  # keys + values (+ the valid split's LM log-probs)
    assert disk["offline"] == 10_000 * (4 * d + 4) + 1000 * (4 * d + 8)  # and the last layer's output for lm_copy
    # online training pays an LM pass (at the scoring rate) per position of every epoch
    epochs = load_recipe("sotu", check_paths=False).sections["train"].epochs
    assert plans["offline"]["memory training"].seconds == pytest.approx(epochs * 10_000 / 1000)
    assert plans["online"]["memory training"].seconds == pytest.approx(epochs * 10_000 * (1 / 1000 + 1 / 100))


def test_a_pq_index_is_planned_at_its_code_size():
    """IVF-PQ keeps 64-byte codes and 8-byte ids per key plus float32 centroids: what sotu200k_codes wrote (19,724,908 bytes)."""
    tp = Throughputs(extract_rows_s=200, score_rows_s=100, search_qps=100, search_rows=50_000, train_positions_s=1000)
    recipe = load_recipe("sotu", check_paths=False, overrides=["index.kind=ivfpq", "index.rerank=false"])
    index = {n.stage: n for n in estimate(recipe, {"train": 200_000, "valid": 1000, "test": 1000}, tp, 576, 49152, 1, 1)}["index"]
    assert index.disk_bytes == pytest.approx(19_724_908, rel=0.01)


def test_a_pq_index_is_planned_at_the_rate_its_codes_are_scanned():
    """A codes-only PQ search scans codes at its own rate (measured: about half the Flat rate per key); other kinds keep the Flat rate."""
    from mlpmem.plan import IVF_SCAN, pq_codes_per_s

    tp = Throughputs(extract_rows_s=200, score_rows_s=100, search_qps=100, search_rows=50_000, train_positions_s=1000, pq_codes_s=1e6)
    tokens = {"train": 1_000_000, "valid": 1000, "test": 1000}
    targets = lambda *o: (
        {n.stage: n for n in estimate(load_recipe("sotu", check_paths=False, overrides=list(o)), tokens, tp, 576, 49152, 1, 1)}[
            "kNN targets"
        ].seconds
    )  # noqa: E731
    assert targets("index.kind=ivfpq", "index.rerank=false") == pytest.approx(1_001_000 / (1e6 / IVF_SCAN))
    assert targets() == pytest.approx(1_001_000 / (100 * 50_000 / IVF_SCAN))  # auto: IVF-SQ8 at the Flat rate
    # the calibration counts the codes FAISS scanned
    keys = np.random.default_rng(0).standard_normal((12_000, 32), dtype=np.float32)
    assert 0 < pq_codes_per_s(keys, 16) < float("inf")
