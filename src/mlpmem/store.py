"""Read access to sharded, row-aligned arrays (the datastore and the kNN targets).

A sharded stage lists its shards in its manifest as
``{"start": int, "end": int, "arrays": {name: file record}}``; rows of every
array in a shard are global rows ``start..end-1``. Several processes can each
write their own shards; one manifest then lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mlpmem.errors import MlpmemError
from mlpmem.manifest import MANIFEST, load_npy, read_manifest


class ShardedArrays:
    """Row-aligned arrays split into shards, opened as memory maps."""

    # arrays whose files must all be there (others may have been removed as a whole: ``absent``)
    REQUIRED: tuple[str, ...] = ()

    def __init__(self, folder: Path, kind: str, verify: bool = False) -> None:
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = read_manifest(self.folder, kind)
        self.starts = np.array([s["start"] for s in self.manifest["shards"]], dtype=np.int64)
        self.ends = np.array([s["end"] for s in self.manifest["shards"]], dtype=np.int64)
        self.n_rows = int(self.manifest["n_rows"])
        if len(self.starts) == 0 or self.starts[0] != 0 or self.ends[-1] != self.n_rows or np.any(self.starts[1:] != self.ends[:-1]):
            raise MlpmemError(
                f"the shards listed in {self.folder}/manifest.json do not cover rows 0..{self.n_rows} contiguously",
                f"delete {self.folder} and run the stage again",
            )
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._resident: dict[str, np.ndarray] = {}
        # an array whose files are *all* gone was removed on purpose (e.g. the keys, once an index
        # that needs none and the targets are built): the rest stays readable. One missing shard is damage.
        self.absent = sorted(
            name
            for name in {n for s in self.manifest["shards"] for n in s["arrays"]}
            if name not in self.REQUIRED
            and not any((self.folder / s["arrays"][name]["file"]).exists() for s in self.manifest["shards"] if name in s["arrays"])
        )
        for shard in self.manifest["shards"]:
            for name, record in shard["arrays"].items():
                if name in self.absent:
                    continue
                arr = load_npy(self.folder, record, verify=verify)
                if arr.shape[0] != shard["end"] - shard["start"]:
                    raise MlpmemError(
                        f"{self.folder / record['file']} has {arr.shape[0]} rows, its shard covers {shard['end'] - shard['start']}",
                        f"delete {self.folder} and run the stage again",
                    )
                self._arrays.setdefault(name, []).append(arr)

    def removed_for(self, name: str, out_dir: Path, overwrite: bool) -> bool:
        """Whether array ``name`` was removed while a stage writing ``out_dir`` still has to read it.
        A finished stage (its manifest there, not overwritten) is not rebuilt, so it stays done
        without the array (the keys, once index.keep_keys: false removed them)."""
        return name in self.absent and (overwrite or not (Path(out_dir) / MANIFEST).exists())

    @property
    def names(self) -> list[str]:
        return list(self._arrays)

    def shards(self, name: str) -> list[np.ndarray]:
        if name in self.absent:
            raise MlpmemError(
                f"the {name!r} files of {self.folder} were removed",
                f"rebuild {self.folder}, or (for the keys) search with an index that reads none (rerank: false, not kind keys)",
            )
        if name not in self._arrays:
            raise MlpmemError(
                f"{self.folder} has no array named {name!r} (it has {self.names})", "rebuild it with the setting that stores it"
            )
        return self._arrays[name]

    def load(self, name: str) -> np.ndarray:
        """The whole array in memory (for small arrays such as values)."""
        return np.concatenate([np.asarray(a) for a in self.shards(name)])

    def iter_blocks(self, name: str, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, block)`` over the array in order, ``block_rows`` at most."""
        for start, arr in zip(self.starts, self.shards(name)):
            for i in range(0, arr.shape[0], block_rows):
                yield int(start + i), np.asarray(arr[i : i + block_rows])

    def rows(self, name: str, start: int, end: int) -> np.ndarray:
        """Rows ``start..end-1`` (may span shards)."""
        out = []
        for s, e, arr in zip(self.starts, self.ends, self.shards(name)):
            lo, hi = max(start, s), min(end, e)
            if lo < hi:
                out.append(np.asarray(arr[lo - s : hi - s]))
        return np.concatenate(out) if out else np.empty((0,) + self.shards(name)[0].shape[1:], self.shards(name)[0].dtype)

    RESIDENT_BYTES = 2 << 30

    def gather(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows by global id, any shape of ``ids``: returns ``ids.shape + row shape``."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.n_rows):
            raise IndexError(f"row ids out of range 0..{self.n_rows - 1}")
        # random reads from a memory map cost a page fault each; an array that fits
        # comfortably in RAM is read once and gathered from memory (many times faster)
        if name not in self._resident and sum(a.nbytes for a in self.shards(name)) <= self.RESIDENT_BYTES:
            self._resident[name] = self.load(name)
        if name in self._resident:
            return self._resident[name][ids]
        shard_of = np.searchsorted(self.starts, flat, side="right") - 1
        first = self.shards(name)[0]
        out = np.empty((flat.size,) + first.shape[1:], dtype=first.dtype)
        for s in np.unique(shard_of):
            sel = shard_of == s
            local = flat[sel] - self.starts[s]
            order = np.argsort(local)  # sorted reads are much kinder to a memory map
            out_idx = np.nonzero(sel)[0][order]
            out[out_idx] = self.shards(name)[s][local[order]]
        return out.reshape(ids.shape + first.shape[1:])


class Datastore(ShardedArrays):
    """The (key -> next token) datastore: arrays ``keys`` [N, d] float16 and ``values`` [N] int32."""

    REQUIRED = ("values",)

    def __init__(self, folder: Path, verify: bool = False) -> None:
        super().__init__(folder, "datastore", verify=verify)
        m = self.manifest
        self.d = int(m["d"])
        self.layer = int(m["layer"])
        self.site = str(m["site"])
        self.model_id = str(m["model_id"])
        self.tokenizer_hash = str(m["tokenizer_hash"])
        self.vocab_size = int(m["vocab_size"])

    def values(self) -> np.ndarray:
        return self.load("values")

    def check_model(self, model_id: str, tokenizer_hash: str, layer: int | None = None, site: str | None = None) -> None:
        """Refuse a datastore built with another model or tokenizer than the one in use."""
        if tokenizer_hash != self.tokenizer_hash:
            raise MlpmemError(
                f"the datastore in {self.folder} was built with the tokenizer of {self.model_id!r}, which differs from the tokenizer of {model_id!r}",
                "use the same model as the datastore, or build a new datastore with this model",
            )
        if model_id != self.model_id:
            raise MlpmemError(
                f"the datastore in {self.folder} was built with model {self.model_id!r}, not {model_id!r}",
                "use the same model as the datastore, or build a new datastore with this model",
            )
        if layer is not None and (layer, site) != (self.layer, self.site):
            raise MlpmemError(
                f"the datastore in {self.folder} holds keys from layer {self.layer} ({self.site}), not layer {layer} ({site})",
                "use the datastore's layer, or build a new datastore for this layer",
            )


def feature_name(layer: int, site: str) -> str:
    """Name of an extra hidden-state array in a datastore, e.g. ``h29.output``."""
    return f"h{layer}.{site}"
