"""The memory network: residual feed-forward blocks from the LM's hidden state to logits, and its folder format."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn

from .errors import MlpmemError

MEMORY_DIR = "memory"  # a saved-by-reference folder keeps the memory here (mlpmem's memory folder format)
MEMORY_WEIGHTS = "model.safetensors"
MEMORY_CONFIG = "memory_config.json"
ACTIVATIONS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm", "rmsnorm_plus_one")
INITS = ("plain", "lm_head", "lm_copy")


@dataclass
class MemoryConfig:
    """Everything that rebuilds a memory's architecture (and how it was started)."""

    d_in: int
    vocab_size: int
    width: int | None = None  # None: width = d_in and no input projection
    n_blocks: int = 4
    expansion: int = 4  # FFN hidden size = expansion * width (for SwiGLU too)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    init: str = "plain"
    freeze_head: bool = False
    zero_init_blocks: bool = True  # blocks start as the identity
    head_bias: bool = False
    # a trainable low-rank correction beside the head, logits = head(x) + up(down(x)) + bias (up zero at the start):
    # with freeze_head it lets a memory that keeps the LM's head (one matrix product for both) still move its output
    head_rank: int = 0
    # a head pruned to the tokens of the memory's training text (MLPMemory.prune_head): it computes head_tokens rows and
    # gives every other token no mass; 0 = the whole vocabulary (every memory before 0.x, still the default)
    head_tokens: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.d_in > 0, f"d_in must be positive, got {self.d_in}"),
            (self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}"),
            (self.width is None or self.width > 0, f"width must be positive or None, got {self.width}"),
            (self.n_blocks >= 0, f"n_blocks must be >= 0, got {self.n_blocks}"),
            (self.expansion > 0, f"expansion must be positive, got {self.expansion}"),
            (self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}"),
            (self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}"),
            (self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}"),
            (self.init in INITS, f"init must be one of {INITS}, got {self.init!r}"),
            (self.head_rank >= 0, f"head_rank must be >= 0, got {self.head_rank}"),
            (0 <= self.head_tokens <= self.vocab_size, f"head_tokens must be in [0, vocab_size], got {self.head_tokens}"),
        ]
        for ok, problem in checks:
            if not ok:
                raise MlpmemError(f"invalid memory configuration: {problem}", "fix the memory settings")

    @property
    def model_width(self) -> int:
        return self.d_in if self.width is None else self.width


class Norm(nn.Module):
    """LayerNorm, RMSNorm (Llama) or RMSNorm with (1 + w) scaling (Gemma).

    The RMS variants follow the Hugging Face code operation by operation (float32
    inside, cast back), so that a copied LM norm gives the LM's numbers exactly.
    """

    def __init__(self, width: int, kind: str, eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        # gemma stores w with the 1 taken out, so "no scaling" is w = 0
        self.weight = nn.Parameter(torch.zeros(width) if kind == "rmsnorm_plus_one" else torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "rmsnorm_plus_one":
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.kind == "rmsnorm_plus_one" else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class FFN(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2 style) or SwiGLU (Llama style)."""

    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(width, 2 * hidden if activation == "swiglu" else hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.activation == "swiglu":
            gate, val = h.chunk(2, dim=-1)
            h = F.silu(gate) * val
        else:
            h = F.gelu(h)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: MemoryConfig) -> None:
        super().__init__()
        w = cfg.model_width
        self.norm = Norm(w, cfg.norm, cfg.norm_eps)
        self.ffn = FFN(w, cfg.expansion * w, cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


def plain_init(m: nn.Module) -> None:
    """The "plain" start of one module: GPT-2's N(0, 0.02) linear weights, zero biases, unit norms."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, Norm):
        m.reset_parameters()


MEMORY_DTYPES = ("float32", "int8")  # how a loaded memory runs at inference (memory_dtype=); float32 is its own weights


def check_memory_dtype(value: str | None) -> str | None:
    """``memory_dtype`` as given to a loader (None or "" = float32, the memory's own weights), refused by name if unknown."""
    if value in (None, "", "float32"):
        return None
    if value not in MEMORY_DTYPES:
        raise MlpmemError(f"memory_dtype {value!r} is not known", "pass memory_dtype='int8' (CPU), or leave it unset")
    return value


class RowScaledInt8Linear(nn.Module):
    """An nn.Linear run in int8 (torch's dynamic quantization, fbgemm: weights per output channel), with each input row
    scaled to a max-abs of 1 first and its output scaled back.

    The kernel quantizes its whole input with one scale, so in a batch of many rows (scoring) a row of small values
    keeps few levels: measured on the demo memory's valid split, +0.59% perplexity against float32 with one scale per
    512 rows, +0.11% with a scale per row, as decoding at batch 1 has anyway. The product is linear in each row, so
    scaling rows before and after is exact in real arithmetic and gives every row its own activation scale.

    One row (a decode step at batch 1) skips the scaling: the kernel's own scale, from that row's min and max, is
    then the row's already, and scaling it first would change only float rounding. That saves five small operations
    per layer, which on a cold cache cost about as much as the layer's product.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        import warnings

        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        copy_ = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        copy_.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
        if linear.bias is not None:
            copy_.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        with warnings.catch_warnings():  # the eager API's notice that it moves to torchao
            warnings.simplefilter("ignore")
            wrapped = quantize_dynamic(nn.Sequential(copy_), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        self.q = wrapped[0]  # adds the float bias after the int8 product
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return self.q(x)
        scale = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        y = self.q(x / scale)  # W x / s + b
        # (y - b) s + b = W x + b
        return y * scale if self.bias is None else torch.addcmul(self.bias, y - self.bias, scale)


class MLPMemory(nn.Module):
    """All-MLP memory. ``forward(h [..., d_in]) -> logits [..., vocab_size]``.

    An optional input projection, B residual blocks ``x = x + FFN(Norm(x))``, a final
    norm and a head to V logits. No attention: every position is mapped on its own.
    """

    def __init__(self, cfg: MemoryConfig) -> None:
        super().__init__()
        self.config = cfg
        w = cfg.model_width
        self.proj = nn.Linear(cfg.d_in, w) if cfg.width is not None else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.norm = Norm(w, cfg.norm, cfg.norm_eps)
        rows = cfg.head_tokens or cfg.vocab_size
        self.head = nn.Linear(w, rows, bias=cfg.head_bias)
        r = cfg.head_rank
        self.head_delta = nn.Sequential(nn.Linear(w, r, bias=False), nn.Linear(r, rows)) if r else None
        # the token id of each head row (saved with the weights); None: row i is token i
        self.register_buffer("head_ids", torch.zeros(cfg.head_tokens, dtype=torch.long) if cfg.head_tokens else None)
        self.reset_parameters()
        self.apply_freeze()
        object.__setattr__(self, "_int8", None)  # (int8 copy, weights' versions) when use_int8 is on; not a submodule

    @classmethod
    def from_config(cls, cfg: MemoryConfig | dict[str, Any]) -> "MLPMemory":
        return cls(cfg if isinstance(cfg, MemoryConfig) else MemoryConfig(**cfg))

    def reset_parameters(self) -> None:
        """The "plain" start: GPT-2's N(0, 0.02) weights, zero biases, unit norms."""
        for m in self.modules():
            plain_init(m)
        if self.config.zero_init_blocks:
            # a zero output projection makes each block the identity at the start, so
            # an initialised head sees the input unchanged; the down weights still get
            # gradients (their input is non-zero), so the blocks do learn
            for b in self.blocks:
                nn.init.zeros_(b.ffn.down.weight)
                nn.init.zeros_(b.ffn.down.bias)
        if self.head_delta is not None:  # the correction starts at zero: the head alone
            nn.init.zeros_(self.head_delta[1].weight)

    def apply_freeze(self) -> None:
        for p in self.head.parameters():
            p.requires_grad_(not self.config.freeze_head)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d_in] (any float dtype) -> the head's input [..., width]: everything but the head."""
        if h.dtype != self.norm.weight.dtype:  # the norm's: an int8 copy's linear layers hold no float weight
            h = h.to(self.norm.weight.dtype)  # keys are stored as float16
        x = self.proj(h) if self.proj is not None else h
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d_in] (any float dtype) -> logits [..., vocab_size]."""
        return self.full_vocab(self.head_logits(h))

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d_in] -> the head's logits [..., rows]: a pruned head's tokens only (``head_ids``), else every token."""
        # the int8 copy lives on the CPU: a model moved to a GPU after use_int8 runs its float weights there
        if self._int8 is not None and not self.training and not torch.is_grad_enabled() and h.device.type == "cpu":
            return self._int8_copy().head_logits(h)
        x = self.features(h)
        return self.corrected(x, self.head(x))

    def full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's logits [..., rows] -> [..., vocab_size]: a pruned head's tokens where they belong, -inf (no mass)
        for every other token, which the mixture then takes from the LM alone."""
        if self.head_ids is None:
            return logits
        out = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.head_ids, logits)

    def prune_head(self, token_ids: Any) -> "MLPMemory":
        """A copy of this memory whose head computes only ``token_ids`` (e.g. the tokens of its training text).

        At decode the head is most of what a memory reads per token (49,152 rows for SmolLM2, a few thousand tokens
        in a small corpus); the pruned memory gives the same logits on its tokens and no mass elsewhere, so its
        log-probs are today's renormalised over them. Recorded in the config (``head_tokens``) and the weights
        (``head_ids``); the blocks are shared with this memory, not copied.
        """
        if self.head_ids is not None:
            raise MlpmemError("this memory's head is pruned already", "prune the memory it was pruned from")
        ids = torch.as_tensor(token_ids, dtype=torch.long).unique()  # sorted
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= self.config.vocab_size:
            raise MlpmemError(
                f"a head is pruned to token ids in [0, {self.config.vocab_size}); got {ids.numel()} ids",
                "pass the ids of the corpus's tokens",
            )
        state = self.state_dict(keep_vars=True)  # a new dict each call: entries are replaced below, not the memory's
        ids = ids.to(self.head.weight.device)
        for name in ("head.weight", "head.bias", "head_delta.1.weight", "head_delta.1.bias"):
            if name in state:
                state[name] = nn.Parameter(state[name].detach()[ids], requires_grad=state[name].requires_grad)
        state["head_ids"] = ids
        with torch.device("meta"):
            pruned = MLPMemory(dataclasses.replace(self.config, head_tokens=int(ids.numel())))
        pruned.load_state_dict(state, strict=True, assign=True)
        pruned.apply_freeze()
        return pruned.train(self.training)

    def use_int8(self, on: bool = True) -> "MLPMemory":
        """Run the memory's linear layers in int8 at inference (torch's dynamic quantization, per output channel, each
        input row with its own scale: :class:`RowScaledInt8Linear`; CPU).

        At batch 1 the memory is bound by reading its weights, and int8 reads a quarter of float32's bytes. The float32
        weights stay the memory's own (saved, fingerprinted, trained); the int8 copy is made from them here, remade when
        they change, and used only outside training and autograd. ``on=False`` drops it.
        """
        if not on:
            object.__setattr__(self, "_int8", None)
            return self
        if self.norm.weight.device.type != "cpu" or self.norm.weight.dtype != torch.float32:
            raise MlpmemError(
                f"int8 memory weights are made from a float32 memory on the CPU; this one is {self.norm.weight.dtype} on "
                f"{self.norm.weight.device}",
                "load the memory in float32 on the CPU for memory_dtype='int8', or leave memory_dtype unset on a GPU",
            )
        if self._int8 is None or self._int8[1] != self._weights_version():  # asked again (lm-eval after the move): kept
            object.__setattr__(self, "_int8", (self._quantized(), self._weights_version()))
        return self

    def _weights_version(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.parameters()) + tuple(id(p) for p in self.parameters())

    def _quantized(self) -> nn.Module:
        import copy

        plain = copy.copy(self)  # without the previous int8 copy, which the deep copy below would copy too
        object.__setattr__(plain, "_int8", None)
        quantized = copy.deepcopy(plain).eval()
        for parent in list(quantized.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    setattr(parent, name, RowScaledInt8Linear(child))
        return quantized.requires_grad_(False)

    def _int8_copy(self) -> nn.Module:
        copy_, version = self._int8
        if version != self._weights_version():  # the float32 weights changed since: quantize them again
            copy_ = self._quantized()
            object.__setattr__(self, "_int8", (copy_, self._weights_version()))
        return copy_

    def corrected(self, x: torch.Tensor, head_out: torch.Tensor) -> torch.Tensor:
        """The logits from the head's input ``x`` and the head's output (computed here, or in the LM's head call)."""
        return head_out if self.head_delta is None else head_out + self.head_delta(x)

    def head_is(self, linear: nn.Module) -> bool:
        """Whether ``linear`` computes exactly this memory's head: same weights (and bias), dtype and device.

        True for a memory started as a copy of the LM's head (init lm_head / lm_copy) whose head
        stayed frozen (``freeze_head``): the model class then runs both heads in one matrix product.
        """
        if self._int8 is not None or self.head_ids is not None:  # an int8 or pruned head is not the LM's: it runs on its own
            return False
        if not isinstance(linear, nn.Linear) or linear.weight.shape != self.head.weight.shape:
            return False
        a, b = self.head.weight, linear.weight
        if (a.dtype, a.device) != (b.dtype, b.device) or (self.head.bias is None) != (linear.bias is None):
            return False
        same = a is b or torch.equal(a, b)
        return same and (self.head.bias is None or torch.equal(self.head.bias, linear.bias))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def saved_config(settings: dict[str, Any], folder: Path) -> MemoryConfig:
    """The MemoryConfig a saved memory records; settings this version does not know (a memory kind of a newer
    version) are refused by name, rather than a different memory being built."""
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(MemoryConfig)})
    if unknown:
        raise MlpmemError(
            f"the memory in {folder} has settings this version of mlpmem does not know ({', '.join(unknown)})",
            "upgrade mlpmem to the version that trained it",
        )
    return MemoryConfig(**settings)


def read_memory_folder(files: dict[str, str]) -> tuple[MLPMemory, dict[str, Any]]:
    """Build a memory from the two files of a memory folder (paths by name). Returns (memory in eval mode, meta)."""
    try:
        data = json.loads(Path(files[MEMORY_CONFIG]).read_text())
        cfg = saved_config(data["config"], Path(files[MEMORY_CONFIG]).parent)
        with torch.device("meta"):  # skip a random init that would be overwritten at once
            memory = MLPMemory(cfg)
        memory.load_state_dict(load_file(files[MEMORY_WEIGHTS]), strict=True, assign=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise MlpmemError(
            f"the memory in {Path(files[MEMORY_CONFIG]).parent} is not readable ({str(e).splitlines()[0][:200]})",
            "save the model again with save_pretrained",
        )
    memory.apply_freeze()
    return memory.eval(), data.get("meta", {})


def write_memory_folder(folder: Path, memory: MLPMemory, meta: dict[str, Any]) -> None:
    """The memory folder format mlpmem's train stage writes: weights, then the config that rebuilds them."""
    folder.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage, and contiguous views are required
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in memory.state_dict().items()}
    tmp = folder / (MEMORY_WEIGHTS + ".partial")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / MEMORY_WEIGHTS)
    text = json.dumps({"config": dataclasses.asdict(memory.config), "meta": meta}, indent=2, default=str)
    (folder / (MEMORY_CONFIG + ".partial")).write_text(text)
    os.replace(folder / (MEMORY_CONFIG + ".partial"), folder / MEMORY_CONFIG)
