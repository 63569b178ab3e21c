"""Checkpoints: ``root/step-XXXXXX/`` with the memory, the optimizer's tensors, the RNG and the loop's state."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from mlpmem.errors import MlpmemError
from mlpmem.files import check_file, file_record, read_json, write_json
from mlpmem.memory import MLPMemory, load_memory, save_memory
from mlpmem.train.config import TrainConfig
from mlpmem.train.model import build_optimizer

log = logging.getLogger(__name__)


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
    done = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".partial") and (p / "state.json").exists()
    ]
    return sorted(done, key=lambda p: p.name)  # step-XXXXXX: the name orders them, even if a state.json is damaged


def load_latest_checkpoint(
    root: Path, cfg: TrainConfig, device: torch.device
) -> tuple[MLPMemory, torch.optim.Optimizer, dict, Path] | None:
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
