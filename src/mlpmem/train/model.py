"""The memory to train, its optimizer and its precision."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch

from mlpmem.errors import MlpmemError
from mlpmem.memory import MLPMemory, init_from_lm, lm_settings
from mlpmem.train.config import TrainConfig


def _require_lm(cfg: TrainConfig, lm) -> None:
    if cfg.init != "plain" and lm is None:
        raise MlpmemError(
            f"init {cfg.init!r} copies weights from the LM, but no LM was given", "pass the LM (init_lm), or use init 'plain'"
        )


def build_memory(cfg: TrainConfig, d_in: int, vocab_size: int, lm=None) -> MLPMemory:
    mcfg = cfg.memory_config(d_in, vocab_size)
    if cfg.init != "plain":
        _require_lm(cfg, lm)
        lm_vocab = int(lm.get_output_embeddings().weight.shape[0])
        if lm_vocab != vocab_size:
            raise MlpmemError(
                f"the LM has {lm_vocab} logits but the datastore says {vocab_size}", "use the LM the datastore was built with"
            )
        mcfg = dataclasses.replace(mcfg, **lm_settings(lm, cfg.init))
    torch.manual_seed(cfg.seed)
    memory = MLPMemory(mcfg)
    if cfg.init != "plain":
        init_from_lm(memory, lm)
    return memory


def build_optimizer(memory: MLPMemory, cfg: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on norms and biases (the usual GPT recipe)
    params = [p for p in memory.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
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
