"""Datastore and kNN-target folders from arrays, in the on-disk format the training stage reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlpmem.files import CONFIG, MANIFEST, save_npy, sha256_file, write_json
from mlpmem.manifest import write_manifest


def _write_sharded(folder: Path, kind: str, arrays: dict[str, np.ndarray], shard_rows: int, manifest: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG, {"test": True, "kind": kind})
    n = len(next(iter(arrays.values())))
    shards = []
    for s, start in enumerate(range(0, n, shard_rows)):
        end = min(start + shard_rows, n)
        shards.append(
            {
                "start": start,
                "end": end,
                "arrays": {name: save_npy(folder / f"{name}-{s:05d}.npy", a[start:end]) for name, a in arrays.items()},
            }
        )
    write_manifest(folder, kind, {**manifest, "n_rows": n, "shards": shards})
    return folder


def write_train_data(
    root: Path,
    n: int = 500,
    d: int = 16,
    vocab: int = 50,
    m: int = 8,
    seed: int = 0,
    shard_rows: int = 200,
    split: str = "train",
    lm_logprob: bool = False,
    features: dict[str, tuple[int, str]] | None = None,
    layer: int = 1,
    site: str = "ffn_input",
    prefix: list[int] | None = None,
) -> tuple[Path, Path]:
    """A learnable toy problem: keys cluster, each cluster prefers a few tokens.

    Returns (datastore folder, targets folder). ``features`` maps extra array
    names to (layer, site); ``lm_logprob`` adds a weak "LM" log-prob per row; ``prefix`` is recorded as
    the token ids a <bos> datastore puts before every window.
    """
    rng = np.random.default_rng(seed)
    n_clusters = 10
    centers = np.random.default_rng(123).normal(size=(n_clusters, d)) * 2
    favourite = np.random.default_rng(456).integers(0, vocab, (n_clusters, m))
    cluster = rng.integers(0, n_clusters, n)
    keys = (centers[cluster] + rng.normal(size=(n, d)) * 0.5).astype(np.float16)
    pick = rng.integers(0, 3, n)  # next token: one of the cluster's first three favourites
    values = favourite[cluster, pick].astype(np.int32)
    probs = rng.dirichlet(np.ones(m) * 0.5, n)
    probs[:, -2:] = 0  # padding, as in short supports
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float16)
    ids = favourite[cluster].astype(np.int32)
    arrays = {"keys": keys, "values": values}
    feats = {"keys": {"layer": layer, "site": site}}
    for name, (fl, fs) in (features or {}).items():
        arrays[name] = (keys.astype(np.float32) @ np.random.default_rng(7).normal(size=(d, d)) / 4).astype(np.float16)
        feats[name] = {"layer": fl, "site": fs}
    if lm_logprob:
        arrays["lm_logprob"] = np.log(rng.uniform(0.005, 0.05, n)).astype(np.float32)  # weaker than the learnt memory, which helps it
    ident = {"model_id": "test/model", "tokenizer_hash": "tok0", "layer": layer, "site": site}
    ds = _write_sharded(
        Path(root) / f"datastore-{split}",
        "datastore",
        arrays,
        shard_rows,
        {**ident, "features": feats, "d": d, "vocab_size": vocab, "split": split, **({"prefix": prefix} if prefix else {})},
    )
    tg = _write_sharded(
        Path(root) / f"targets-{split}",
        "targets",
        {"ids": ids, "probs": probs},
        shard_rows,
        {
            **ident,
            "vocab_size": vocab,
            "k": 16,
            "temperature": 1.0,
            "top_m": m,
            "datastore": str(ds.resolve()),
            "datastore_manifest_sha256": sha256_file(ds / MANIFEST),
        },
    )
    return ds, tg
