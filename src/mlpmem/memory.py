"""The MLP memory: hidden state at one position -> logits over the LM's vocabulary.

An optional input projection, B residual blocks ``x = x + FFN(Norm(x))``, a final
norm and a head to V logits. No attention: every position is mapped on its own,
so a batch is just a bag of rows. The memory folder holds ``model.safetensors``
and ``memory_config.json`` (the config that rebuilds it, plus where its inputs
come from), so loading needs no flags.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlpmem.errors import MlpmemError
from mlpmem.manifest import read_json, write_json

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "memory_config.json"
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


class MLPMemory(nn.Module):
    """All-MLP memory. ``forward(h [..., d_in]) -> logits [..., vocab_size]``."""

    def __init__(self, cfg: MemoryConfig) -> None:
        super().__init__()
        self.config = cfg
        w = cfg.model_width
        self.proj = nn.Linear(cfg.d_in, w) if cfg.width is not None else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.norm = Norm(w, cfg.norm, cfg.norm_eps)
        self.head = nn.Linear(w, cfg.vocab_size, bias=cfg.head_bias)
        self.reset_parameters()
        self.apply_freeze()

    @classmethod
    def from_config(cls, cfg: MemoryConfig | dict[str, Any]) -> "MLPMemory":
        return cls(cfg if isinstance(cfg, MemoryConfig) else MemoryConfig(**cfg))

    def reset_parameters(self) -> None:
        """The "plain" start: GPT-2's N(0, 0.02) weights, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Norm):
                m.reset_parameters()
        if self.config.zero_init_blocks:
            # a zero output projection makes each block the identity at the start, so
            # an initialised head sees the input unchanged; the down weights still get
            # gradients (their input is non-zero), so the blocks do learn
            for b in self.blocks:
                nn.init.zeros_(b.ffn.down.weight)
                nn.init.zeros_(b.ffn.down.bias)

    def apply_freeze(self) -> None:
        for p in self.head.parameters():
            p.requires_grad_(not self.config.freeze_head)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d_in] (any float dtype) -> logits [..., vocab_size]."""
        if h.dtype != self.head.weight.dtype:
            h = h.to(self.head.weight.dtype)  # keys are stored as float16
        x = self.proj(h) if self.proj is not None else h
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------- LM initialisation


def find_final_norm(lm: nn.Module) -> nn.Module:
    """The norm an HF causal LM applies after its last decoder layer, before the head."""
    candidates = []
    try:
        candidates.append(lm.get_decoder())
    except (AttributeError, NotImplementedError):
        pass
    candidates += [getattr(lm, name, None) for name in ("model", "transformer", "gpt_neox")]
    for mod in candidates:
        for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
            norm = getattr(mod, name, None) if mod is not None else None
            if isinstance(norm, nn.Module):
                return norm
    raise MlpmemError(
        f"cannot find the final norm of {type(lm).__name__} (looked for norm, ln_f, final_layernorm on its decoder)",
        "use init 'lm_head' or 'plain' for this model",
    )


def norm_kind(norm: nn.Module) -> tuple[str, float]:
    """(kind, eps) of an LM norm module, from its class."""
    name = type(norm).__name__
    if isinstance(norm, nn.LayerNorm) or name.endswith("LayerNorm") and hasattr(norm, "bias"):
        kind = "layernorm"
    elif "RMSNorm" in name:
        kind = "rmsnorm_plus_one" if "Gemma" in name else "rmsnorm"
    else:
        raise MlpmemError(f"unknown final norm type {name}", "use init 'lm_head' or 'plain' for this model")
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    if eps is None:
        raise MlpmemError(f"cannot read the epsilon of the final norm {name}", "use init 'lm_head' or 'plain' for this model")
    return kind, float(eps)


def lm_settings(lm: nn.Module, init: str) -> dict[str, Any]:
    """Memory settings an ``init`` from this LM needs: head bias, and for lm_copy the norm kind."""
    head = lm.get_output_embeddings()
    out: dict[str, Any] = {"head_bias": getattr(head, "bias", None) is not None}
    if init == "lm_copy":
        out["norm"], out["norm_eps"] = norm_kind(find_final_norm(lm))
    return out


@torch.no_grad()
def init_from_lm(memory: MLPMemory, lm: nn.Module, init: str | None = None) -> None:
    """Copy the LM's output embedding (``lm_head``), and its final norm too (``lm_copy``).

    With ``lm_copy``, zero-initialised blocks and no input projection, ``memory(h)``
    equals the LM's logits when h is the output of the last decoder layer (before the
    final norm). Models that scale or soft-cap their logits are not matched exactly.
    """
    cfg = memory.config
    init = init or cfg.init
    if init == "plain":
        return
    head = lm.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise MlpmemError(f"{type(lm).__name__} has no output embedding to copy", "use init 'plain'")
    vocab, d = head.weight.shape  # the size of the LM's logits, which may exceed len(tokenizer)
    fix = "build the memory with the LM's hidden size as width and its logits size as vocab_size, or use init 'plain'"
    if (cfg.vocab_size, cfg.model_width) != (vocab, d):
        raise MlpmemError(f"the LM's output embedding is [{vocab}, {d}] but the memory head is [{cfg.vocab_size}, {cfg.model_width}]", fix)
    lm_bias = getattr(head, "bias", None)
    if lm_bias is not None and memory.head.bias is None:
        raise MlpmemError("the LM's output layer has a bias but the memory head has none", "set head_bias=True")
    memory.head.weight.copy_(head.weight)  # a copy, never a shared tensor: the memory trains its own
    if memory.head.bias is not None:
        memory.head.bias.copy_(lm_bias if lm_bias is not None else torch.zeros_like(memory.head.bias))
    if init == "lm_copy":
        _copy_norm(memory.norm, find_final_norm(lm))
        if not cfg.zero_init_blocks or memory.proj is not None:
            log.warning("lm_copy without zero-initialised blocks or with an input projection: the memory does not start equal to the LM")
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(getattr(lm, "config", None), attr, None) not in (None, 1, 1.0):
            log.warning("the LM applies %s to its logits; the memory's copied head does not", attr)


def _copy_norm(dst: Norm, src: nn.Module) -> None:
    kind, eps = norm_kind(src)
    if (kind, eps) != (dst.kind, dst.eps):
        raise MlpmemError(
            f"the LM's final norm is {kind} (eps {eps}) but the memory uses {dst.kind} (eps {dst.eps})",
            "build the memory with the settings from lm_settings(lm, 'lm_copy')",
        )
    weight = getattr(src, "weight", None)
    if weight is not None:
        dst.weight.copy_(weight)
    elif kind == "rmsnorm_plus_one":
        dst.weight.zero_()
    else:
        dst.weight.fill_(1.0)
    if dst.bias is not None:
        bias = getattr(src, "bias", None)
        dst.bias.copy_(bias) if bias is not None else dst.bias.zero_()


# ----------------------------------------------------------------------------- saving and loading


def save_memory(folder: Path, memory: MLPMemory, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``memory_config.json`` atomically (config last).

    ``meta`` says where the memory's input comes from: base model_id,
    tokenizer_hash, input layer and site, training data.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage, and contiguous views are required
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in memory.state_dict().items()}
    tmp = folder / (WEIGHTS + ".partial")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS)
    write_json(folder / CONFIG, {"config": dataclasses.asdict(memory.config), "meta": meta})
    return folder


def load_memory(folder: Path, expect: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> tuple[MLPMemory, dict[str, Any]]:
    """Rebuild a memory from its folder. Returns (memory in eval mode, meta).

    ``expect`` may hold model_id, tokenizer_hash, layer, site: a memory made for
    another model, tokenizer or input is refused.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    fix = f"train the memory again into {folder}, or pass the folder that holds {CONFIG} and {WEIGHTS}"
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).exists():
            raise MlpmemError(f"{folder} holds no complete memory ({name} is missing)", fix)
    data = read_json(folder / CONFIG)
    try:
        cfg = MemoryConfig(**data["config"])
    except (KeyError, TypeError) as e:
        raise MlpmemError(f"{folder / CONFIG} does not describe a memory ({e})", fix)
    meta = data.get("meta", {})
    check_meta(meta, expect or {}, folder)
    try:
        state = load_file(str(folder / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as e:
        raise MlpmemError(f"{folder / WEIGHTS} is not readable ({e})", fix)
    with torch.device("meta"):  # skip a random init that would be overwritten at once
        memory = MLPMemory(cfg)
    try:
        memory.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise MlpmemError(f"the weights in {folder / WEIGHTS} do not fit its config ({e})", fix)
    memory.apply_freeze()
    return memory.eval(), meta


def check_meta(meta: dict[str, Any], expect: dict[str, Any], folder: Path) -> None:
    for key in ("model_id", "tokenizer_hash", "layer", "site"):
        want = expect.get(key)
        if want is not None and key in meta and meta[key] != want:
            raise MlpmemError(
                f"the memory in {folder} was trained for {key} {meta[key]!r}, but {want!r} is in use",
                "use the model and input layer the memory was trained for, or train a memory for this one",
            )
