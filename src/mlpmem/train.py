"""Stage 6: train the MLP memory to imitate the retriever (offline, from stored hidden states).

Every corpus position is one example: input = the stored hidden state, targets =
its sparse kNN distribution and its next token. Positions are shuffled across the
whole corpus each epoch by a permutation that depends only on (seed, epoch), so
the batch of any step can be recomputed from the step number alone: that is what
makes resuming exact. The output folder holds ``memory/`` (the final memory),
``checkpoints/``, ``metrics.jsonl``, ``training_curve.png``, ``config.json`` and,
last, ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mlpmem import dist
from mlpmem.errors import MlpmemError
from mlpmem.interpolate import fit_lambda_em, interpolate_logprobs, perplexity
from mlpmem.losses import sparse_kd_loss
from mlpmem.manifest import ADDED_SETTINGS, check_disk_space, check_file, file_record, prepare_out, read_json, write_json, write_manifest
from mlpmem.memory import MemoryConfig, MemoryInput, MLPMemory, add_block_dropout, resolve_memory_input, init_from_lm, lm_settings, load_memory, save_memory
from mlpmem.store import Datastore
from mlpmem.targets import Targets

log = logging.getLogger(__name__)

# a folder trained before dropout existed ran without it (manifest.ADDED_SETTINGS; the lead may move this line there)
ADDED_SETTINGS.setdefault("memory", {}).setdefault("config.dropout", 0.0)

METRICS = "metrics.jsonl"
CKPT_DIR = "checkpoints"


@dataclass
class TrainConfig:
    """How to build and train a memory. d_in and vocab_size come from the datastore."""

    # architecture (see MemoryConfig)
    width: int | None = None
    n_blocks: int = 4
    expansion: int = 4
    activation: str = "gelu"
    norm: str = "layernorm"  # with init lm_copy the LM's final norm kind replaces it
    norm_eps: float = 1e-5
    # lm_copy (the best measured start, the default everywhere): the LM's final norm and head, on its last layer's
    # output, so the memory starts as the LM. It needs the LM: train_memory loads the datastore's model when none is
    # given. plain: a random start on the datastore's key; lm_head: the LM's head alone
    init: str = "lm_copy"
    freeze_head: bool = False
    zero_init_blocks: bool = True
    head_bias: bool = False
    # input: hidden states of this layer and site (None: the datastore's keys)
    input_layer: int | None = None
    input_site: str | None = None
    mode: str = "offline"  # offline: stored hidden states; online: the frozen LM recomputes them (less disk)
    # optimisation
    alpha: float = 0.5  # weight of KL(p_kNN || q); 1 - alpha on CE(next token)
    lr: float = 1e-3
    weight_decay: float = 0.0
    dropout: float = 0.0  # on each residual block's update, while training only (not part of the saved memory)
    warmup_frac: float = 0.1  # without warm-up the first runs here diverged after one step
    schedule: str = "cosine"  # cosine | linear decay after warm-up
    min_lr_frac: float = 0.0
    epochs: float = 3.0
    batch_size: int = 1024  # positions per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size / grad_accum positions each); same maths, less memory
    clip: float = 1.0  # max gradient norm; 0 = off
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; the loss is always float32)
    seed: int = 0
    eval_every: int = 500  # steps between validations (0: only at the end)
    ckpt_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    log_every: int = 20  # steps per averaged train record in metrics.jsonl
    # the final memory is the validation's best (interpolated perplexity when valid has the LM's
    # log-probs, else the loss), not the last step's; the manifest says which step was kept
    keep_best: bool = True
    patience: int = 0  # stop after this many validations in a row without a new best (0: never early)

    def problems(self) -> list[str]:
        """Every range or consistency problem, as "key: message" lines (empty when fine)."""
        from mlpmem.config import in_range, need, one_of, positive
        from mlpmem.memory import ACTIVATIONS, INITS, NORMS
        from mlpmem.models import SITES

        return (positive(self, "width", allow_none=True) + positive(self, "n_blocks", zero=True)
                + positive(self, "expansion", "norm_eps", "lr", "epochs", "batch_size", "grad_accum", "keep_last", "log_every")
                + positive(self, "weight_decay", "clip", "eval_every", "ckpt_every", "patience", zero=True) + in_range(self, "dropout", 0.0, 1.0, hi_open=True)
                + one_of(self, "activation", ACTIVATIONS) + one_of(self, "norm", NORMS) + one_of(self, "init", INITS)
                + one_of(self, "input_site", SITES, allow_none=True) + one_of(self, "schedule", ("cosine", "linear"))
                + one_of(self, "precision", ("auto", "fp32", "bf16")) + one_of(self, "mode", ("offline", "online"))
                + in_range(self, "alpha", 0.0, 1.0) + in_range(self, "warmup_frac", 0.0, 1.0, hi_open=True) + in_range(self, "min_lr_frac", 0.0, 1.0)
                + need(not (self.batch_size > 0 and self.grad_accum > 0) or self.batch_size % self.grad_accum == 0, "batch_size",
                       f"({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})"))

    def memory_input(self, key_layer: int, key_site: str, lm=None) -> MemoryInput:
        """What the memory reads, for a datastore keyed at (``key_layer``, ``key_site``): see memory.resolve_memory_input."""
        return resolve_memory_input(self.input_layer, self.input_site, self.init, self.mode, key_layer, key_site, lm)

    def memory_config(self, d_in: int, vocab_size: int) -> MemoryConfig:
        names = {f.name for f in dataclasses.fields(MemoryConfig)}
        return MemoryConfig(d_in=d_in, vocab_size=vocab_size, **{k: v for k, v in dataclasses.asdict(self).items() if k in names and k not in ("d_in", "vocab_size")})


# ----------------------------------------------------------------------------- data


class TrainData:
    """One datastore (input array + next tokens) with its optional kNN targets, row-aligned.

    ``layer`` is the memory's input as decided once (a :class:`MemoryInput`), or an input layer
    and ``site`` to decide it from (unset: the datastore's key).
    """

    def __init__(self, datastore_dir: Path, targets_dir: Path | None, layer: MemoryInput | int | None = None, site: str | None = None,
                 lm=None) -> None:
        self._open(datastore_dir, targets_dir)
        self.spec = _spec(self.ds, layer, site, "offline", lm)
        if self.spec.source != "stored":
            raise MlpmemError("TrainData reads stored hidden states, but this memory's input is recomputed", "use OnlineData")  # a bug
        if self.spec.array not in self.ds.names:
            raise MlpmemError(
                f"the datastore in {self.ds.folder} holds no hidden states of layer {self.spec.layer} ({self.spec.site}); it has {self.ds.names}",
                f"rebuild the datastore with extra site {self.spec.layer}:{self.spec.site}, or train on its keys",
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
        out = {"h": torch.from_numpy(self.ds.gather(self.input, idx)), "labels": torch.from_numpy(self.values[idx].astype(np.int64))}
        if self.targets is not None:
            out["ids"] = torch.from_numpy(self.targets.gather("ids", idx))
            out["probs"] = torch.from_numpy(self.targets.gather("probs", idx))
        return out


class OnlineData(TrainData):
    """Like TrainData, but the memory's input is recomputed by the frozen LM.

    For users short of disk: the datastore then needs only its keys (for the
    index) and values, not a stored copy of the memory's input. A batch runs the
    LM over the scoring windows that hold its rows (so the online schedule draws
    whole windows, see WindowSchedule).
    """

    def __init__(self, datastore_dir: Path, targets_dir: Path | None, layer: MemoryInput | int | None, site: str | None, lm) -> None:
        from mlpmem.corpus import Corpus, windows

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
        self.windows = windows(len(self.tokens), self.context - len(self.prefix), self.stride)  # as datastore.Extractor.windows
        self.site_obj = self.spec.read_site
        self._d = int(lm.config.get_text_config().hidden_size)

    @property
    def d_in(self) -> int:
        return self._d

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        from mlpmem.datastore import iter_batches

        idx = np.sort(idx)
        wins = np.unique(np.searchsorted(self.windows[:, 2], idx, side="right") - 1)
        rows, feats = [], []
        for w in wins:
            for b in iter_batches(self.lm, self.tokens, self.context, self.stride, {"h": self.site_obj}, 1, False, (int(w), int(w) + 1),
                                  prefix=self.prefix):
                rows.append(np.arange(b.row_start, b.row_end))
                feats.append(b.features["h"])
        pos = np.searchsorted(np.concatenate(rows), idx)
        out = {"h": torch.cat(feats)[torch.from_numpy(pos)].float(), "labels": torch.from_numpy(self.values[idx].astype(np.int64))}
        if self.targets is not None:
            out["ids"] = torch.from_numpy(self.targets.gather("ids", idx))
            out["probs"] = torch.from_numpy(self.targets.gather("probs", idx))
        return out


def _spec(ds: Datastore, layer: MemoryInput | int | None, site: str | None, mode: str, lm) -> MemoryInput:
    """The memory's input in ``ds``, read as ``mode`` says: ``layer`` as decided (a MemoryInput), or an explicit layer and site."""
    if isinstance(layer, MemoryInput):
        layer, site = layer.layer, layer.site
    return resolve_memory_input(layer, site, "plain", mode, ds.layer, ds.site, lm)


class Schedule:
    """Which rows and which learning rate each step uses: a pure function of the step."""

    def __init__(self, n_rows: int, cfg: TrainConfig) -> None:
        self.n, self.cfg = n_rows, cfg
        self.total = max(1, math.ceil(cfg.epochs * n_rows / cfg.batch_size))
        self.warmup = math.ceil(cfg.warmup_frac * self.total)
        self._perms: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 1:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def positions(self, step: int) -> int:
        return self.cfg.batch_size

    def rows(self, step: int) -> list[np.ndarray]:
        """Row ids of each micro-batch of ``step``. Batches run on across epoch ends, so all are full."""
        b = self.cfg.batch_size
        stream = np.arange(step * b, (step + 1) * b, dtype=np.int64)
        epochs, offsets = np.divmod(stream, self.n)
        ids = np.empty_like(stream)
        for e in np.unique(epochs):
            sel = epochs == e
            ids[sel] = self.perm(int(e))[offsets[sel]]
        return np.split(ids, self.cfg.grad_accum)

    def lr(self, step: int) -> float:
        cfg = self.cfg
        if step < self.warmup:
            return cfg.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * decay)


class WindowSchedule(Schedule):
    """Online mode: each step takes whole scoring windows (their kept rows), so
    every LM forward serves the batch in full. Windows are shuffled per epoch."""

    def __init__(self, windows: np.ndarray, n_rows: int, cfg: TrainConfig) -> None:
        self.spans = np.stack([windows[:, 2], np.append(windows[1:, 2], n_rows)], 1)  # kept rows [start, end) per window
        self.per_step = max(1, round(cfg.batch_size / float(np.mean(self.spans[:, 1] - self.spans[:, 0]))))
        super().__init__(len(windows), cfg)
        self.total = max(1, math.ceil(cfg.epochs * len(windows) / self.per_step))
        self.warmup = math.ceil(cfg.warmup_frac * self.total)

    def _windows(self, step: int) -> np.ndarray:
        stream = np.arange(step * self.per_step, (step + 1) * self.per_step, dtype=np.int64)
        epochs, offsets = np.divmod(stream, self.n)
        return np.array([self.perm(int(e))[o] for e, o in zip(epochs, offsets)])

    def positions(self, step: int) -> int:
        spans = self.spans[self._windows(step)]
        return int((spans[:, 1] - spans[:, 0]).sum())

    def rows(self, step: int) -> list[np.ndarray]:
        ids = np.concatenate([np.arange(a, b) for a, b in self.spans[self._windows(step)]])
        return np.array_split(ids, self.cfg.grad_accum)


# ----------------------------------------------------------------------------- model, optimizer, precision


def _require_lm(cfg: TrainConfig, lm) -> None:
    if cfg.init != "plain" and lm is None:
        raise MlpmemError(f"init {cfg.init!r} copies weights from the LM, but no LM was given", "pass the LM (init_lm), or use init 'plain'")


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
        raise MlpmemError(f"training needs the LM (init lm_copy / lm_head, online mode or a layer counted from the end), and the "
                          f"datastore's model {name!r} did not load: {e.problem}",
                          "pass the LM (init_lm= in Python, --model on the command line), or train without it: init plain (a random start, "
                          "usually worse) with mode offline and a non-negative input_layer")


def build_memory(cfg: TrainConfig, d_in: int, vocab_size: int, lm=None) -> MLPMemory:
    mcfg = cfg.memory_config(d_in, vocab_size)
    if cfg.init != "plain":
        _require_lm(cfg, lm)
        lm_vocab = int(lm.get_output_embeddings().weight.shape[0])
        if lm_vocab != vocab_size:
            raise MlpmemError(f"the LM has {lm_vocab} logits but the datastore says {vocab_size}", "use the LM the datastore was built with")
        mcfg = dataclasses.replace(mcfg, **lm_settings(lm, cfg.init))
    torch.manual_seed(cfg.seed)
    memory = MLPMemory(mcfg)
    if cfg.init != "plain":
        init_from_lm(memory, lm)
    return memory


def build_optimizer(memory: MLPMemory, cfg: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on norms and biases (the usual GPT recipe)
    params = [p for p in memory.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # on CPU bf16 autocast pays off only with native bf16 instructions (1.7x faster in
    # SPEC's runs); with AVX-512 alone oneDNN emulates it and a step was 2.6x slower here
    return device.type == "cpu" and cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(root: Path, step: int, memory: MLPMemory, opt: torch.optim.Optimizer, meta: dict, state: dict, keep_last: int) -> Path:
    """``root/step-XXXXXX/``: memory, optimizer tensors, RNG and step. Renamed into place when whole."""
    from safetensors.torch import save_file

    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_memory(tmp, memory, meta)
        sd = opt.state_dict()
        tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        # state.json last, with the size and hashes of the other files: a checkpoint is trusted only if they match
        files = [file_record(tmp, p) for p in sorted(tmp.rglob("*")) if p.is_file()]
        write_json(tmp / "state.json", {**state, "step": step, "param_groups": sd["param_groups"], "files": files})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full, interrupt) leaves no half checkpoint
        raise
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a .partial folder is an interrupted write)."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".partial") and (p / "state.json").exists()]
    return sorted(done, key=lambda p: p.name)  # step-XXXXXX: the name orders them, even if a state.json is damaged


def load_latest_checkpoint(root: Path, cfg: TrainConfig, device: torch.device) -> tuple[MLPMemory, torch.optim.Optimizer, dict, Path] | None:
    """The newest checkpoint that loads whole, or None. A damaged one (truncated or corrupted
    by a crash or a full disk) is skipped with a warning and the one before it is used."""
    for path in reversed(list_checkpoints(root)):
        try:
            memory, opt, state = load_checkpoint(path, cfg, device)
            return memory, opt, state, path
        except (MlpmemError, OSError, ValueError, KeyError, RuntimeError) as e:
            log.warning("checkpoint %s is damaged (%s); falling back to the one before it", path, getattr(e, "problem", e))
    return None


def load_checkpoint(path: Path, cfg: TrainConfig, device: torch.device) -> tuple[MLPMemory, torch.optim.Optimizer, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_json(path / "state.json")
    if not isinstance(state, dict) or "step" not in state:
        raise MlpmemError(f"{path / 'state.json'} is not a checkpoint state", "delete the checkpoint")
    for record in state.pop("files", []):  # checkpoints written before file records skip this
        check_file(path, record, False, f"delete {path}")
    memory, _ = load_memory(path)
    memory.to(device).train()
    opt = build_optimizer(memory, cfg)
    try:
        tensors = load_file(str(path / "optimizer.safetensors"))
    except SafetensorError as e:
        raise MlpmemError(f"{path / 'optimizer.safetensors'} is not readable ({e})", f"delete {path}")
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            per_param.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return memory, opt, state


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def evaluate(memory: MLPMemory, data: TrainData, alpha: float, device: torch.device, bf16: bool, batch_size: int = 1024) -> dict[str, float]:
    """KL and CE on held-out rows, memory-alone perplexity, and with ``lm_logprob`` stored,
    the LM's perplexity and the interpolated one at the EM-fitted lambda (fitted on these rows)."""
    memory.eval()
    lp_mem, kl_sum = [], 0.0
    for start in range(0, data.n, batch_size):
        b = data.batch(np.arange(start, min(start + batch_size, data.n)))
        with autocast(device, bf16):
            logits = memory(b["h"].to(device))
        logits = logits.float()
        labels = b["labels"].to(device)
        lp_mem.append((logits.gather(-1, labels[:, None])[:, 0] - torch.logsumexp(logits, -1)).double().cpu().numpy())
        if "ids" in b:
            _, parts = sparse_kd_loss(logits, b["ids"].to(device), b["probs"].to(device), labels, 1.0)
            kl_sum += parts["kl"].item() * len(labels)
    memory.train()
    lp = np.concatenate(lp_mem)
    out: dict[str, float] = {"ce": float(-lp.mean()), "ppl_memory": perplexity(lp)}
    if data.targets is not None:
        out["kl"] = kl_sum / data.n
        out["loss"] = alpha * out["kl"] + (1 - alpha) * out["ce"]
    if "lm_logprob" in data.ds.names:
        lp_lm = data.ds.load("lm_logprob").astype(np.float64)
        lam = fit_lambda_em(lp_lm, lp)
        out.update(ppl_lm=perplexity(lp_lm), **{"lambda": lam}, ppl_interp=perplexity(interpolate_logprobs(lp_lm, lp, lam)))
    return out


# ----------------------------------------------------------------------------- training


def train_memory(
    datastore_dir: Path,
    targets_dir: Path,
    out_dir: Path,
    cfg: TrainConfig,
    valid_datastore_dir: Path | None = None,
    valid_targets_dir: Path | None = None,
    init_lm=None,
    meta: dict[str, Any] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    on_step: Callable[[int, dict[str, float], MLPMemory], None] | None = None,
) -> Path:
    """Train a memory on a datastore and its kNN targets; returns ``out_dir``.

    The final memory is ``out_dir/memory`` (load it with ``load_memory``). A
    finished folder with the same config is returned as is; an interrupted one
    resumes from its newest complete checkpoint (``resume=False`` starts over).
    ``init_lm`` is the LM to copy the head (and final norm) from for init
    lm_head / lm_copy. ``on_step(step, {"loss", "kl", "ce", "lr", "grad_norm"}, memory)``
    is called after each optimizer step (step counts from 1); it may evaluate the
    memory (it is put back in train mode after).

    Under torchrun / accelerate launch training is data-parallel (DDP): every process
    takes its slice of each step's rows, gradients are averaged as if one process had
    seen them all, and rank 0 alone validates, writes metrics and checkpoints. A
    checkpoint holds no trace of the process count, so a run resumes with any count.
    """
    from mlpmem.config import validate

    out_dir = Path(out_dir)
    validate(cfg, "train")
    w = dist.init(device or "auto")
    dev = torch.device(dist.local_device(device) if device else (dist.local_device("cuda") if torch.cuda.is_available() else "cpu"))
    if init_lm is None and needs_lm(cfg):  # before the data: lm_copy's default input (the last layer) is found through the LM
        init_lm = load_datastore_lm(datastore_dir, dev)
    key = Datastore(datastore_dir)
    spec = cfg.memory_input(key.layer, key.site, init_lm)  # the one decision of what the memory reads; stored in its meta
    data = (OnlineData if cfg.mode == "online" else TrainData)(datastore_dir, targets_dir, spec, None, init_lm)
    valid = None
    if valid_datastore_dir is not None:
        try:
            valid = TrainData(valid_datastore_dir, valid_targets_dir, spec, None, init_lm)
        except MlpmemError:
            if cfg.mode != "online":
                raise
            valid = OnlineData(valid_datastore_dir, valid_targets_dir, spec, None, init_lm)
        valid.ds.check_model(data.ds.model_id, data.ds.tokenizer_hash, data.ds.layer, data.ds.site)
    resolved = {
        "config": cfg, "datastore": str(Path(datastore_dir).resolve()), "targets": str(Path(targets_dir).resolve()),
        "valid_datastore": str(Path(valid_datastore_dir).resolve()) if valid_datastore_dir else None,
        "valid_targets": str(Path(valid_targets_dir).resolve()) if valid_targets_dir else None,
        "input": {"layer": data.layer, "site": data.site, "array": data.input},
        "init_lm": getattr(getattr(init_lm, "config", None), "_name_or_path", None) if init_lm is not None else None,
    }

    def claim() -> str:
        if not (out_dir / "manifest.json").exists() or overwrite:
            with torch.device("meta"):  # the size only: no memory allocated
                n_params = MLPMemory(cfg.memory_config(data.d_in, data.ds.vocab_size)).num_parameters()
            # float32 weights + two AdamW moments per checkpoint, keep_last + 1 of them at a time, and the final memory
            check_disk_space(out_dir, n_params * 4 * (3 * (cfg.keep_last + 1) + 1), "memory checkpoints and the final memory",
                             "keep fewer checkpoints (keep_last), or train a smaller memory (width, n_blocks)")
        return prepare_out(out_dir, resolved, overwrite, kind="memory")

    if dist.on_main(claim) == "done":
        log.info("memory training in %s is already finished", out_dir)
        return out_dir
    from mlpmem.models import memory_base_fingerprint  # which base model the memory belongs to; refuses an LM that is not it

    mem_meta = {
        "model_id": data.ds.model_id, "tokenizer_hash": data.ds.tokenizer_hash, **data.spec.as_meta(),
        "model_fingerprint": memory_base_fingerprint(data.ds.model_id, data.ds.manifest.get("model_fingerprint"), init_lm, cfg.mode == "online"),
        "datastore": resolved["datastore"], "targets": resolved["targets"], **(meta or {}),
    }
    sched = WindowSchedule(data.windows, data.n, cfg) if cfg.mode == "online" else Schedule(data.n, cfg)
    bf16 = use_bf16(cfg.precision, dev)
    ckpt_root = out_dir / CKPT_DIR
    if not resume and w.main:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        (out_dir / METRICS).unlink(missing_ok=True)
    dist.barrier()
    loaded = load_latest_checkpoint(ckpt_root, cfg, dev)
    dist.barrier()  # every rank has read the checkpoint before rank 0 may write (and prune) newer ones
    if loaded is not None:
        memory, opt, state, path = loaded
        add_block_dropout(memory, cfg.dropout)
        if w.main:
            _truncate_metrics(out_dir / METRICS, state["step"])
        log.info("resuming memory training from %s", path)
    else:
        # no checkpoint: records of an interrupted earlier try would be written again
        if w.main:
            (out_dir / METRICS).unlink(missing_ok=True)
        memory = build_memory(cfg, data.d_in, data.ds.vocab_size, init_lm).to(dev)
        opt = build_optimizer(memory, cfg)
        add_block_dropout(memory, cfg.dropout)
        state = {"step": 0, "train_seconds": 0.0, "train_positions": 0}
        if valid is not None and w.main:
            # the start, so that a memory that ends worse than it began is seen (lambda would hide it)
            state["valid_start"] = evaluate(memory, valid, cfg.alpha, dev, bf16, cfg.batch_size // cfg.grad_accum)
            _append_metrics(out_dir, {"step": 0, "split": "valid", **state["valid_start"]})
    log.info("memory: %.2fM parameters, %d steps of %d positions (%.2f epochs of %d rows), %s", memory.num_parameters() / 1e6,
             sched.total, cfg.batch_size, sched.total * cfg.batch_size / data.n, data.n, "bf16 autocast" if bf16 else "fp32")
    last_valid = _train_loop(memory, opt, data, valid if w.main else None, sched, cfg, dev, bf16, state, out_dir, mem_meta, on_step)
    dist.barrier()
    dist.on_main(_finish, out_dir, memory, mem_meta, cfg, data, valid, sched, state, last_valid, bf16, dev)
    return out_dir


def _train_loop(memory, opt, data, valid, sched, cfg, dev, bf16, state, out_dir, mem_meta, on_step) -> dict | None:
    """The optimisation. ``valid`` is None on ranks other than 0: rank 0 alone validates and writes."""
    from tqdm.auto import tqdm

    w = dist.world()
    params = [p for p in memory.parameters() if p.requires_grad]
    model = memory
    if w.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(memory, device_ids=[dev.index] if dev.type == "cuda" else None)
    window: list[dict[str, float]] = state.get("window", [])  # steps since the last train record, so resumed records match
    last_valid = state.get("last_valid")
    bar = tqdm(total=sched.total, initial=state["step"], desc="train memory", unit="step", dynamic_ncols=True, disable=not w.main)
    memory.train()
    for step in range(state["step"], sched.total):
        t0 = time.perf_counter()
        lr = sched.lr(step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        sums = np.zeros(3)  # loss, kl, ce: this rank's share of the step's means
        micro = sched.rows(step)
        for i, all_rows in enumerate(micro):
            rows = rank_slice(all_rows, w)
            # DDP averages gradients over ranks: weighting each rank's mean by its share of the rows
            # makes that average the mean over all rows, as one process computes it
            share = len(rows) * w.size / len(all_rows) / cfg.grad_accum
            sync = nullcontext() if w.size == 1 or i == len(micro) - 1 else model.no_sync()
            with sync:
                b = data.batch(rows)
                with autocast(dev, bf16):
                    logits = model(b["h"].to(dev, non_blocking=True))
                loss, parts = sparse_kd_loss(logits, b["ids"].to(dev), b["probs"].to(dev), b["labels"].to(dev), cfg.alpha)
                (loss * share).backward()
            sums += np.array([loss.item(), parts["kl"].item(), parts["ce"].item()]) * share / w.size
        loss_sum, kl_sum, ce_sum = dist.all_sum(sums).tolist()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")))
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            bar.close()
            last = list_checkpoints(out_dir / CKPT_DIR)
            raise MlpmemError(
                f"the training loss or gradient became non-finite at step {step + 1} (loss {loss_sum}, gradient norm {grad_norm}, lr {lr:.2e}); "
                f"{'the last good checkpoint is ' + str(last[-1]) if last else 'no checkpoint was written yet'}",
                "lower lr, lengthen warmup_frac, keep clip at 1.0 or use precision fp32, then run again (it resumes from the last checkpoint; pass a new --out or --overwrite to restart with new settings)",
            )
        opt.step()
        state["step"] = step + 1
        state["train_seconds"] += time.perf_counter() - t0
        state["train_positions"] += sched.positions(step)
        rec = {"loss": loss_sum, "kl": kl_sum, "ce": ce_sum, "lr": lr, "grad_norm": grad_norm}
        window.append(rec)
        if on_step is not None and w.main:
            on_step(step + 1, rec, memory)
            memory.train()
        tps = state["train_positions"] / max(state["train_seconds"], 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:.0f}", refresh=False)
        done = state["step"] == sched.total
        if w.main and (state["step"] % cfg.log_every == 0 or done):
            _append_metrics(out_dir, {"step": state["step"], "split": "train", **{k: float(np.mean([w[k] for w in window])) for k in rec}, "tokens_per_s": tps})
            window = []
        eval_now = done or bool(cfg.eval_every and state["step"] % cfg.eval_every == 0)
        stop = False
        if valid is not None and eval_now:
            last_valid = evaluate(memory, valid, cfg.alpha, dev, bf16, cfg.batch_size // cfg.grad_accum)
            _append_metrics(out_dir, {"step": state["step"], "split": "valid", **last_valid})
            log.debug("step %d valid %s", state["step"], last_valid)
            stop = _track_best(out_dir, memory, mem_meta, cfg, state, last_valid)
        if eval_now and cfg.patience and w.size > 1:
            stop = dist.broadcast_object(stop)  # rank 0 validates; every rank stops with it
        if stop and not done:
            state["stopped_early"] = state["step"]
            log.info("early stop at step %d: %d validations without a better memory (patience)", state["step"], cfg.patience)
            done = True
        if w.main and (done or (cfg.ckpt_every and state["step"] % cfg.ckpt_every == 0)):
            save_checkpoint(out_dir / CKPT_DIR, state["step"], memory, opt, mem_meta, dict(state, last_valid=last_valid, window=window), cfg.keep_last)
        if done:
            break
    bar.close()
    return last_valid


BEST = "best"  # OUT/best: the best memory so far (keep_best)


def valid_score(v: dict) -> tuple[str, float]:
    """What "better" means for a validation record: interpolated perplexity when there is one, else the loss (lower wins)."""
    for key in ("ppl_interp", "loss", "ce"):
        if key in v:
            return key, float(v[key])
    raise KeyError("a validation record without ppl_interp, loss or ce")


def _track_best(out_dir: Path, memory, mem_meta: dict, cfg: TrainConfig, state: dict, v: dict) -> bool:
    """Keep the best memory so far (as OUT/best) and count validations without one; True = stop (patience)."""
    key, value = valid_score(v)
    best = state.get("best")
    if best is None or value < best["value"]:
        state["best"] = {"step": state["step"], "by": key, "value": value, "valid": v}
        state["evals_since_best"] = 0
        if cfg.keep_best:
            save_memory(out_dir / BEST, memory, mem_meta)
    else:
        state["evals_since_best"] = state.get("evals_since_best", 0) + 1
    return bool(cfg.patience) and state["evals_since_best"] >= cfg.patience


def rank_slice(rows: np.ndarray, w) -> np.ndarray:
    """This process's contiguous part of a micro-batch's rows (sizes differ by at most one)."""
    return np.array_split(rows, w.size)[w.rank] if w.size > 1 else rows


def _finish(out_dir, memory, mem_meta, cfg, data, valid, sched, state, last_valid, bf16, dev) -> Path:
    if valid is not None and last_valid is None:  # resumed after the last step's checkpoint
        last_valid = evaluate(memory, valid, cfg.alpha, dev, bf16, cfg.batch_size // cfg.grad_accum)
    best = state.get("best")
    kept_valid = last_valid
    if cfg.keep_best and best and best["step"] != state["step"] and (out_dir / BEST).is_dir():
        memory, _ = load_memory(out_dir / BEST, device=dev)
        kept_valid = best["valid"]
        log.info("kept the memory of step %d (valid %s %.4g); the last step's (%d) had %.4g", best["step"], best["by"], best["value"],
                 state["step"], valid_score(last_valid)[1] if last_valid else float("nan"))
    save_memory(out_dir / "memory", memory, mem_meta)
    shutil.rmtree(out_dir / BEST, ignore_errors=True)
    plot_training_curve(read_metrics(out_dir / METRICS), out_dir / "training_curve.png", f"memory on {mem_meta['model_id']}")
    tps = state["train_positions"] / max(state["train_seconds"], 1e-9)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    files = [file_record(out_dir, p) for p in sorted((out_dir / "memory").iterdir()) if p.is_file()]
    write_manifest(out_dir, "memory", {
        **{k: mem_meta[k] for k in ("model_id", "tokenizer_hash", "layer", "site")}, "files": files,
        "memory": "memory", "memory_config": dataclasses.asdict(memory.config),
        "parameters": memory.num_parameters(), "trainable_parameters": memory.num_parameters(trainable_only=True),
        "steps": sched.total, "positions_seen": sched.total * cfg.batch_size, "epochs": sched.total * cfg.batch_size / data.n,
        "n_rows": data.n, "datastore": mem_meta["datastore"], "targets": mem_meta["targets"],
        "precision": "bf16" if bf16 else "fp32", "device": str(dev), "torch_threads": torch.get_num_threads(), "processes": dist.world().size,
        "tokens_per_s": tps, "peak_rss_mb": peak_rss_mb, "valid": kept_valid, "valid_start": state.get("valid_start"),
        "valid_last": last_valid, "kept_step": best["step"] if cfg.keep_best and best else state["step"],
        "kept_by": (best["by"] if best else None) if cfg.keep_best else "last step", "stopped_early": state.get("stopped_early"),
        "worse_than_start": worse_than_start(state.get("valid_start"), kept_valid),
    })
    start = state.get("valid_start")
    if worse_than_start(start, kept_valid):
        log.warning("the memory ended WORSE than it started on valid (memory-alone perplexity %.4g -> %.4g): training did not help, "
                    "whatever the fitted lambda shows; check lr, epochs and the targets", start["ppl_memory"], kept_valid["ppl_memory"])
    summary = ", ".join(f"{k} {v:.4g}" for k, v in (kept_valid or {}).items())
    log.info("memory trained: %d steps at %.0f tokens/s%s -> %s", sched.total, tps, f"; valid {summary}" if summary else "", out_dir / "memory")
    return out_dir


def worse_than_start(start: dict | None, end: dict | None) -> bool | None:
    """Did the memory end no better than it started on valid (memory-alone perplexity, step 0 against the kept memory)?
    None when valid was not scored. Lambda fitted on a worse memory goes to 0 and hides it: this says it."""
    if not start or not end or "ppl_memory" not in start or "ppl_memory" not in end:
        return None
    return bool(end["ppl_memory"] >= start["ppl_memory"])


def _append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from: those steps run again."""
    keep = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def plot_training_curve(metrics: list[dict], path: Path, title: str) -> Path:
    """Train loss (left axis) and valid perplexities (right axis, log scale) against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [r for r in metrics if r["split"] == "train"]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (alpha KL + (1 - alpha) CE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    valid = [r for r in metrics if r["split"] == "valid"]
    if valid:
        ax2 = ax.twinx()
        for key, color, label in (("ppl_memory", "tab:orange", "valid ppl, memory alone"), ("ppl_interp", "tab:green", "valid ppl, LM + memory"), ("ppl_lm", "tab:gray", "valid ppl, LM alone")):
            pts = [(r["step"], r[key]) for r in valid if key in r]
            if pts:
                ax2.plot(*zip(*pts), marker="o", ms=3, color=color, label=label, linestyle="--" if key == "ppl_lm" else "-")
        ax2.set_yscale("log")
        ax2.set_ylabel("valid perplexity")
        h2 = ax2.get_legend_handles_labels()
        handles = (handles[0] + h2[0], handles[1] + h2[1])
    ax.legend(*handles, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
