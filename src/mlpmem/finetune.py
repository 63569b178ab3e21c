"""Fine-tune the LM on a corpus split, alone or jointly with an MLP memory (issue 12 item 4).

Plain fine-tuning minimises the LM's next-token loss. Joint fine-tuning puts a memory
in the loop and minimises the mixture's loss (the memory is differentiable, so the LM
learns to complement it rather than to repeat it):

    loss = -log((1 - lambda) p_LM(y) + lambda p_MLP(y))

where the memory reads the LM's hidden state at the (layer, site) it was trained on.
The memory is frozen (its weights stay bit for bit what they were) or trained with the
LM. The LM is trained in full or through LoRA adapters (peft, ``pip install
'mlpmem[finetune]'``), which are merged into the weights at the end.

Data: the split is cut into non-overlapping chunks of ``chunk`` tokens (the rest, less
than one chunk, is left out); the chunks of each step come from
:class:`mlpmem.train.Schedule` (one permutation per epoch from (seed, epoch)), so the
data order, and the run, is a pure function of the config. Learning rate: linear
warm-up, then cosine decay to 0.

The output folder holds ``model/`` (the fine-tuned LM, LoRA merged, safetensors, with its
tokenizer), ``memory/`` when a memory was in the loop (trained or not: it is the memory
the LM was tuned to complement, recorded for the fine-tuned model so that
``MLPMemoryForCausalLM.from_memory(out/"memory", base_model=out/"model")`` pairs them),
``metrics.jsonl`` (loss and lr per step), ``config.json`` (the resolved config) and,
last, ``manifest.json``. Everything is written under ``*.partial`` names and renamed, so
a failed run leaves nothing that looks finished; a rerun of an unfinished folder starts
over (a fine-tune is short next to the memory's training, so there are no checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlpmem.errors import MlpmemError

log = logging.getLogger(__name__)

METHODS = ("full", "lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Llama's names
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4}  # what bench/bench_finetune.py measured with on SmolLM2-135M
OUTPUTS = ("model", "memory", "metrics.jsonl")


@dataclass
class FinetuneConfig:
    """How to fine-tune the LM (the ``finetune`` verb's flags)."""

    model: str = "smollm2-135m"  # the base LM: an mlpmem model name, a folder or a hub id
    method: str = "lora"  # full | lora (adapters through peft, merged at the end)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lr: float | None = None  # None: 5e-5 for full, 5e-4 for lora
    weight_decay: float = 0.01
    epochs: float = 1.0  # passes over the chunks (batches run on across epoch ends, so every batch is full)
    tokens: int | None = None  # use only the first N tokens of the split (None: all)
    split: str = "train"
    chunk: int = 512  # tokens per training sequence
    batch_size: int = 4  # chunks per optimizer step
    warmup: float = 0.1  # share of the steps with linear warm-up
    clip: float = 1.0  # max gradient norm; 0 = off
    seed: int = 0
    # joint fine-tuning: a memory folder (RUN/train/memory) in the loop, on the mixture likelihood
    memory: str | None = None
    memory_trainable: bool = False  # False: the memory is frozen (bit for bit)
    memory_lr: float | None = None  # None: the LM's lr
    lambda_: float | None = None  # the memory's weight; None: the lambda its run fitted (RUN/report.json)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16: the compute precision (autocast); weights stay float32

    def problems(self) -> list[str]:
        from mlpmem.typed_config import in_range, need, one_of, positive

        return (
            one_of(self, "method", METHODS)
            + positive(self, "lora_r", "lora_alpha", "epochs", "chunk", "batch_size")
            + positive(self, "lr", "memory_lr", allow_none=True)
            + positive(self, "tokens", allow_none=True)
            + positive(self, "weight_decay", "clip", zero=True)
            + in_range(self, "warmup", 0.0, 1.0, hi_open=True)
            + in_range(self, "lambda_", 0.0, 1.0, allow_none=True)
            + one_of(self, "split", ("train", "valid", "test"))
            + need(self.chunk is None or self.chunk >= 2, "chunk", f"must be at least 2 tokens, got {self.chunk!r}")
            + need(bool(self.lora_targets) or self.method != "lora", "lora_targets", "must name at least one module for method lora")
            + need(self.memory is not None or not self.memory_trainable, "memory_trainable", "needs a memory (set memory)")
            + need(self.memory is not None or self.lambda_ is None, "lambda_", "is the memory's weight and needs a memory (set memory)")
        )

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


# ----------------------------------------------------------------------------- the loss


def token_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label], in float32. logits [..., V], labels [...] -> [...]."""
    logits = logits.float()
    return logits.gather(-1, labels.long()[..., None])[..., 0] - torch.logsumexp(logits, -1)


def mixture_nll(lm_logits: torch.Tensor, labels: torch.Tensor, memory_logits: torch.Tensor | None = None, lam: float = 0.0) -> torch.Tensor:
    """Mean over positions of ``-log((1 - lam) p_LM(y) + lam p_MLP(y))``.

    lm_logits, memory_logits [N, V] (or [B, T, V]), labels [N] (or [B, T]). Exact at the ends:
    lam = 0 is the LM's cross-entropy (the memory gets no gradient), lam = 1 the memory's.
    """
    from mlpmem.interpolate import interpolate_logprobs

    lp = token_logprob(lm_logits, labels)
    if memory_logits is None or lam == 0.0:
        return -lp.mean()
    return -interpolate_logprobs(lp, token_logprob(memory_logits, labels), lam).mean()


# ----------------------------------------------------------------------------- the parts


def require_peft():
    try:
        import peft
    except ImportError:
        raise MlpmemError(
            "fine-tuning with method lora needs peft, which is not installed", "pip install 'mlpmem[finetune]' (or use method full)"
        )
    return peft


def attach_lora(lm: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """``lm`` wrapped with LoRA adapters on ``cfg.lora_targets`` (only those train). Seeded by cfg.seed."""
    peft = require_peft()
    torch.manual_seed(cfg.seed)  # the adapters' random start
    try:
        return peft.get_peft_model(
            lm,
            peft.LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"
            ),
        )
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise MlpmemError(
            f"LoRA cannot be attached to {type(lm).__name__} ({str(e).splitlines()[0][:200]})",
            "set lora_targets to names of linear modules of this model",
        )


def prepare_lm(lm: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """The model to train: ``lm`` with every weight trainable (full) or wrapped with LoRA adapters."""
    if cfg.method == "lora":
        return attach_lora(lm.requires_grad_(False), cfg)
    return lm.requires_grad_(True)


def chunks_of(tokens: np.ndarray, chunk: int) -> torch.Tensor:
    """Non-overlapping training sequences [n_chunks, chunk] (the remainder, under one chunk, is left out)."""
    n = len(tokens) // chunk
    return torch.from_numpy(np.ascontiguousarray(tokens[: n * chunk], dtype=np.int64)).view(n, chunk)


def schedule(n_chunks: int, cfg: FinetuneConfig):
    """The data order and lr of every step: train.Schedule over chunks (rows) instead of positions."""
    from mlpmem.train import Schedule, TrainConfig

    return Schedule(
        n_chunks,
        TrainConfig(
            lr=cfg.resolved_lr(),
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            warmup_frac=cfg.warmup,
            seed=cfg.seed,
            schedule="cosine",
            min_lr_frac=0.0,
        ),
    )


def train_lm(
    model: torch.nn.Module,
    chunks: torch.Tensor,
    cfg: FinetuneConfig,
    memory: torch.nn.Module | None = None,
    site: tuple[int, str] | None = None,
    lam: float = 0.0,
    hook_model: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    desc: str = "fine-tuning",
) -> dict[str, Any]:
    """Train ``model`` (prepared by :func:`prepare_lm`) in place on ``chunks`` [n, chunk]; returns what happened.

    With ``memory``, the loss is the mixture's (:func:`mixture_nll`) and the memory reads layer
    ``site = (layer, site)`` of ``hook_model`` (the unwrapped LM; default ``model``). The memory
    trains when any of its parameters requires grad (at ``cfg.memory_lr``), else it is left untouched.
    Returns {"losses", "lrs", "steps", "seconds", "tokens", "trainable_params", "memory_trainable_params"}.
    """
    from tqdm.auto import tqdm

    from mlpmem.modeling.read_site import ReadSite, capture
    from mlpmem.train import autocast

    if len(chunks) == 0:
        raise MlpmemError("no training sequence: the split is shorter than one chunk", "use a larger split or a smaller chunk")
    sched = schedule(len(chunks), cfg)
    lr = cfg.resolved_lr()
    lm_params = [p for p in model.parameters() if p.requires_grad]
    mem_params = [p for p in memory.parameters() if p.requires_grad] if memory is not None else []
    if not lm_params:
        raise MlpmemError("the model has no trainable parameter", "prepare it with prepare_lm (method full or lora)")
    groups = [{"params": lm_params, "scale": 1.0}]
    if mem_params:
        groups.append({"params": mem_params, "scale": (cfg.memory_lr or lr) / lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    bf16 = compute_dtype == torch.bfloat16
    model.train()
    if memory is not None:
        memory.train(bool(mem_params))
    losses, lrs = [], []
    t0 = time.perf_counter()
    bar = tqdm(range(sched.total), desc=desc, unit="step", dynamic_ncols=True)
    for step in bar:
        x = chunks[torch.from_numpy(sched.rows(step)[0])].to(device)
        step_lr = sched.lr(step)
        for g in opt.param_groups:
            g["lr"] = step_lr * g["scale"]
        with autocast(torch.device(device), bf16):
            if memory is None:
                logits, mem_logits = model(input_ids=x, use_cache=False).logits, None
            else:
                with capture(hook_model if hook_model is not None else model, [ReadSite(*site)]) as store:
                    logits = model(input_ids=x, use_cache=False).logits
                mem_logits = memory(store[ReadSite(*site)][:, :-1].float())
            loss = mixture_nll(logits[:, :-1], x[:, 1:], mem_logits, lam)
        loss.backward()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(lm_params + mem_params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        lrs.append(step_lr)
        done = (step + 1) * cfg.batch_size * chunks.shape[1]
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{done / (time.perf_counter() - t0):.0f}")
    bar.close()
    model.eval()
    if memory is not None:
        memory.eval()
    return {
        "losses": losses,
        "lrs": lrs,
        "steps": sched.total,
        "warmup_steps": sched.warmup,
        "seconds": time.perf_counter() - t0,
        "tokens": sched.total * cfg.batch_size * chunks.shape[1],
        "trainable_params": sum(p.numel() for p in lm_params),
        "memory_trainable_params": sum(p.numel() for p in mem_params),
    }


def memory_lambda(cfg: FinetuneConfig, memory_dir: Path) -> float:
    """cfg.lambda_, or the lambda the memory's run fitted on valid (RUN/report.json)."""
    if cfg.lambda_ is not None:
        return float(cfg.lambda_)
    from mlpmem.memory import run_results

    lam = (run_results(memory_dir).get("lambda") or {}).get("mlp_memory")
    if lam is None:
        raise MlpmemError(
            f"no lambda was given and none was found for the memory in {memory_dir} (no RUN/report.json next to it)",
            "set lambda_ (the memory's weight in the mixture, e.g. the one fitted on valid)",
        )
    return float(lam)


# ----------------------------------------------------------------------------- the stage


def finetune(cfg: FinetuneConfig, corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on the ``cfg.split`` split of a corpus folder, alone or with a memory in the loop.

    corpus_dir: a corpus stage folder (``mlpmem corpus``) tokenized for ``cfg.model``.
    out_dir: the output folder (see the module docstring for its files). A finished folder
    with the same resolved config is returned as is; ``overwrite`` replaces one made with
    another config. With ``cfg.memory`` (a memory folder, RUN/train/memory) the LM is trained
    on the mixture likelihood with weight ``cfg.lambda_``; the memory must have been trained
    for this base model (tokenizer, weights) and is checked before anything is written.
    Returns the manifest (losses, steps, tokens, seconds, parameter counts, where the model is).
    """
    from mlpmem.typed_config import validate
    from mlpmem.corpus import Corpus
    from mlpmem.files import sha256_bytes
    from mlpmem.folders import prepare_out
    from mlpmem.manifest import read_manifest
    from mlpmem.models import load_model, resolve_device, tokenizer_hash
    from mlpmem.modeling.gating import memory_fingerprint

    validate(cfg, "finetune")
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    if cfg.method == "lora":
        require_peft()
    dev, dtype = resolve_device(cfg.device, cfg.dtype)
    if dtype == torch.float16:
        raise MlpmemError("dtype float16 is not supported for fine-tuning (it needs loss scaling)", "use dtype bfloat16 or float32")
    lm, tok, model_id = load_model(cfg.model, dtype="float32", device=dev)
    corpus = Corpus(corpus_dir)
    corpus.check_tokenizer(tokenizer_hash(tok), model_id)
    tokens = corpus.tokens(cfg.split)[: cfg.tokens]
    chunks = chunks_of(tokens, cfg.chunk)
    if len(chunks) == 0:
        raise MlpmemError(
            f"the {cfg.split} split of {corpus_dir} holds {len(tokens)} tokens{' (after the tokens cap)' if cfg.tokens else ''}, "
            f"fewer than one chunk of {cfg.chunk}",
            "use a larger split, or a smaller chunk",
        )
    memory, mem_meta, lam, site = None, None, 0.0, None
    if cfg.memory is not None:
        memory, mem_meta, lam, site = _load_checked_memory(cfg, lm, tok, dev)
    resolved = {
        "config": cfg,
        "lr": cfg.resolved_lr(),
        "model_id": model_id,
        "corpus": str(corpus_dir.resolve()),
        "corpus_hash": corpus.manifest.get("corpus_hash"),
        "split_sha256": sha256_bytes(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()),
        "memory": None
        if memory is None
        else {
            "path": str(Path(cfg.memory).resolve()),
            "lambda": lam,
            "layer": site[0],
            "site": site[1],
            "fingerprint": memory_fingerprint(memory),
            "trainable": cfg.memory_trainable,
        },
        "device": str(dev),
        "compute_dtype": str(dtype).removeprefix("torch."),
    }
    if prepare_out(out_dir, resolved, overwrite, kind="finetune") == "done":
        log.info("fine-tuning in %s is already finished", out_dir)
        return read_manifest(out_dir, "finetune")
    try:
        return _run(cfg, resolved, lm, tok, model_id, chunks, memory, mem_meta, lam, site, dev, dtype, out_dir)
    finally:
        from mlpmem.folders import release_lock

        release_lock(out_dir)


def _load_checked_memory(cfg: FinetuneConfig, lm, tok, dev) -> tuple[torch.nn.Module, dict, float, tuple[int, str]]:
    """The memory folder of cfg.memory, refused unless it fits this LM (site, sizes, tokenizer, base weights)."""
    from mlpmem.memory import load_memory
    from mlpmem.modeling.modeling_mlpmem import check_parts
    from mlpmem.modeling.read_site import resolve_layer

    folder = Path(cfg.memory)
    memory, meta = load_memory(folder, device=dev)
    check_parts(lm, memory, meta, tokenizer=tok)
    lam = memory_lambda(cfg, folder)
    site = (resolve_layer(lm, int(meta["layer"])), str(meta["site"]))
    memory.requires_grad_(False)
    if cfg.memory_trainable:
        memory.requires_grad_(True)
        memory.apply_freeze()  # a memory built with a frozen head keeps it frozen
    return memory, meta, lam, site


def _run(cfg, resolved, lm, tok, model_id, chunks, memory, mem_meta, lam, site, dev, dtype, out_dir: Path) -> dict[str, Any]:
    from mlpmem.files import file_record
    from mlpmem.manifest import write_manifest
    from mlpmem.memory import save_memory
    from mlpmem.models import model_fingerprint, num_parameters

    for name in OUTPUTS:  # an interrupted earlier try: start over
        for p in (out_dir / name, out_dir / (name + ".partial")):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    n_params = num_parameters(lm)
    model = prepare_lm(lm, cfg)
    what = f"{cfg.method} fine-tuning" + (
        "" if memory is None else f" + memory ({'trained' if cfg.memory_trainable else 'frozen'}, lambda {lam:.3f})"
    )
    log.info("%s of %s on %d chunks of %d tokens (%s)", what, model_id, len(chunks), cfg.chunk, resolved["corpus"])
    rec = train_lm(model, chunks, cfg, memory, site, lam, hook_model=lm, device=dev, compute_dtype=dtype, desc=what)
    if cfg.method == "lora":
        model = model.merge_and_unload()  # a plain model again
    model.requires_grad_(False)
    files = []
    tmp = out_dir / "model.partial"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out_dir / "model")
    files += [file_record(out_dir, p) for p in sorted((out_dir / "model").iterdir()) if p.is_file()]
    model_dir = (out_dir / "model").resolve()
    if memory is not None:
        meta = {
            **mem_meta,
            "model_id": str(model_dir),
            "model_fingerprint": model_fingerprint(model),
            "finetuned_with": {
                "from": resolved["memory"]["path"],
                "trained": cfg.memory_trainable,
                "lambda": lam,
                "base_model_id": mem_meta.get("model_id"),
            },
        }
        save_memory(out_dir / "memory.partial", memory, meta)
        os.replace(out_dir / "memory.partial", out_dir / "memory")
        files += [file_record(out_dir, p) for p in sorted((out_dir / "memory").iterdir()) if p.is_file()]
    metrics = out_dir / "metrics.jsonl.partial"
    metrics.write_text(
        "".join(json.dumps({"step": i + 1, "loss": l, "lr": r}) + "\n" for i, (l, r) in enumerate(zip(rec["losses"], rec["lrs"])))
    )
    os.replace(metrics, out_dir / "metrics.jsonl")
    files.append(file_record(out_dir, out_dir / "metrics.jsonl"))
    losses = rec["losses"]
    manifest = {
        "model": "model",
        "model_dir": str(model_dir),
        "base_model_id": model_id,
        "method": cfg.method,
        "lr": resolved["lr"],
        "memory": "memory" if memory is not None else None,
        "memory_trained": bool(memory is not None and cfg.memory_trainable),
        "lambda": lam if memory is not None else None,
        "files": files,
        "steps": rec["steps"],
        "warmup_steps": rec["warmup_steps"],
        "chunks": len(chunks),
        "chunk": cfg.chunk,
        "batch_size": cfg.batch_size,
        "train_tokens": rec["tokens"],
        "epochs": rec["tokens"] / (len(chunks) * cfg.chunk),
        "params": n_params,
        "trainable_params": rec["trainable_params"],
        "memory_trainable_params": rec["memory_trainable_params"],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_mean_last_quarter": float(np.mean(losses[-max(1, len(losses) // 4) :])),
        "train_seconds": rec["seconds"],
        "train_tokens_per_s": rec["tokens"] / max(rec["seconds"], 1e-9),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(dev),
        "compute_dtype": resolved["compute_dtype"],
        "torch_threads": torch.get_num_threads(),
    }
    write_manifest(out_dir, "finetune", manifest)
    log.info(
        "%s: %d steps, loss %.4f -> %.4f, %.0f tokens/s -> %s",
        what,
        rec["steps"],
        losses[0],
        losses[-1],
        manifest["train_tokens_per_s"],
        model_dir,
    )
    return {"kind": "finetune", **manifest}
