"""Which rows and which learning rate each step uses: a pure function of the step (what makes resuming exact)."""

from __future__ import annotations

import math

import numpy as np

from mlpmem.train.config import TrainConfig


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
