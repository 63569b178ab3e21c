"""kNN-LM as a component: a FAISS index + the datastore's next tokens + k and T, as a torch module.

``KNNRetriever(h)`` maps hidden states read at the datastore's site (the kNN-LM
key, e.g. the last layer's ``ffn_input``) to the kNN-LM distribution over the
vocabulary, as float32 log-probabilities [..., V]:

    p_kNN(w) = sum over the k nearest keys j whose next token is w of softmax(-d_j / T)

It has the interface of a memory in the model class (``returns_logprobs = True``,
a ``meta`` dict with ``layer``, ``site``, ``tokenizer_hash``, the base model), so
LM + kNN-LM, LM + memory and LM + both can run side by side in ``generate`` and
lm-eval. The search is the evaluator's own (``evaluate.search_neighbours``) and the weights
are the targets' ``knn_weights``; tests/test_retrieval.py checks the result against
a naive loop and against the evaluator's per-token kNN-LM perplexity.

Tokens that no neighbour has get log 0 = -inf. Mixing with the LM by
``logaddexp(log(1 - lambda) + lp_LM, log(lambda) + lp_kNN)`` (interpolate.interpolate_logprobs,
torch.logaddexp) is safe with them: logaddexp(x, -inf) = x exactly, never NaN, so for
lambda < 1 every token keeps the LM's share. At lambda = 1 (kNN alone) those tokens are
impossible, as in the kNN-LM definition. A row whose search found no neighbour at all
(only an approximate index can miss every hit) is all -inf: mixed, it holds the LM's
1 - lambda alone, which generation renormalises (it decodes with the LM) and perplexity
counts as kNN giving the token 0; at lambda = 1 it has no valid token.

Nothing is trained and nothing is stored in safetensors: the module has no
parameters or buffers (state_dict is empty). Saving keeps a reference instead
(``meta``: the run, datastore and index paths and their manifests' hashes, k, T);
:meth:`KNNRetriever.from_reference` opens the same folders and refuses them if
their manifests changed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlpmem.errors import MlpmemError

log = logging.getLogger(__name__)

REFERENCE_FILE = "knn_retriever.json"
KIND = "knn"


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) <= 0:
        raise MlpmemError(f"k must be a positive number of neighbours, got {k!r}", "pass e.g. k=1024 (the run's k is in knn.json)")
    return int(k)


def check_temperature(t: Any) -> float:
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise MlpmemError(f"the kNN temperature must be a number, got {t!r}", "pass the temperature tuned on valid (the run's knn.json)")
    if not (math.isfinite(t) and t > 0):  # also refuses NaN
        raise MlpmemError(
            f"the kNN temperature must be positive and finite, got {t}", "pass the temperature tuned on valid (the run's knn.json)"
        )
    return t


def knn_logprobs(
    sq_dists: np.ndarray, neighbour_values: np.ndarray, temperature: float, vocab_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Full kNN-LM log-probs: [q, k] squared distances and next tokens -> float32 [q, V].

    Missing hits (value < 0 or distance +inf) carry no weight; weights softmax(-d / T)
    over the rest (``targets.knn_weights``, float64), summed per token in float64.
    Tokens no neighbour has, and every token of a row with no neighbour, get -inf.
    """
    from mlpmem.targets import knn_weights, sum_per_token

    vals = np.asarray(neighbour_values, dtype=np.int64)
    valid = vals >= 0
    d = np.where(valid, np.asarray(sq_dists, dtype=np.float64), np.inf)  # the evaluator's "valid": value >= 0 and finite
    w = knn_weights(d, check_temperature(temperature))  # [q, k] float64, zero where missing
    # sum per token in [q, k], then write log(total) once per token: cheaper than a [q, V]
    # scatter-add followed by a log over all V (the log dominated, measured)
    sv, agg = sum_per_token(np.where(valid, vals, 0), w)  # a missing hit adds 0 to token 0
    rows, slots = np.nonzero(agg > 0)
    out = torch.full((vals.shape[0], vocab_size), -math.inf, dtype=torch.float32, device=device)
    at = (torch.from_numpy(rows).to(out.device), torch.from_numpy(sv[rows, slots]).to(out.device))
    out[at] = torch.from_numpy(np.log(agg[rows, slots]).astype(np.float32)).to(out.device)
    return out


class KNNRetriever(nn.Module):
    """kNN-LM next-token distribution from a FAISS index over a datastore; no trainable parameters.

    ``index``: an opened :class:`mlpmem.index.KnnIndex`; ``values``: the datastore's
    next tokens int [N] (a memory map is fine); ``vocab_size``: the LM's logits size
    (the datastore records it); ``meta``: what the model class reads (see :meth:`from_run`).
    """

    returns_logprobs = True

    def __init__(self, index, values: np.ndarray, k: int, temperature: float, vocab_size: int, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.index = index
        self.values = values
        self.k = check_k(k)
        self.temperature = check_temperature(temperature)
        self.vocab_size = int(vocab_size)
        self.d = int(index.d)
        if self.k > index.n_rows:
            raise MlpmemError(f"k={self.k} neighbours asked for, but the datastore has {index.n_rows} rows", f"use k <= {index.n_rows}")
        if len(values) != index.n_rows:
            raise MlpmemError(
                f"{len(values)} values for an index of {index.n_rows} keys", "pass the values of the datastore the index was built from"
            )
        if len(values) and int(np.max(values)) >= self.vocab_size:
            raise MlpmemError(
                f"the datastore holds token {int(np.max(values))}, outside a vocabulary of {self.vocab_size}",
                "pass the vocab_size of the LM the datastore was built with",
            )
        self.meta: dict[str, Any] = {
            **(meta or {}),
            "kind": KIND,
            "k": self.k,
            "temperature": self.temperature,
            "d": self.d,
            "vocab_size": self.vocab_size,
        }

    @property
    def d_in(self) -> int:
        """Size of the hidden states it reads (the index's dimension), as an MLP memory's ``config.d_in``."""
        return self.d

    def num_parameters(self, trainable_only: bool = False) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"k={self.k}, temperature={self.temperature:g}, n={self.index.n_rows}, d={self.d}, V={self.vocab_size}, index={self.meta.get('index_kind')}"

    def search(self, h: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """h [q, d] -> squared distances float32 [q, k] and next tokens int32 [q, k] (-1: missing); the evaluator's search."""
        from mlpmem.evaluate import search_neighbours

        return search_neighbours(self.index, h.detach().float().cpu().numpy(), self.k, self.values)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] (any float dtype, any device) -> float32 log p_kNN [..., V] on h's device."""
        if h.shape[-1] != self.d:
            raise MlpmemError(
                f"the kNN index holds {self.d}-dim keys but got hidden states of size {h.shape[-1]}",
                f"read the LM at the datastore's site (layer {self.meta.get('layer')}, {self.meta.get('site')}) of the model it was built with",
            )
        flat = h.reshape(-1, self.d)
        if flat.shape[0] == 0:
            return torch.empty(*h.shape[:-1], self.vocab_size, dtype=torch.float32, device=h.device)
        dists, vals = self.search(flat)
        return knn_logprobs(dists, vals, self.temperature, self.vocab_size, device=h.device).reshape(*h.shape[:-1], self.vocab_size)

    # ------------------------------------------------------------------ the LM it serves

    def check_lm(self, lm: nn.Module, tokenizer: Any = None) -> None:
        """Refuse an LM whose hidden size, logits size, layers, tokenizer (hash) or weights (fingerprint) are not the datastore's."""
        from mlpmem.models import check_fingerprint, logits_size, tokenizer_hash

        name = str(getattr(lm.config, "name_or_path", "") or type(lm).__name__)
        fix = f"use the model the datastore was built with ({self.meta.get('model_id')!r}), or build a datastore and index with this model"
        cfg = lm.config.get_text_config()
        if int(cfg.hidden_size) != self.d:
            raise MlpmemError(f"the kNN index holds {self.d}-dim keys but {name} has hidden size {cfg.hidden_size}", fix)
        if logits_size(lm) != self.vocab_size:
            raise MlpmemError(f"the datastore was built for {self.vocab_size} logits but {name} outputs {logits_size(lm)}", fix)
        layer = self.meta.get("layer")
        if layer is not None and not int(layer) < int(cfg.num_hidden_layers):
            raise MlpmemError(f"the datastore's keys come from layer {layer}, but {name} has {cfg.num_hidden_layers} layers", fix)
        want = self.meta.get("tokenizer_hash")
        if tokenizer is not None and want and tokenizer_hash(tokenizer) != want:
            raise MlpmemError(
                f"the tokenizer of {name} (hash {tokenizer_hash(tokenizer)}) is not the datastore's ({want}, model {self.meta.get('model_id')!r})",
                fix,
            )
        if not self.meta.get("model_fingerprint"):  # datastores written before fingerprints were kept
            log.warning(
                "the kNN datastore in %s records no fingerprint of its model: %s is checked by sizes and tokenizer only, not by its weights",
                self.meta.get("datastore"),
                name,
            )
            return
        check_fingerprint(
            self.meta["model_fingerprint"],
            lm,
            expected_name=str(self.meta.get("model_id")),
            model_name=name,
            fix=fix,
            what="the kNN datastore was built with",
        )

    # ------------------------------------------------------------------ building and saving by reference

    @classmethod
    def from_folders(
        cls,
        datastore_dir: str | Path,
        index_dir: str | Path,
        k: int,
        temperature: float,
        index_device: str = "cpu",
        run_dir: str | Path | None = None,
        extra_meta: dict[str, Any] | None = None,
    ) -> "KNNRetriever":
        """Open a datastore and the index built over it (``index.KnnIndex.open``, on ``index_device``)."""
        from mlpmem.index import KnnIndex
        from mlpmem.files import MANIFEST, sha256_file
        from mlpmem.datastore import Datastore

        k, temperature = check_k(k), check_temperature(temperature)
        datastore_dir, index_dir = Path(datastore_dir).resolve(), Path(index_dir).resolve()
        for what, folder in (("datastore", datastore_dir), ("index", index_dir)):
            if not (folder / MANIFEST).is_file():
                raise MlpmemError(
                    f"no finished kNN {what} in {folder}",
                    f"build it first (`mlpmem run` or `mlpmem {what}`), or pass the folder of a finished run",
                )
        ds = Datastore(datastore_dir)
        index = KnnIndex.open(index_dir, ds, device=index_device)
        m = ds.manifest
        meta = {
            **(extra_meta or {}),
            "layer": ds.layer,
            "site": ds.site,
            "model_id": ds.model_id,
            "model": (extra_meta or {}).get("model") or ds.model_id,
            "tokenizer_hash": ds.tokenizer_hash,
            "model_fingerprint": m.get("model_fingerprint"),
            "index_kind": index.manifest.get("factory"),
            "n_datastore": ds.n_rows,
            "run": str(Path(run_dir).resolve()) if run_dir is not None else None,
            "datastore": str(datastore_dir),
            "index": str(index_dir),
            "datastore_manifest_sha256": sha256_file(datastore_dir / MANIFEST),
            "index_manifest_sha256": sha256_file(index_dir / MANIFEST),
            "index_device": index_device,
        }
        return cls(index, ds.values(), k, temperature, ds.vocab_size, meta)

    @classmethod
    def from_run(
        cls, run_dir: str | Path, k: int | None = None, temperature: float | None = None, index_device: str = "cpu"
    ) -> "KNNRetriever":
        """From a pipeline run folder (RUN/datastore, RUN/index): k and T as the run's evaluation chose them.

        T and lambda come from RUN/knn.json (tuned on valid), else RUN/report.json; k from
        knn.json's config, report.json or recipe.json. Explicit ``k`` / ``temperature`` win.
        ``meta["lambda"]`` is the run's kNN-LM lambda (None if it has none).
        """
        run = Path(run_dir)
        if not run.is_dir():
            raise MlpmemError(f"the run folder {run} does not exist", "pass the --out folder of `mlpmem run`")
        s = run_settings(run)
        if temperature is None:
            if s["temperature"] is None:
                raise MlpmemError(
                    f"{run} records no kNN temperature (no knn.json or report.json)", "finish the run's kNN-LM stage, or pass temperature=T"
                )
            temperature = s["temperature"]
        k = s["k"] if k is None else k
        if k is None:
            raise MlpmemError(f"{run} records no k (no knn.json, report.json or recipe.json)", "pass k=")
        return cls.from_folders(
            run / "datastore",
            run / "index",
            k,
            temperature,
            index_device,
            run_dir=run,
            extra_meta={"lambda": s["lambda"], "settings_from": s["source"], "model": s["model"]},
        )

    @classmethod
    def from_reference(cls, ref: dict[str, Any], index_device: str | None = None) -> "KNNRetriever":
        """Rebuild from a saved ``meta``: the same folders, refused if their manifests changed since."""
        from mlpmem.files import MANIFEST, sha256_file

        for key in ("datastore", "index", "k", "temperature"):
            if ref.get(key) is None:
                raise MlpmemError(f"the kNN reference has no {key!r}", "save the retriever again (KNNRetriever.save)")
        for what in ("datastore", "index"):
            path = Path(ref[what]) / MANIFEST
            want = ref.get(f"{what}_manifest_sha256")
            if not path.is_file():
                raise MlpmemError(
                    f"the kNN {what} referenced at {ref[what]} is gone", f"restore {ref[what]}, or rebuild the retriever from its run"
                )
            if want and sha256_file(path) != want:
                raise MlpmemError(
                    f"the kNN {what} in {ref[what]} changed since the retriever was saved (its manifest hash differs)",
                    "rebuild the retriever from the run (KNNRetriever.from_run), and re-tune T and lambda if the data changed",
                )
        keep = {key: v for key, v in ref.items() if key in ("lambda", "settings_from", "model")}
        return cls.from_folders(
            ref["datastore"],
            ref["index"],
            ref["k"],
            ref["temperature"],
            index_device or ref.get("index_device") or "cpu",
            run_dir=ref.get("run"),
            extra_meta=keep,
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/knn_retriever.json``: the reference (paths, manifest hashes, k, T), never the index."""
        from mlpmem.files import write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / REFERENCE_FILE, self.meta)
        return folder / REFERENCE_FILE

    @classmethod
    def load(cls, folder: str | Path, index_device: str | None = None) -> "KNNRetriever":
        from mlpmem.files import read_json

        path = Path(folder) / REFERENCE_FILE
        if not path.is_file():
            raise MlpmemError(f"{folder} holds no {REFERENCE_FILE}", "pass a folder written by KNNRetriever.save")
        return cls.from_reference(read_json(path), index_device)


def run_settings(run: Path) -> dict[str, Any]:
    """k, T and lambda of a run's kNN-LM as its evaluation chose them: knn.json, then report.json, then recipe.json (and the recipe's model name)."""
    from mlpmem.files import read_json

    def read(name: str) -> dict:
        try:
            data = read_json(run / name) if (run / name).is_file() else {}
        except (OSError, ValueError) as e:
            raise MlpmemError(f"{run / name} is not readable JSON ({e})", "rerun the pipeline stage that writes it")
        return data if isinstance(data, dict) else {}

    knn, report, recipe = read("knn.json"), read("report.json"), read("recipe.json")
    out: dict[str, Any] = {"k": None, "temperature": None, "lambda": None, "source": None, "model": recipe.get("model")}
    if knn.get("temperature") is not None:
        out.update(temperature=knn["temperature"], source="knn.json")
        out["lambda"] = knn.get("lambda")
        out["k"] = ((knn.get("key") or {}).get("config") or {}).get("k")
    elif report.get("knn_temperature") is not None:
        out.update(temperature=report["knn_temperature"], source="report.json")
        out["lambda"] = (report.get("lambda") or {}).get("knn_lm")
    if out["k"] is None:
        out["k"] = report.get("k", (recipe.get("knn") or {}).get("k"))
    return out


def knn_component(
    run_dir: str | Path,
    lm: nn.Module | None = None,
    tokenizer: Any = None,
    k: int | None = None,
    temperature: float | None = None,
    index_device: str = "cpu",
) -> KNNRetriever:
    """A :class:`KNNRetriever` from a run folder, checked against ``lm`` / ``tokenizer`` when given (lm-eval's ``knn=RUN_DIR``)."""
    retriever = KNNRetriever.from_run(run_dir, k=k, temperature=temperature, index_device=index_device)
    if lm is not None:
        retriever.check_lm(lm, tokenizer)
    elif tokenizer is not None:
        from mlpmem.models import tokenizer_hash

        if tokenizer_hash(tokenizer) != retriever.meta["tokenizer_hash"]:
            raise MlpmemError(
                f"the tokenizer (hash {tokenizer_hash(tokenizer)}) is not the one of the datastore in {run_dir} ({retriever.meta['tokenizer_hash']})",
                "use the model the datastore was built with",
            )
    return retriever
