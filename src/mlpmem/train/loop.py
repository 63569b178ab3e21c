"""The training loop: validation, best-memory keeping, early stopping and :func:`train_memory` (see the package docstring)."""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mlpmem import dist
from mlpmem.errors import MlpmemError
from mlpmem.interpolate import fit_lambda_em, interpolate_logprobs, perplexity
from mlpmem.losses import sparse_kd_loss
from mlpmem.files import check_disk_space, file_record
from mlpmem.folders import prepare_out
from mlpmem.manifest import write_manifest
from mlpmem.memory import MLPMemory, add_block_dropout, load_memory, save_memory
from mlpmem.datastore import Datastore
from mlpmem.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from mlpmem.train.config import TrainConfig
from mlpmem.train.data import OnlineData, TrainData, load_datastore_lm, needs_lm
from mlpmem.train.metrics import METRICS, append_metrics, plot_training_curve, read_metrics, truncate_metrics
from mlpmem.train.model import autocast, build_memory, build_optimizer, use_bf16
from mlpmem.train.schedule import Schedule, WindowSchedule

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"


@torch.no_grad()
def evaluate(
    memory: MLPMemory, data: TrainData, alpha: float, device: torch.device, bf16: bool, batch_size: int = 1024
) -> dict[str, float]:
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
    from mlpmem.typed_config import validate

    out_dir = Path(out_dir)
    validate(cfg, "train")
    w = dist.init(device or "auto")
    dev = torch.device(dist.local_device(device or "auto"))
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
        "config": cfg,
        "datastore": str(Path(datastore_dir).resolve()),
        "targets": str(Path(targets_dir).resolve()),
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
            check_disk_space(
                out_dir,
                n_params * 4 * (3 * (cfg.keep_last + 1) + 1),
                "memory checkpoints and the final memory",
                "keep fewer checkpoints (keep_last), or train a smaller memory (width, n_blocks)",
            )
        return prepare_out(out_dir, resolved, overwrite, kind="memory")

    if dist.on_main(claim) == "done":
        log.info("memory training in %s is already finished", out_dir)
        return out_dir
    from mlpmem.models import memory_base_fingerprint  # which base model the memory belongs to; refuses an LM that is not it

    mem_meta = {
        "model_id": data.ds.model_id,
        "tokenizer_hash": data.ds.tokenizer_hash,
        **data.spec.as_meta(),
        "model_fingerprint": memory_base_fingerprint(
            data.ds.model_id, data.ds.manifest.get("model_fingerprint"), init_lm, cfg.mode == "online"
        ),
        "datastore": resolved["datastore"],
        "targets": resolved["targets"],
        **(meta or {}),
        # token ids the datastore put in front of every window (datastore.bos): the memory's inputs were computed after them
        **({"prefix": list(data.ds.manifest["prefix"])} if data.ds.manifest.get("prefix") else {}),
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
            truncate_metrics(out_dir / METRICS, state["step"])
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
            append_metrics(out_dir, {"step": 0, "split": "valid", **state["valid_start"]})
    log.info(
        "memory: %.2fM parameters, %d steps of %d positions (%.2f epochs of %d rows), %s",
        memory.num_parameters() / 1e6,
        sched.total,
        cfg.batch_size,
        sched.total * cfg.batch_size / data.n,
        data.n,
        "bf16 autocast" if bf16 else "fp32",
    )
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
            append_metrics(
                out_dir,
                {"step": state["step"], "split": "train", **{k: float(np.mean([w[k] for w in window])) for k in rec}, "tokens_per_s": tps},
            )
            window = []
        eval_now = done or bool(cfg.eval_every and state["step"] % cfg.eval_every == 0)
        stop = False
        if valid is not None and eval_now:
            last_valid = evaluate(memory, valid, cfg.alpha, dev, bf16, cfg.batch_size // cfg.grad_accum)
            append_metrics(out_dir, {"step": state["step"], "split": "valid", **last_valid})
            log.debug("step %d valid %s", state["step"], last_valid)
            stop = _track_best(out_dir, memory, mem_meta, cfg, state, last_valid)
        if eval_now and cfg.patience and w.size > 1:
            stop = dist.broadcast_object(stop)  # rank 0 validates; every rank stops with it
        if stop and not done:
            state["stopped_early"] = state["step"]
            log.info("early stop at step %d: %d validations without a better memory (patience)", state["step"], cfg.patience)
            done = True
        if w.main and (done or (cfg.ckpt_every and state["step"] % cfg.ckpt_every == 0)):
            save_checkpoint(
                out_dir / CKPT_DIR, state["step"], memory, opt, mem_meta, dict(state, last_valid=last_valid, window=window), cfg.keep_last
            )
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
        log.info(
            "kept the memory of step %d (valid %s %.4g); the last step's (%d) had %.4g",
            best["step"],
            best["by"],
            best["value"],
            state["step"],
            valid_score(last_valid)[1] if last_valid else float("nan"),
        )
    if cfg.head_vocab == "corpus":  # after keep-best: the kept memory's head, pruned to the train text's tokens
        memory = memory.prune_head(torch.from_numpy(np.unique(data.ds.values())))
    save_memory(out_dir / "memory", memory, mem_meta)
    shutil.rmtree(out_dir / BEST, ignore_errors=True)
    plot_training_curve(read_metrics(out_dir / METRICS), out_dir / "training_curve.png", f"memory on {mem_meta['model_id']}")
    tps = state["train_positions"] / max(state["train_seconds"], 1e-9)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    files = [file_record(out_dir, p) for p in sorted((out_dir / "memory").iterdir()) if p.is_file()]
    write_manifest(
        out_dir,
        "memory",
        {
            **{k: mem_meta[k] for k in ("model_id", "tokenizer_hash", "layer", "site")},
            "files": files,
            "memory": "memory",
            "memory_config": dataclasses.asdict(memory.config),
            "parameters": memory.num_parameters(),
            "trainable_parameters": memory.num_parameters(trainable_only=True),
            "steps": sched.total,
            "positions_seen": sched.total * cfg.batch_size,
            "epochs": sched.total * cfg.batch_size / data.n,
            "n_rows": data.n,
            "datastore": mem_meta["datastore"],
            "targets": mem_meta["targets"],
            "precision": "bf16" if bf16 else "fp32",
            "device": str(dev),
            "torch_threads": torch.get_num_threads(),
            "processes": dist.world().size,
            "tokens_per_s": tps,
            "peak_rss_mb": peak_rss_mb,
            "valid": kept_valid,
            "valid_start": state.get("valid_start"),
            "valid_last": last_valid,
            "kept_step": best["step"] if cfg.keep_best and best else state["step"],
            "kept_by": (best["by"] if best else None) if cfg.keep_best else "last step",
            "stopped_early": state.get("stopped_early"),
            "worse_than_start": worse_than_start(state.get("valid_start"), kept_valid),
        },
    )
    start = state.get("valid_start")
    if worse_than_start(start, kept_valid):
        key = gain_measure(start, kept_valid)
        log.warning(
            "the memory ended WORSE than it started on valid (%s %.4g -> %.4g): training did not help, "
            "whatever the fitted lambda shows; check lr, epochs and the targets",
            key,
            start[key],
            kept_valid[key],
        )
    summary = ", ".join(f"{k} {v:.4g}" for k, v in (kept_valid or {}).items())
    log.info(
        "memory trained: %d steps at %.0f tokens/s%s -> %s", sched.total, tps, f"; valid {summary}" if summary else "", out_dir / "memory"
    )
    return out_dir


# the least relative fall of the valid perplexity that counts as a gain: a lambda fitted near 0
# moves the mixture by less than this, and such a memory is no better than none
NO_GAIN = 1e-3


def gain_measure(start: dict, end: dict) -> str:
    """What :func:`worse_than_start` compares: the mixture's perplexity when valid has the LM's log-probs, else the memory's alone."""
    return "ppl_interp" if "ppl_interp" in start and "ppl_interp" in end else "ppl_memory"


def worse_than_start(start: dict | None, end: dict | None) -> bool | None:
    """Did the memory end no better than it started on valid (step 0 against the kept memory)? None when valid was not scored.

    The test is the LM + memory perplexity at the EM-fitted lambda (``ppl_interp``), which must fall by
    at least NO_GAIN: a useless memory gets lambda near 0, which keeps the mixture at the LM's
    perplexity and would otherwise hide it. The memory alone is no test: started as a copy of the
    LM's head (init lm_copy) it gets worse alone as it learns the kNN targets, while the mixture gets
    better (SOTU 60k: alone 34.36 -> 43.24, mixed 34.35 -> 32.42). Without the LM's log-probs on
    valid, the memory-alone perplexity is all there is.
    """
    if not start or not end:
        return None
    key = gain_measure(start, end)
    if key not in start or key not in end:
        return None
    return bool(end[key] > start[key] * (1 - NO_GAIN))
