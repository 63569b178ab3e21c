"""kNN targets: the maths against a naive reference, and the stage's checks and resume."""

from __future__ import annotations


import numpy as np
import pytest

import mlpmem.targets as targets_mod
from fake_store import random_datastore
from mlpmem.errors import MlpmemError
from mlpmem.index import IndexConfig, build_index
from mlpmem.datastore import Datastore
from mlpmem.targets import Targets, TargetsConfig, build_targets, id_dtype, knn_distribution, knn_target_logprob, knn_weights

T = 4.0


def reference_distribution(keys: np.ndarray, values: np.ndarray, row: int, k: int, temp: float) -> dict[int, float]:
    """Naive p_kNN for one row: full distances, self removed, argsort, a Python loop over tokens."""
    x = keys.astype(np.float64)
    d = ((x - x[row]) ** 2).sum(-1)
    d[row] = np.inf
    nn = np.argsort(d, kind="stable")[:k]
    w = np.exp(-(d[nn] - d[nn].min()) / temp)
    w /= w.sum()
    p: dict[int, float] = {}
    for j, wj in zip(nn, w):
        p[int(values[j])] = p.get(int(values[j]), 0.0) + wj
    return p


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("t")
    ds, keys, values = random_datastore(root / "ds", n=2000, d=16, vocab=50)
    ix = build_index(ds, root / "ix", IndexConfig(kind="flat"))
    return root, ds, ix, keys, values


def test_knn_weights_masks_missing():
    d = np.array([[1.0, 2.0, np.inf], [np.inf, np.inf, np.inf]])
    w = knn_weights(d, 1.0)
    np.testing.assert_allclose(w[0], [np.e / (np.e + 1), 1 / (np.e + 1), 0.0])
    assert np.all(w[1] == 0)


def test_distribution_small_example():
    d = np.array([[0.0, 1.0, 2.0, 3.0, np.inf]])
    v = np.array([[7, 3, 7, 9, -1]])
    ids, probs, removed, support = knn_distribution(d, v, 1.0, top_m=2)
    w = np.exp(-np.array([0.0, 1.0, 2.0, 3.0]))
    w /= w.sum()
    p7, p3, p9 = w[0] + w[2], w[1], w[3]
    assert ids.tolist() == [[7, 3]] and support.tolist() == [3]
    np.testing.assert_allclose(probs[0], [p7 / (p7 + p3), p3 / (p7 + p3)], rtol=1e-6)
    np.testing.assert_allclose(removed, [p9], rtol=1e-5)
    ids, probs, _, _ = knn_distribution(d, v, 1.0, top_m=6)  # M above k: padded
    assert ids.shape == (1, 6) and ids[0, 3:].tolist() == [0, 0, 0] and np.all(probs[0, 3:] == 0)


def test_id_dtype_holds_every_token():
    assert id_dtype(49_152) == np.uint16 and id_dtype(65_536) == np.uint16  # ids 0..65535
    assert id_dtype(65_537) == np.int32 and id_dtype(256_000) == np.int32  # Gemma's vocabulary
    ids = np.array([[0, 65_535]], dtype=np.int32)
    assert np.array_equal(ids.astype(id_dtype(65_536)).astype(np.int32), ids)


def test_targets_match_brute_force(setup):
    root, ds, ix, keys, values = setup
    cfg = TargetsConfig(k=40, temperature=T, top_m=8, batch_size=300)
    out = build_targets(ds, ix, root / "targets", cfg)
    tg = Targets(out)
    tg.check_aligned(Datastore(ds))
    m = tg.manifest
    assert m["k"] == 40 and m["top_m"] == 8 and m["n_rows"] == 2000
    assert m["stats"]["self_found_rate"] == 1.0 and 0 < m["stats"]["mean_mass_removed"] < 1
    assert [s["start"] for s in m["shards"]] == [s["start"] for s in Datastore(ds).manifest["shards"]]
    ids_all, probs_all = tg.load("ids"), tg.load("probs")
    # ids stored in 16 bits (vocabulary 50), handed out as int32 for torch
    assert ids_all.dtype == np.uint16 and probs_all.dtype == np.float16 and ids_all.shape == (2000, 8)
    assert tg.gather("ids", np.array([5, 1999])).dtype == np.int32
    np.testing.assert_allclose(probs_all.astype(np.float32).sum(1), 1.0, atol=4e-3)
    removed = []
    for row in (0, 1, 699, 700, 1234, 1999):
        ref = reference_distribution(keys, values, row, 40, T)
        top = sorted(ref.items(), key=lambda kv: -kv[1])[:8]
        kept = sum(p for _, p in top)
        removed.append(1 - kept)
        got = {int(i): float(p) for i, p in zip(ids_all[row], probs_all[row]) if p > 0}
        assert set(got) == {t for t, _ in top}
        for t, p in top:
            assert got[t] == pytest.approx(p / kept, abs=2e-3)
    # the recorded mass removed matches the reference for these rows
    d, nb = _neighbours(keys, np.array([0, 1, 699, 700, 1234, 1999]), 40)
    _, _, rem, _ = knn_distribution(d, values[nb], T, 8)
    np.testing.assert_allclose(rem, removed, atol=1e-5)


def _neighbours(keys, rows, k):
    x = keys.astype(np.float64)
    d = ((x[rows, None] - x[None]) ** 2).sum(-1)
    d[np.arange(len(rows)), rows] = np.inf
    nb = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, nb, 1), nb


def test_target_logprob_agrees_with_distribution(setup):
    _, _, _, keys, values = setup
    rows = np.arange(0, 2000, 50)
    d, nb = _neighbours(keys, rows, 64)
    nv = values[nb]
    nv[0, -3:] = -1  # some missing hits
    d[0, -3:] = np.inf
    ids, probs, removed, _ = knn_distribution(d, nv, T, top_m=64)  # no cut: M = k
    assert np.all(removed < 1e-6)
    targets = values[rows]
    lp = knn_target_logprob(d, nv, targets, T)
    for r in range(len(rows)):
        hit = ids[r] == targets[r]
        expect = np.log(probs[r][hit][0]) if hit.any() and probs[r][hit][0] > 0 else -np.inf
        assert lp[r] == pytest.approx(expect, abs=1e-5) if np.isfinite(expect) else lp[r] == -np.inf
    grid = knn_target_logprob(d, nv, targets, np.array([1.0, T, 16.0]))
    assert grid.shape == (3, len(rows))
    np.testing.assert_allclose(grid[1], lp)


def test_k_too_large_leaves_no_folder(setup):
    root, ds, ix, _, _ = setup
    with pytest.raises(MlpmemError, match=r"k=2000.*N=2000"):
        build_targets(ds, ix, root / "too_big", TargetsConfig(k=2000, temperature=T))
    assert not (root / "too_big").exists()


def test_resume_is_byte_identical(setup, monkeypatch):
    root, ds, ix, _, _ = setup
    cfg = TargetsConfig(k=30, temperature=T, top_m=16, batch_size=256)
    full = build_targets(ds, ix, root / "full", cfg)

    real, calls = targets_mod._save_shard, []

    def save_then_stop(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # interrupted while the second shard is being written
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(targets_mod, "_save_shard", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build_targets(ds, ix, root / "resumed", cfg)
    assert not (root / "resumed" / "manifest.json").exists()
    assert sorted(p.name for p in (root / "resumed").glob("progress*.json")) == ["progress-00000.json"]  # one record per finished shard
    first = (root / "resumed" / "ids-00000.npy").stat().st_mtime_ns
    monkeypatch.setattr(targets_mod, "_save_shard", real)
    build_targets(ds, ix, root / "resumed", cfg)
    assert (root / "resumed" / "ids-00000.npy").stat().st_mtime_ns == first  # shard 0 was not redone
    files = sorted(p.name for p in full.glob("*.npy"))
    assert files == sorted(p.name for p in (root / "resumed").glob("*.npy")) and len(files) == 6
    for name in files:
        assert (full / name).read_bytes() == (root / "resumed" / name).read_bytes()
    assert not list((root / "resumed").glob("progress*.json"))


def test_check_aligned_refuses_other_datastore(setup, tmp_path):
    root, ds, ix, _, _ = setup
    out = build_targets(ds, ix, root / "aligned", TargetsConfig(k=10, temperature=T, top_m=4))
    other, _, _ = random_datastore(tmp_path / "other", n=2000, seed=9)
    with pytest.raises(MlpmemError, match="another datastore"):
        Targets(out).check_aligned(Datastore(other))


def test_targets_from_reranked_ivf(setup):
    root, ds, _, _, _ = setup
    ivf = build_index(ds, root / "ivf", IndexConfig(kind="IVF16,SQ8", nprobe=8, recall_sample=50, recall_k=30, train_sample=2000))
    out = build_targets(ds, ivf, root / "ivf_targets", TargetsConfig(k=30, temperature=T, top_m=8))
    tg = Targets(out)
    assert 0.9 <= tg.manifest["stats"]["self_found_rate"] <= 1.0 and tg.manifest["index_factory"] == "IVF16,SQ8"
    np.testing.assert_allclose(tg.load("probs").astype(np.float32).sum(1), 1.0, atol=4e-3)


def test_targets_for_another_split_exclude_nothing(setup, tmp_path):
    """Valid-split targets: its rows are searched in the train index, with no self-exclusion."""
    root, ds, ix, keys, values = setup
    qds, qkeys, _ = random_datastore(tmp_path / "q", n=300, d=16, vocab=50, seed=1, shard_rows=128)
    cfg = TargetsConfig(k=40, temperature=T, top_m=8, batch_size=100)
    tg = Targets(build_targets(ds, ix, tmp_path / "tq", cfg, queries_dir=qds))
    assert tg.n_rows == 300 and tg.manifest["self_excluded"] is False
    ids_all, probs_all = tg.load("ids"), tg.load("probs")
    for row in (0, 150, 299):
        both = np.concatenate([keys, qkeys[row : row + 1]])
        ref = reference_distribution(both, np.concatenate([values, [0]]), len(keys), 40, T)  # the query itself is the excluded extra row
        top = sorted(ref.items(), key=lambda kv: -kv[1])[:8]
        got = {int(i) for i, p in zip(ids_all[row], probs_all[row]) if p > 0}
        assert got == {t for t, _ in top}


# ---------------------------------------------------------------- several processes (torchrun, gloo on localhost)

STOPPER = """
import sys
from pathlib import Path

import mlpmem.targets as t

ds, ix, out, stop_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
real, saved = t._save_shard, []


def save_then_stop(*args, **kwargs):  # this rank is killed before its (stop_after + 1)-th shard is written
    if len(saved) >= stop_after:
        raise SystemExit(3)
    saved.append(1)
    return real(*args, **kwargs)


t._save_shard = save_then_stop
t.build_targets(Path(ds), Path(ix), Path(out), t.TargetsConfig(k=30, temperature=4.0, top_m=16, batch_size=256))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*argv, nproc: int = 2):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        env["MASTER_PORT"],
        *map(str, argv),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _same_targets(a, b) -> None:
    """Integer arrays equal; float arrays equal within float16 rounding; same shard layout."""
    ta, tb = Targets(a), Targets(b)
    assert [(s["start"], s["end"]) for s in ta.manifest["shards"]] == [(s["start"], s["end"]) for s in tb.manifest["shards"]]
    assert sorted(p.name for p in a.glob("*.npy")) == sorted(p.name for p in b.glob("*.npy"))
    np.testing.assert_array_equal(ta.load("ids"), tb.load("ids"))
    np.testing.assert_allclose(ta.load("probs").astype(np.float32), tb.load("probs").astype(np.float32), rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def one_process(setup):
    root, ds, ix, _, _ = setup
    return build_targets(ds, ix, root / "one_process", TargetsConfig(k=30, temperature=T, top_m=16, batch_size=256))


def test_two_processes_write_what_one_writes(setup, one_process, tmp_path):
    """torchrun -m mlpmem targets with 2 ranks (gloo on localhost) writes the files of a 1-process run."""
    root, ds, ix, _, _ = setup

    r = _torchrun(
        "-m",
        "mlpmem",
        "targets",
        "--datastore",
        ds,
        "--index",
        ix,
        "--out",
        tmp_path / "two",
        "--k",
        30,
        "--temperature",
        T,
        "--top-m",
        16,
        "--batch-size",
        256,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    two = Targets(tmp_path / "two")
    assert two.manifest["processes"] == 2 and not list((tmp_path / "two").glob("progress*"))
    _same_targets(one_process, tmp_path / "two")


def test_two_processes_stopped_resume_with_one(setup, one_process, tmp_path):
    """A 2-rank run killed half-way resumes in 1 process without redoing the shards it finished."""
    root, ds, ix, _, _ = setup
    # 2 ranks, each stopped after its first shard: shards 0 (rank 0) and 1 (rank 1) are on disk, shard 2 is not
    script = tmp_path / "stop.py"
    script.write_text(STOPPER)
    r = _torchrun(script, ds, ix, tmp_path / "cut", 1)
    assert r.returncode != 0
    cut = tmp_path / "cut"
    assert not (cut / "manifest.json").exists()
    assert sorted(p.name for p in cut.glob("progress*.json")) == ["progress-00000.json", "progress-00001.json"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in cut.glob("*-0000[01].npy")}
    build_targets(ds, ix, cut, TargetsConfig(k=30, temperature=T, top_m=16, batch_size=256))  # resumed by one process
    assert {p.name: p.stat().st_mtime_ns for p in cut.glob("*-0000[01].npy")} == mtimes  # not redone
    assert Targets(cut).manifest["processes"] == 1
    _same_targets(one_process, cut)
