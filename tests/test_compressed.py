"""Compressed stores (IVF-PQ, no float16 keys, no Flat copy), the recall target, and FAISS device selection."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from fake_store import random_datastore
from mlpmem.errors import MlpmemError
from mlpmem.index import (
    IndexConfig,
    KnnIndex,
    Placement,
    build_index,
    choose_nprobe,
    pq_size,
    recall_at_k,
    resolve_placement,
    resolve_factory,
    to_placement,
)
from mlpmem.datastore import Datastore


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """FAISS on one thread: on a loaded 2-core machine its OpenMP loops ran 10-40x slower on two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """12k clustered keys of d=32 (shards of 5000 rows)."""
    return random_datastore(tmp_path_factory.mktemp("pq") / "ds", n=12000, d=32, shard_rows=5000)


# 4-bit PQ trains in well under a second; the presets' 8-bit 64-byte codes take minutes on tiny
# sub-vectors, and differ only in the factory string (test_presets_resolve_to_the_official_index)
PQ = "IVF64,PQ8x4np"


def manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ---------------------------------------------------------------- pure parts


def test_recall_at_k_matches_sets():
    rng = np.random.default_rng(0)
    exact = np.stack([rng.permutation(100)[:10] for _ in range(7)])
    approx = np.stack([np.concatenate([e[:i], rng.permutation(np.arange(100, 200))[: 10 - i]]) for i, e in enumerate(exact)])
    approx[3, -1] = -1  # a missing hit never counts
    naive = np.mean([len(set(a.tolist()) & set(e.tolist()) - {-1}) / 10 for a, e in zip(approx, exact)])
    assert recall_at_k(approx, exact) == pytest.approx(naive)


def test_choose_nprobe_smallest_within_an_eighth():
    calls = []

    def measure(p):  # recall grows with the scan, reaching 0.9 at nprobe 90
        calls.append(p)
        return min(1.0, p / 100), 0.001

    p, r, tried = choose_nprobe(measure, 4, 1024, 0.9)
    assert 90 <= p <= 90 * 1.125 and r >= 0.9
    assert [q for q, rec, _ in tried if rec >= 0.9 and q < p] == []  # nothing smaller that was tried reaches it
    assert len(calls) == len(set(calls)) < 15  # each nprobe measured once


def test_choose_nprobe_stops_at_a_plateau_and_at_every_list():
    p, r, tried = choose_nprobe(lambda p: (0.6, 0.0), 8, 4096, 0.9)  # the codes limit recall: doubling gains nothing
    assert r == 0.6 and len(tried) == 2 and p == 8  # the cheapest of equal recalls
    p, r, tried = choose_nprobe(lambda p: (p / 1000, 0.0), 8, 64, 0.9)  # unreachable: stop at a full scan
    assert p == 64 and tried[-1][0] == 64
    p, _, _ = choose_nprobe(lambda p: (p / 100, 0.0), 8, 4096, 0.9, max_nprobe=32)  # GPU limit
    assert p == 32
    # the curve codes-only IVF-PQ gave at 200k SOTU keys: out of reach, so the cheapest scan within 0.01 of the best
    curve = {21: 0.6572, 42: 0.7355, 84: 0.7633, 168: 0.7705, 336: 0.7719}
    p, r, tried = choose_nprobe(lambda p: (curve[p], 0.0), 21, 2048, 0.9)
    assert [q for q, _, _ in tried] == [21, 42, 84, 168, 336] and (p, r) == (84, 0.7633)


def test_presets_resolve_to_the_official_index():
    assert pq_size(576) == 64 and pq_size(1600) == 64 and pq_size(16) == 16 and pq_size(100) == 50
    assert resolve_factory(IndexConfig(kind="mlpmemory"), 1_000_000, 576) == ("IVF4096,PQ64np", 4096, 32)
    assert resolve_factory(IndexConfig(kind="ivfpq"), 1_000_000, 576)[0] == "IVF4096,PQ64np"
    assert resolve_factory(IndexConfig(kind="ivfopq"), 1_000_000, 576)[0] == "OPQ64,IVF4096,PQ64np"
    assert resolve_factory(IndexConfig(kind="keys"), 10, 8) == ("Keys", None, None)
    f, nlist, nprobe = resolve_factory(IndexConfig(), 3_000_000, 576)
    assert f == "IVF8192,SQ8" and nprobe == -(-2 * 1024 * nlist // 3_000_000)  # the search starts at a 2k scan


# ---------------------------------------------------------------- device selection (exercised without a GPU)


class FakeFaiss(types.SimpleNamespace):
    """Just enough of a GPU FAISS build to exercise placement: records how the index was cloned."""

    def __init__(self, gpus: int):
        super().__init__(calls=[])
        self.n = gpus
        self.StandardGpuResources = lambda: "res"

    def get_num_gpus(self):
        return self.n

    class GpuMultipleClonerOptions:
        shard = False

    def index_cpu_to_gpu(self, res, g, index):
        self.calls.append(("one", g))
        return types.SimpleNamespace(inner=index)

    def index_cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        self.calls.append(("all", ngpu, co.shard))
        return index


def test_resolve_device_on_a_cpu_build_names_the_extra():
    assert resolve_placement("cpu") == Placement() and not resolve_placement("cpu").gpu
    cpu_faiss = types.SimpleNamespace(__version__="1.15.1", get_num_gpus=lambda: 0)
    for device in ("cuda", "cuda:0", "all", "all-shards"):
        with pytest.raises(MlpmemError, match=r"pip install 'mlpmem\[gpu\]'"):
            resolve_placement(device, faiss=cpu_faiss)
    with pytest.raises(MlpmemError, match="mlpmem.gpu"):
        resolve_placement("cpu", gpu=True, faiss=cpu_faiss)  # the older flag means cuda
    with pytest.raises(MlpmemError, match="sees none"):
        resolve_placement("cuda", faiss=FakeFaiss(0))
    with pytest.raises(MlpmemError, match="not one of"):
        resolve_placement("gpu")


def test_resolve_device_picks_gpus():
    f = FakeFaiss(4)
    assert resolve_placement("cuda", faiss=f, local_rank=0) == Placement("cuda:0", (0,))
    assert resolve_placement("cuda", faiss=f, local_rank=5) == Placement("cuda:1", (1,))  # each rank its own GPU
    assert resolve_placement("cuda:2", faiss=f) == Placement("cuda:2", (2,))
    assert resolve_placement("all", faiss=f) == Placement("all", (0, 1, 2, 3), shard=False)
    assert resolve_placement("all-shards", faiss=f) == Placement("all-shards", (0, 1, 2, 3), shard=True)
    with pytest.raises(MlpmemError, match="cuda:0..cuda:3"):
        resolve_placement("cuda:4", faiss=f)


def test_to_placement_clones_replicas_or_shards():
    f = FakeFaiss(4)
    assert to_placement("ix", Placement(), faiss=f) == "ix" and f.calls == []
    to_placement("ix", Placement("cuda:2", (2,)), faiss=f)
    to_placement("ix", resolve_placement("all", faiss=f), faiss=f)
    to_placement("ix", resolve_placement("all-shards", faiss=f), faiss=f)
    assert f.calls == [("one", 2), ("all", 4, False), ("all", 4, True)]


def test_a_gpu_index_without_gpu_faiss_is_refused_before_any_folder(big, tmp_path):
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("this machine has GPU FAISS")
    with pytest.raises(MlpmemError, match=r"mlpmem\[gpu\]"):
        build_index(big[0], tmp_path / "ix", IndexConfig(kind=PQ, device="cuda"))
    assert not (tmp_path / "ix").exists()
    with pytest.raises(MlpmemError, match="device"):
        build_index(big[0], tmp_path / "ix", IndexConfig(device="gpu"))


# ---------------------------------------------------------------- compressed stores


@pytest.fixture(scope="module")
def pq_codes_only(big, tmp_path_factory):
    """IVF-PQ searched from its codes alone (no re-rank): the store that needs no float16 keys."""
    return build_index(
        big[0], tmp_path_factory.mktemp("ix") / "pq", IndexConfig(kind=PQ, rerank=False, recall_k=50, recall_sample=100, recall_target=0.3)
    )


def test_ivfpq_holds_the_recall_target_with_rerank(big, tmp_path):
    # 16-byte codes: good enough candidates for the re-rank to reach the target (4-byte ones plateau at 0.55)
    out = build_index(big[0], tmp_path / "pq", IndexConfig(kind="IVF64,PQ32x4np", recall_k=50, recall_sample=100, recall_target=0.9))
    m = manifest(out)
    assert m["factory"] == "IVF64,PQ32x4np" and m["rerank"] is True and m["recall_target"] == 0.9
    assert m["recall_at_k"] >= 0.9 and [p for p, r, _ in m["nprobe_tried"] if p == m["nprobe"]] == [m["nprobe"]]
    assert all(r < 0.9 for p, r, _ in m["nprobe_tried"] if p < m["nprobe"])  # the smallest tried that holds it
    assert m["train_rows"] == 12000 and m["search_needs_keys"] is True  # min(N, train_sample)
    b = m["bytes_per_token"]
    assert 16 + 8 <= b["index"] < 16 + 8 + 3  # 16-byte codes + 8-byte ids + lists and codebooks
    assert b["datastore.keys"] == pytest.approx(64, abs=0.1) and b["datastore.values"] == pytest.approx(4, abs=0.1)
    assert m["search_bytes_per_token"] == pytest.approx(b["index"] + b["datastore.keys"] + b["datastore.values"], abs=0.05)
    assert KnnIndex.open(out).nprobe == m["nprobe"]  # searches at the chosen nprobe


def test_codes_only_index_searches_after_the_keys_are_removed(big, pq_codes_only, tmp_path):
    m = manifest(pq_codes_only)
    assert m["rerank"] is False and m["search_needs_keys"] is False
    assert m["search_bytes_per_token"] == pytest.approx(m["bytes_per_token"]["index"] + m["bytes_per_token"]["datastore.values"], abs=0.05)
    ds_dir, keys, _ = big
    rows = np.arange(0, 12000, 997)
    before = KnnIndex.open(pq_codes_only).search(keys[rows].astype(np.float32), 20, exclude=rows)
    # a copy of the datastore without its keys files
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(ds_dir, copy)
    for p in copy.glob("keys-*.npy"):
        p.unlink()
    ds = Datastore(copy)
    assert ds.absent == ["keys"] and len(ds.values()) == 12000
    after = KnnIndex.open(pq_codes_only, datastore=ds).search(keys[rows].astype(np.float32), 20, exclude=rows)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    with pytest.raises(MlpmemError, match="were removed"):
        ds.gather("keys", rows)
    # a new index or new targets need the keys: refused with the fix, before any folder is made
    from mlpmem.targets import TargetsConfig, build_targets

    with pytest.raises(MlpmemError, match="nothing to index.*build the datastore again"):
        build_index(copy, tmp_path / "new_index", IndexConfig(kind="flat"))
    with pytest.raises(MlpmemError, match="queries of the targets.*build the targets before removing the keys"):
        build_targets(copy, pq_codes_only, tmp_path / "new_targets", TargetsConfig(k=20, top_m=8))
    assert not (tmp_path / "new_index").exists() and not (tmp_path / "new_targets").exists()
    # one keys shard missing is damage, not a removal; values are never optional
    shutil.copy(ds_dir / "keys-00000.npy", copy / "keys-00000.npy")
    with pytest.raises(MlpmemError, match="missing"):
        Datastore(copy)
    (copy / "keys-00000.npy").unlink()
    (copy / "values-00001.npy").unlink()
    with pytest.raises(MlpmemError, match="missing"):
        Datastore(copy)


def test_keys_index_is_exact_without_a_copy(big, tmp_path):
    ds_dir, keys, _ = big
    out = build_index(ds_dir, tmp_path / "keys", IndexConfig(kind="keys"))
    flat = build_index(ds_dir, tmp_path / "flat", IndexConfig(kind="flat"))
    m = manifest(out)
    assert m["index_file"] is None and not (out / "index.faiss").exists() and m["bytes_per_token"]["index"] == 0
    assert m["search_needs_keys"] is True and m["recall_at_k"] == 1.0
    assert manifest(flat)["bytes_per_token"]["index"] >= 32 * 4  # the float32 copy that `keys` saves
    rows = np.array([0, 4999, 5000, 11999])  # across shard boundaries
    d, ids = KnnIndex.open(out).search(keys[rows].astype(np.float32), 30, exclude=rows)
    fd, fids = KnnIndex.open(flat).search(keys[rows].astype(np.float32), 30, exclude=rows)
    ref = ((keys.astype(np.float64)[None] - keys[rows].astype(np.float64)[:, None]) ** 2).sum(-1)
    ref[np.arange(4), rows] = np.inf
    np.testing.assert_array_equal(ids, np.argsort(ref, axis=1, kind="stable")[:, :30])
    np.testing.assert_allclose(d, fd, rtol=1e-5)
    np.testing.assert_array_equal(ids, fids)
    streamed = KnnIndex.open(out)
    streamed.index.resident_bytes = 0  # keys too large for memory: streamed block by block (shards of 5000 rows)
    sd, sids = streamed.search(keys[rows].astype(np.float32), 30, exclude=rows)
    assert streamed.index._flat is None
    np.testing.assert_array_equal(sids, ids)
    np.testing.assert_allclose(sd, d, rtol=1e-5)


def test_auto_ivf_holds_the_target(big, tmp_path):
    out = build_index(big[0], tmp_path / "auto", IndexConfig(auto_flat_max_rows=0, recall_k=100, recall_sample=100, train_sample=12000))
    m = manifest(out)
    assert m["factory"].endswith(",SQ8") and m["recall_target"] == 0.9 and m["recall_at_k"] >= 0.9
    fixed = build_index(
        big[0], tmp_path / "fixed", IndexConfig(kind=m["factory"], nprobe=1, recall_k=100, recall_sample=100, train_sample=12000)
    )
    assert manifest(fixed)["recall_target"] is None and manifest(fixed)["nprobe"] == 1  # a factory string keeps its nprobe
    assert manifest(fixed)["recall_at_k"] < 0.9  # which is why auto chooses it


def test_mlpmemory_preset_needs_enough_keys(tmp_path):
    ds, _, _ = random_datastore(tmp_path / "ds", n=2000, d=64)
    with pytest.raises(MlpmemError, match="4096 lists"):
        build_index(ds, tmp_path / "m", IndexConfig(kind="mlpmemory"))
    assert not (tmp_path / "m").exists()
