"""Training rows: stored hidden states (offline) or recomputed by the frozen LM (online), with their kNN targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mlpmem.errors import MlpmemError
from mlpmem.memory import MemoryInput, resolve_memory_input
from mlpmem.datastore import Datastore
from mlpmem.targets import Targets
from mlpmem.train.config import TrainConfig


class TrainData:
    """One datastore (input array + next tokens) with its optional kNN targets, row-aligned.

    ``layer`` is the memory's input as decided once (a :class:`MemoryInput`), or an input layer
    and ``site`` to decide it from (unset: the datastore's key).
    """

    def __init__(
        self, datastore_dir: Path, targets_dir: Path | None, layer: MemoryInput | int | None = None, site: str | None = None, lm=None
    ) -> None:
        self._open(datastore_dir, targets_dir)
        self.spec = _spec(self.ds, layer, site, "offline", lm)
        if self.spec.array not in self.ds.names:
            raise MlpmemError(
                f"the datastore in {self.ds.folder} holds no hidden states of layer {self.spec.layer} ({self.spec.site}); it has {self.ds.names}",
                f"train with mode online (the LM recomputes them: no rebuild, less disk), or rebuild the datastore with extra_sites "
                f"['{self.spec.layer}:{self.spec.site}'] (--extra-sites {self.spec.layer}:{self.spec.site}), or read its keys (input_layer "
                f"{self.ds.layer}, input_site {self.ds.site}; with init lm_copy the start is then no longer the LM's own head path)",
            )
        self.layer, self.site, self.input = self.spec.layer, self.spec.site, self.spec.array

    def _open(self, datastore_dir: Path, targets_dir: Path | None) -> None:
        self.ds = Datastore(datastore_dir)
        self.n = self.ds.n_rows
        self.values = self.ds.values()  # [N] int32, small enough to keep in memory
        self.targets = Targets(targets_dir) if targets_dir is not None else None
        if self.targets is not None:
            self.targets.check_aligned(self.ds)

    @property
    def d_in(self) -> int:
        return int(self.ds.shards(self.input)[0].shape[1])

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``idx`` [b] -> h [b, d] float16, labels [b], and ids/probs [b, M] if there are targets."""
        idx = np.sort(idx)  # sorted reads are kinder to memory maps; a batch is a bag of rows
        out = {"h": self.features(idx), "labels": torch.from_numpy(self.values[idx].astype(np.int64))}
        if self.targets is not None:
            out["ids"] = torch.from_numpy(self.targets.gather("ids", idx))
            out["probs"] = torch.from_numpy(self.targets.gather("probs", idx))
        return out

    def features(self, idx: np.ndarray) -> torch.Tensor:
        """The memory's input at rows ``idx`` (sorted), as stored."""
        return torch.from_numpy(self.ds.gather(self.input, idx))


class OnlineData(TrainData):
    """Like TrainData, but the memory's input is recomputed by the frozen LM.

    For users short of disk: the datastore then needs only its keys (for the
    index) and values, not a stored copy of the memory's input. A batch runs the
    LM over the scoring windows that hold its rows (so the online schedule draws
    whole windows, see WindowSchedule).
    """

    def __init__(self, datastore_dir: Path, targets_dir: Path | None, layer: MemoryInput | int | None, site: str | None, lm) -> None:
        from mlpmem.corpus import Corpus
        from mlpmem.datastore import RecomputeExtractor

        if lm is None:
            raise MlpmemError("online training recomputes hidden states and needs the LM", "pass the LM (init_lm / --model)")
        self._open(datastore_dir, targets_dir)
        self.spec = _spec(self.ds, layer, site, "online", lm)
        self.layer, self.site, self.input = self.spec.layer, self.spec.site, "online"
        m = self.ds.manifest
        self.lm, self.context, self.stride, self.prefix = lm, int(m["context"]), int(m["stride"]), tuple(m.get("prefix", []))
        self.tokens = Corpus(m["corpus"]).tokens(m["split"])
        if len(self.tokens) - 1 != self.n:
            raise MlpmemError(f"the corpus in {m['corpus']} no longer matches the datastore in {self.ds.folder}", "rebuild the datastore")
        # A batch's windows go through the LM together, as many per forward as the datastore was extracted
        # with (the size chosen for this device): one window per forward leaves a GPU mostly idle. On a CPU
        # it is the same work either way (4 windows of 512 on 1 thread: no faster together).
        self.extractor = RecomputeExtractor(lm, self.context, self.stride, int(m.get("windows_per_batch", 8)), self.prefix)
        self.windows, self.tok_t = self.extractor.windows(len(self.tokens)), torch.from_numpy(self.tokens.astype(np.int64))
        self.site_obj = self.spec.read_site
        self._d = int(lm.config.get_text_config().hidden_size)

    @property
    def d_in(self) -> int:
        return self._d

    def features(self, idx: np.ndarray) -> torch.Tensor:
        """The LM's hidden states at rows ``idx`` (sorted), recomputed over the windows that keep them."""
        W = self.windows[np.unique(np.searchsorted(self.windows[:, 2], idx, side="right") - 1)]
        rows = np.concatenate([np.arange(k, min(e, self.n)) for _, e, k in W])  # in the order the extractor returns them
        return self.extractor.features(self.tok_t, W, {"h": self.site_obj})["h"][torch.from_numpy(np.searchsorted(rows, idx))].float()


def _spec(ds: Datastore, layer: MemoryInput | int | None, site: str | None, mode: str, lm) -> MemoryInput:
    """The memory's input in ``ds``, read as ``mode`` says: ``layer`` as decided (a MemoryInput), or an explicit layer and site."""
    if isinstance(layer, MemoryInput):
        layer, site = layer.layer, layer.site
    return resolve_memory_input(layer, site, "plain", mode, ds.layer, ds.site, lm)


def needs_lm(cfg: TrainConfig) -> bool:
    """Does training with ``cfg`` need the LM (to copy its head, recompute hidden states, or count layers from the end)?"""
    return cfg.init != "plain" or cfg.mode == "online" or (cfg.input_layer is not None and cfg.input_layer < 0)


def load_datastore_lm(datastore_dir: Path, device: str | torch.device = "cpu", dtype: str | None = None, model: str | None = None):
    """The LM a datastore was built with (its manifest's model, in its dtype), or ``model`` instead."""
    from mlpmem.models import load_model

    ds = Datastore(datastore_dir)
    name = model or ds.model_id
    try:
        return load_model(name, dtype or ds.manifest.get("dtype", "float32"), device)[0]
    except MlpmemError as e:
        raise MlpmemError(
            f"training needs the LM (init lm_copy / lm_head, online mode or a layer counted from the end), and the "
            f"datastore's model {name!r} did not load: {e.problem}",
            "pass the LM (init_lm= in Python, --model on the command line), or train without it: init plain (a random start, "
            "usually worse) with mode offline and a non-negative input_layer",
        )
