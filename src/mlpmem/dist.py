"""Several processes, same artefacts: torch.distributed as torchrun or accelerate launch it.

``torchrun --nproc_per_node N -m mlpmem VERB ...`` and ``accelerate launch -m
mlpmem VERB ...`` both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`init` reads them (gloo on CPU, nccl on GPUs) and a plain
``mlpmem VERB`` is a world of one, through the same code.

Work is split by *item* (a shard of windows, a block of query rows), never by
rank: the items and their files are the same for any number of processes, a
rank only chooses which items it computes (:func:`my_items`), and a run
interrupted with N processes resumes with M. Rank 0 alone writes manifests,
after a barrier that follows the last item.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mlpmem.errors import MlpmemError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise MlpmemError(
            f"environment variable {name}={text!r} is not an integer", "launch with torchrun or accelerate launch, which set it"
        )


def world() -> World:
    """This process's place, from torch.distributed once initialised, else from the launcher's variables."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return World(td.get_rank(), td.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def init(device: str = "auto") -> World:
    """Join the process group the launcher described (a no-op for a world of one or when already joined).

    The backend follows the device: nccl when this rank runs on CUDA, gloo otherwise
    (CPU tests rendezvous on localhost with gloo). Each rank of a CUDA run takes the
    GPU of its LOCAL_RANK: see :func:`local_device`.
    """
    import torch
    import torch.distributed as td

    w = world()
    if w.size == 1 or td.is_initialized():
        return w
    if not td.is_available():
        raise MlpmemError(
            "WORLD_SIZE > 1 but this torch build has no torch.distributed",
            "run a single process, or install a torch build with distributed support",
        )
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise MlpmemError(f"WORLD_SIZE={w.size} but {name} is not set", "launch with torchrun or accelerate launch, which set it")
    gpu = torch.cuda.is_available() and str(device).lower() not in ("cpu", "mps")
    if gpu:
        torch.cuda.set_device(w.local_rank % torch.cuda.device_count())
    td.init_process_group(backend="nccl" if gpu else "gloo")
    log.info("rank %d of %d joined (%s)", td.get_rank(), td.get_world_size(), td.get_backend())
    return world()


def local_device(device: str) -> str:
    """The torch device name this process runs on: ``auto``/``cuda`` on a multi-process CUDA run is this rank's GPU
    (cuda:LOCAL_RANK); otherwise what :func:`mlpmem.models.resolve_device` (the one device resolver) makes of it,
    so ``auto`` is never handed to torch as a name."""
    import torch

    from mlpmem.models import resolve_device

    name = str(device).strip().lower()
    w = world()
    if w.size > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{w.local_rank % torch.cuda.device_count()}"
    return str(resolve_device(device)[0])


def _joined() -> bool:
    """Is this process in a process group of more than one (the collectives below are no-ops otherwise)?"""
    import torch.distributed as td

    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def my_items(n_items: int, w: World | None = None) -> list[int]:
    """The items (0..n_items-1) this rank computes: every size-th, from its rank on.

    Strided rather than blocked so that ranks finish together when early items
    are already done (resume) and the work is evenly spread.
    """
    w = w or world()
    return list(range(w.rank, n_items, w.size))


def barrier() -> None:
    import torch.distributed as td

    if _joined():
        td.barrier()


def all_sum(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks, in float64 (a world of one returns the values)."""
    import torch
    import torch.distributed as td

    arr = np.asarray(values, dtype=np.float64)
    if not _joined():
        return arr
    t = torch.from_numpy(arr.copy())
    if td.get_backend() == "nccl":
        t = t.cuda()
    td.all_reduce(t)
    return t.cpu().numpy()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable, small: records, not arrays), in rank order."""
    import torch.distributed as td

    if not _joined():
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as td

    if not _joined():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result, or raises its MlpmemError.

    For steps that must run once (claiming and locking a stage folder, writing a
    manifest): the other ranks wait here, so none starts before the folder is ready,
    and a refusal on rank 0 stops every rank with the same message instead of a hang.
    """
    w = world()
    if w.size == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if w.main:
        try:
            result = fn(*args, **kwargs)
        except MlpmemError as e:
            error = (e.problem, e.fix)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise MlpmemError(*error)
    return result


def finish() -> None:
    """Leave the process group (end of a launched command)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()
        td.destroy_process_group()
