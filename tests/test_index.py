"""The index: exact search, self-exclusion by id, re-ranking, recall, refusing bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fake_store import random_datastore, write_datastore
from mlpmem.errors import MlpmemError
from mlpmem.index import IndexConfig, KnnIndex, build_index
from mlpmem.datastore import Datastore


def brute_force(keys: np.ndarray, q: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Naive reference: full distance matrix in float64, self removed, argsort."""
    x = keys.astype(np.float64)
    d = ((q.astype(np.float64)[:, None, :] - x[None]) ** 2).sum(-1)
    d[np.arange(len(q)), exclude] = np.inf
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return random_datastore(tmp_path_factory.mktemp("ds") / "ds")


@pytest.fixture(scope="module")
def flat(store, tmp_path_factory):
    return build_index(store[0], tmp_path_factory.mktemp("ix") / "flat", IndexConfig(kind="auto"))


def test_flat_search_matches_brute_force(store, flat):
    _, keys, _ = store
    index = KnnIndex.open(flat)
    assert not index.approximate and not index.rerank
    rows = np.array([0, 5, 699, 700, 1999])  # across shard boundaries
    d, ids = index.search(keys[rows].astype(np.float32), 50, exclude=rows)
    ref_d, ref_ids = brute_force(keys, keys[rows], 50, rows)
    assert d.dtype == np.float32 and ids.dtype == np.int64 and d.shape == (5, 50)
    assert not np.isin(rows[:, None], ids).any(axis=1).any()
    np.testing.assert_allclose(d, ref_d, rtol=1e-4, atol=1e-3)
    assert (ids == ref_ids).mean() > 0.99  # equal up to float ties
    assert np.all(np.diff(d, axis=1) >= 0)


def test_flat_manifest(store, flat):
    m = json.loads((flat / "manifest.json").read_text())
    assert m["kind"] == "index" and m["factory"] == "Flat" and m["recall_at_k"] == 1.0
    assert m["n_rows"] == 2000 and m["d"] == 16 and m["rerank"] is False
    assert m["index_file"]["bytes"] == (flat / "index.faiss").stat().st_size


def test_self_excluded_by_id_with_duplicate_key(tmp_path):
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(300, 8)).astype(np.float16)
    keys[42] = keys[17]  # two identical rows
    ds = write_datastore(tmp_path / "ds", keys, rng.integers(0, 10, 300), shard_rows=100)
    index = KnnIndex.open(build_index(ds, tmp_path / "ix", IndexConfig(kind="flat")))
    d, ids = index.search(keys[[17, 42]].astype(np.float32), 5, exclude=np.array([17, 42]))
    assert ids[0, 0] == 42 and ids[1, 0] == 17 and np.all(d[:, 0] == 0)
    assert 17 not in ids[0] and 42 not in ids[1]
    # without exclusion both copies come first; -1 excludes nothing
    d, ids = index.search(keys[[17]].astype(np.float32), 3, exclude=np.array([-1]))
    assert set(ids[0, :2]) == {17, 42}


def test_ivf_rerank_exact_distances_and_recall(store, tmp_path):
    ds_dir, keys, _ = store
    out = build_index(ds_dir, tmp_path / "ivf", IndexConfig(kind="IVF16,SQ8", nprobe=4, recall_sample=100, recall_k=64, train_sample=2000))
    m = json.loads((out / "manifest.json").read_text())
    assert m["rerank"] is True and m["nlist"] == 16 and m["nprobe"] == 4
    assert 0.0 <= m["recall_at_k"] <= 1.0 and m["k"] == 64
    index = KnnIndex.open(out)
    assert index.approximate
    rows = np.arange(0, 2000, 97)
    d, ids = index.search(keys[rows].astype(np.float32), 64, exclude=rows)
    valid = ids >= 0
    exact = ((keys[ids.clip(0)].astype(np.float64) - keys[rows, None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(d[valid], exact[valid], rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(np.where(valid, d, np.inf), axis=1) >= 0)
    assert not (ids == rows[:, None]).any()


def test_missing_hits_padded(tmp_path, store):
    # one list probed out of 16 with no re-ranking candidates to spare: FAISS returns -1s
    out = build_index(
        store[0],
        tmp_path / "ivf",
        IndexConfig(kind="IVF16,Flat", nprobe=1, rerank=False, recall_sample=20, recall_k=300, train_sample=2000),
    )
    index = KnnIndex.open(out)
    d, ids = index.search(store[1][:4].astype(np.float32), 1000, exclude=np.arange(4))
    assert (ids == -1).any()
    assert np.all(np.isinf(d[ids == -1])) and np.all(np.isfinite(d[ids >= 0]))


def test_k_too_large(store, flat):
    index = KnnIndex.open(flat)
    with pytest.raises(MlpmemError, match="k=2000"):
        index.search(store[1][:2].astype(np.float32), 2000, exclude=np.array([0, 1]))
    d, ids = index.search(store[1][:1].astype(np.float32), 2000)  # without exclusion all rows are allowed
    assert sorted(ids[0]) == list(range(2000))


def test_truncated_or_corrupted_index(store, tmp_path):
    out = build_index(store[0], tmp_path / "ix", IndexConfig(kind="flat"))
    path = out / "index.faiss"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MlpmemError, match="truncated"):
        KnnIndex.open(out)
    path.write_bytes(b"\0" * len(data))  # same size, garbage: its sampled blocks no longer match
    with pytest.raises(MlpmemError, match="corrupted"):
        KnnIndex.open(out)


def test_refuses_missing_datastore_and_bad_factory(tmp_path, store):
    with pytest.raises(MlpmemError, match="does not exist"):
        build_index(tmp_path / "nope", tmp_path / "ix")
    with pytest.raises(MlpmemError, match="factory"):
        build_index(store[0], tmp_path / "ix2", IndexConfig(kind="NotAnIndex"))
    assert not (tmp_path / "ix").exists() and not (tmp_path / "ix2").exists()


def test_check_model_and_other_datastore(store, flat, tmp_path):
    index = KnnIndex.open(flat)
    index.check_model("test/model", "tok0")
    with pytest.raises(MlpmemError):
        index.check_model("other/model", "tok1")
    other, _, _ = random_datastore(tmp_path / "other", n=300, seed=5)
    with pytest.raises(MlpmemError, match="another datastore"):
        KnnIndex.open(flat, datastore=Datastore(other))


def test_done_index_is_skipped(store, flat):
    mtime = (flat / "index.faiss").stat().st_mtime_ns
    build_index(store[0], flat, IndexConfig(kind="auto"))
    assert (flat / "index.faiss").stat().st_mtime_ns == mtime


def test_faiss_leaves_the_process_thread_count_alone(store, tmp_path):
    """FAISS shares torch's OpenMP runtime: building and searching must not change torch's thread count."""
    import faiss
    import torch

    from mlpmem.index import faiss_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ix = KnnIndex.open(build_index(store[0], tmp_path / "ix", IndexConfig(kind="IVF16,SQ8", nprobe=4, recall_sample=20)))
        ix.search(store[1][:5].astype(np.float32), 10)
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        assert json.loads((tmp_path / "ix" / "manifest.json").read_text())["faiss_threads"] == 1  # what actually ran
        with faiss_threads(2) as n:
            assert n == 2 and faiss.omp_get_max_threads() == 2
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1  # restored
    finally:
        torch.set_num_threads(before)


def test_index_folder_from_before_the_recall_target_stays_done(store, tmp_path):
    """Folders written before recall_target and device existed match today's defaults (folders.ADDED_SETTINGS; device is not a setting)."""
    out = build_index(store[0], tmp_path / "old", IndexConfig(kind="flat"))
    cfg = json.loads((out / "config.json").read_text())
    assert "device" not in cfg  # where it ran: in the manifest only
    del cfg["recall_target"]
    (out / "config.json").write_text(json.dumps(cfg))
    mtime = (out / "index.faiss").stat().st_mtime_ns
    build_index(store[0], out, IndexConfig(kind="flat"))
    assert (out / "index.faiss").stat().st_mtime_ns == mtime
    with pytest.raises(MlpmemError, match="recall_target"):  # another target is another index
        build_index(store[0], out, IndexConfig(kind="flat", recall_target=0.5))
