"""The training stage's settings (one recipe section, one verb's flags)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mlpmem.memory import MemoryConfig, MemoryInput, resolve_memory_input


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
    head_rank: int = 0  # a low-rank correction beside a frozen head (freeze_head): see MemoryConfig
    # full: the head covers the whole vocabulary; corpus: the saved memory's head is pruned to the tokens of the train
    # text (MLPMemory.prune_head), which is what decoding reads per token (6,647 of 49,152 rows in the demo)
    head_vocab: str = "full"
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
        from mlpmem.typed_config import in_range, need, one_of, positive
        from mlpmem.memory import ACTIVATIONS, INITS, NORMS
        from mlpmem.modeling.read_site import SITES

        return (
            positive(self, "width", allow_none=True)
            + positive(self, "n_blocks", zero=True)
            + positive(self, "expansion", "norm_eps", "lr", "epochs", "batch_size", "grad_accum", "keep_last", "log_every")
            + positive(self, "weight_decay", "clip", "eval_every", "ckpt_every", "patience", zero=True)
            + in_range(self, "dropout", 0.0, 1.0, hi_open=True)
            + one_of(self, "activation", ACTIVATIONS)
            + one_of(self, "norm", NORMS)
            + one_of(self, "init", INITS)
            + one_of(self, "input_site", SITES, allow_none=True)
            + one_of(self, "schedule", ("cosine", "linear"))
            + one_of(self, "precision", ("auto", "fp32", "bf16"))
            + one_of(self, "mode", ("offline", "online"))
            + one_of(self, "head_vocab", ("full", "corpus"))
            + in_range(self, "alpha", 0.0, 1.0)
            + in_range(self, "warmup_frac", 0.0, 1.0, hi_open=True)
            + in_range(self, "min_lr_frac", 0.0, 1.0)
            + need(
                not (self.batch_size > 0 and self.grad_accum > 0) or self.batch_size % self.grad_accum == 0,
                "batch_size",
                f"({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})",
            )
        )

    def memory_input(self, key_layer: int, key_site: str, lm=None) -> MemoryInput:
        """What the memory reads, for a datastore keyed at (``key_layer``, ``key_site``): see memory.resolve_memory_input."""
        return resolve_memory_input(self.input_layer, self.input_site, self.init, self.mode, key_layer, key_site, lm)

    def memory_config(self, d_in: int, vocab_size: int) -> MemoryConfig:
        names = {f.name for f in dataclasses.fields(MemoryConfig)}
        return MemoryConfig(
            d_in=d_in,
            vocab_size=vocab_size,
            **{k: v for k, v in dataclasses.asdict(self).items() if k in names and k not in ("d_in", "vocab_size")},
        )
