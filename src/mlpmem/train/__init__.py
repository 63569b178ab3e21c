"""Stage 6: train the MLP memory to imitate the retriever (from stored or recomputed hidden states).

Every corpus position is one example: input = the stored hidden state, targets =
its sparse kNN distribution and its next token. Positions are shuffled across the
whole corpus each epoch by a permutation that depends only on (seed, epoch), so
the batch of any step can be recomputed from the step number alone: that is what
makes resuming exact. The output folder holds ``memory/`` (the final memory),
``checkpoints/``, ``metrics.jsonl``, ``training_curve.png``, ``config.json`` and,
last, ``manifest.json``.

The package's parts: :mod:`.config` (TrainConfig), :mod:`.data` (offline and online rows),
:mod:`.schedule` (rows and learning rate per step), :mod:`.model` (the memory, optimizer and
precision), :mod:`.checkpoint`, :mod:`.metrics` (metrics.jsonl and the curve) and :mod:`.loop`
(validation and :func:`train_memory`). Every name is importable from ``mlpmem.train``.
"""

from mlpmem.losses import sparse_kd_loss  # noqa: F401  (imported from here by earlier code)
from mlpmem.train.checkpoint import list_checkpoints, load_checkpoint, load_latest_checkpoint, save_checkpoint
from mlpmem.train.config import TrainConfig
from mlpmem.train.data import OnlineData, TrainData, load_datastore_lm, needs_lm
from mlpmem.train.loop import BEST, CKPT_DIR, evaluate, rank_slice, train_memory, valid_score, worse_than_start
from mlpmem.train.metrics import METRICS, plot_training_curve, read_metrics
from mlpmem.train.model import autocast, build_memory, build_optimizer, cpu_has_native_bf16, use_bf16
from mlpmem.train.schedule import Schedule, WindowSchedule

__all__ = [
    "BEST",
    "CKPT_DIR",
    "METRICS",
    "OnlineData",
    "Schedule",
    "TrainConfig",
    "TrainData",
    "WindowSchedule",
    "autocast",
    "build_memory",
    "build_optimizer",
    "cpu_has_native_bf16",
    "evaluate",
    "list_checkpoints",
    "load_checkpoint",
    "load_datastore_lm",
    "load_latest_checkpoint",
    "needs_lm",
    "plot_training_curve",
    "rank_slice",
    "read_metrics",
    "save_checkpoint",
    "train_memory",
    "use_bf16",
    "valid_score",
    "worse_than_start",
]
