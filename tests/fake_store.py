"""Write a datastore folder from arrays, in the exact on-disk format of ``mlpmem.datastore``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlpmem.files import CONFIG, save_npy, write_json
from mlpmem.manifest import write_manifest


def write_datastore(
    folder: Path,
    keys: np.ndarray,
    values: np.ndarray,
    shard_rows: int = 1000,
    model_id: str = "test/model",
    tokenizer_hash: str = "tok0",
    vocab_size: int | None = None,
) -> Path:
    """keys [N, d] (stored float16), values [N] (stored int32) -> a finished datastore folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = np.asarray(keys, dtype=np.float16)
    values = np.asarray(values, dtype=np.int32)
    n, d = keys.shape
    write_json(folder / CONFIG, {"test": True, "shard_rows": shard_rows})
    shards = []
    for s, start in enumerate(range(0, n, shard_rows)):
        end = min(start + shard_rows, n)
        shards.append(
            {
                "start": start,
                "end": end,
                "arrays": {
                    "keys": save_npy(folder / f"keys-{s:05d}.npy", keys[start:end]),
                    "values": save_npy(folder / f"values-{s:05d}.npy", values[start:end]),
                },
            }
        )
    write_manifest(
        folder,
        "datastore",
        {
            "model_id": model_id,
            "tokenizer_hash": tokenizer_hash,
            "layer": -1,
            "site": "ffn_input",
            "d": d,
            "vocab_size": int(vocab_size if vocab_size is not None else values.max() + 1),
            "n_rows": n,
            "split": "train",
            "shards": shards,
        },
    )
    return folder


def random_datastore(
    folder: Path, n: int = 2000, d: int = 16, vocab: int = 50, seed: int = 0, shard_rows: int = 700
) -> tuple[Path, np.ndarray, np.ndarray]:
    """Random clustered keys (so IVF has structure to find) and random values: (folder, keys f16, values)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d)) * 3
    keys = (centers[rng.integers(0, 20, n)] + rng.normal(size=(n, d))).astype(np.float16)
    values = rng.integers(0, vocab, n).astype(np.int32)
    return write_datastore(folder, keys, values, shard_rows=shard_rows, vocab_size=vocab), keys, values
