"""A Hugging Face causal LM + a retriever-pretrained MLP memory (arXiv 2508.01832), in one file.

This file is the model, and it is self-contained: ``save_pretrained`` copies it next
to the weights, so ``AutoModelForCausalLM.from_pretrained(folder_or_repo,
trust_remote_code=True)`` works where mlpmem is not installed. It imports only the
standard library, torch, transformers and safetensors. Where mlpmem is importable
it is used for more (its errors, the tokenizer and weight fingerprint checks, its
model names such as ``smollm2-135m``); those imports sit in ``try`` blocks, which
transformers' remote-code import check skips.

``MLPMemoryForCausalLM`` holds a frozen causal LM (``.lm``) and an :class:`MLPMemory`
(``.memory``). Its forward returns, as ``logits``, the interpolated log-probabilities

    log p = logaddexp(log(1 - lambda) + log_softmax(lm_logits), log(lambda) + log_softmax(memory_logits / T))

which are valid logits for greedy search, sampling and beam search. The memory
reads the LM's hidden state at one (layer, site) through a forward hook that
exists only during the LM call.

The config is composite, like LlavaConfig: ``text_config`` is the base LM's own
config, ``memory_config`` the memory's, so ``MLPMemoryForCausalLM(config)`` builds
both parts and ``from_pretrained`` loads a full export (``model.safetensors`` with
``lm.*`` and ``memory.*``) through transformers' standard path, with hub ids,
``revision``, ``token``, ``cache_dir``, ``local_files_only`` and ``dtype="auto"``.
A folder saved by reference (``full_export=False``, like a PEFT adapter) holds the
memory only (``memory/``) and names the base model; ``from_pretrained`` then loads
the base from that name, or takes ``base_model=`` (a name or a loaded model).

Several memories on one LM (issue 12): ``from_parts(..., memories=[(name, module, meta)])``,
``add_memory`` / ``remove_memory``; each keeps its own read site and meta, the LM runs once with
a hook at every distinct site, and the mixture is ``log sum_k w_k p_k`` over the LM and the
memories, with fixed weights (``weights``, or lambda split evenly) or per-token weights from a
:class:`MemoryRouter` over the features of each memory against the LM (``set_router``; it
records the fingerprints of the memories it was fitted for). A memory is any module mapping
hidden states [..., d] to logits [..., V], or to normalised log-probs if it sets
``returns_logprobs = True`` (the kNN-LM retriever of mlpmem.retrieval, saved by reference).
With one memory everything is as above (``.memory``, ``.gate``, ``.site``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file

try:
    from mlpmem.errors import MlpmemError
except ImportError:  # the exported file, loaded without mlpmem: the same class, defined here

    class MlpmemError(Exception):  # type: ignore[no-redef]
        """Something the user can fix: says what is wrong and how to fix it."""

        def __init__(self, problem: str, fix: str = "") -> None:
            self.problem, self.fix = problem.rstrip("."), fix.rstrip(".")
            super().__init__(str(self))

        def __str__(self) -> str:
            return f"{self.problem}. {self.fix}." if self.fix else f"{self.problem}."


try:  # sub-config specs are how transformers >= 5.x builds `text_config` from a dict
    from transformers.configuration_utils import SubConfigSpec
except ImportError:
    SubConfigSpec = None

logger = logging.getLogger(__name__)

MEMORY_DIR = "memory"  # a saved-by-reference folder keeps the memory here (mlpmem's memory folder format)
MEMORY_WEIGHTS = "model.safetensors"
MEMORY_CONFIG = "memory_config.json"
SITES = ("ffn_input", "output")
ACTIVATIONS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm", "rmsnorm_plus_one")
INITS = ("plain", "lm_head", "lm_copy")
# keyword arguments of from_pretrained that say where files come from; a base model saved by
# reference is another repository, so it gets these but not `revision` or `subfolder`
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def check_lambda(lam: float) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:  # also refuses NaN
        raise MlpmemError(f"lambda must lie in [0, 1], got {lam}", "pass a mixture weight between 0 (LM only) and 1 (memory only)")
    return lam


def check_temperature(t: float) -> float:
    t = float(t)
    if not (t > 0 and math.isfinite(t)):
        raise MlpmemError(f"the memory temperature must be a positive number, got {t}", "pass e.g. memory_temperature=1.0 (the memory's own distribution)")
    return t


# ============================================================================ the memory network


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



def plain_init(m: nn.Module) -> None:
    """The "plain" start of one module: GPT-2's N(0, 0.02) linear weights, zero biases, unit norms."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, Norm):
        m.reset_parameters()

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
        self.head = nn.Linear(w, cfg.vocab_size, bias=cfg.head_bias)
        self.reset_parameters()
        self.apply_freeze()

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


def read_memory_folder(files: dict[str, str]) -> tuple[MLPMemory, dict[str, Any]]:
    """Build a memory from the two files of a memory folder (paths by name). Returns (memory in eval mode, meta)."""
    try:
        data = json.loads(Path(files[MEMORY_CONFIG]).read_text())
        with torch.device("meta"):  # skip a random init that would be overwritten at once
            memory = MLPMemory(MemoryConfig(**data["config"]))
        memory.load_state_dict(load_file(files[MEMORY_WEIGHTS]), strict=True, assign=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise MlpmemError(f"the memory in {Path(files[MEMORY_CONFIG]).parent} is not readable ({str(e).splitlines()[0][:200]})", "save the model again with save_pretrained")
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


# ============================================================================ the mixing gate
# lambda per token from cheap features of the two distributions (issue 12). The gate's forward and its
# file format live here, so an exported model mixes the same way without mlpmem; mlpmem.gate fits it.

GATE_DIR = "gate"  # a saved-by-reference folder keeps the gate here, as the memory in memory/
GATE_WEIGHTS = "model.safetensors"
GATE_CONFIG = "gate_config.json"
GATE_KINDS = ("mlp", "binned")
MIXINGS = ("fixed", "gated")
# every feature costs a few elementwise passes over the vocabulary, next to the memory's V x d head
GATE_FEATURES = ("lm_entropy", "lm_max_logprob", "memory_entropy", "memory_max_logprob", "kl_lm_memory", "kl_memory_lm", "argmax_agree")
KL_CAP = 100.0  # a KL to a distribution that gives a token no mass is infinite: capped, so the gate's input stays finite


def check_mixing(mixing: str) -> str:
    if mixing not in MIXINGS:
        raise MlpmemError(f"mixing must be one of {', '.join(MIXINGS)}, got {mixing!r}",
                          "pass mixing='fixed' (one lambda for every token) or mixing='gated' (lambda per token from the memory's gate)")
    return mixing


def gate_features(lm_logprobs: torch.Tensor, memory_logprobs: torch.Tensor) -> torch.Tensor:
    """Log-probs of the LM and the memory [..., V] -> the gate's features [..., len(GATE_FEATURES)] (float32).

    Entropies and the largest log-probability of each, both KL divergences (capped at
    KL_CAP) and whether the two agree on the most likely token. Tokens without mass
    (log-prob -inf) contribute 0 to an entropy, as p log p does in the limit.
    """
    # a few passes over [..., V]: two exps, two clamps, four row dot products and two max; -inf log-probs
    # (no mass) are clamped to a finite floor, where p = 0 makes every product with them 0 as in the limit
    floor = torch.finfo(torch.float32).min / 4
    lp, lq = lm_logprobs.float().clamp_min(floor), memory_logprobs.float().clamp_min(floor)
    p, q = lp.exp(), lq.exp()
    dot = lambda a, b: (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]  # noqa: E731  row-wise sum(a * b)
    p_lp, q_lq, p_lq, q_lp = dot(p, lp), dot(q, lq), dot(p, lq), dot(q, lp)
    h_p, h_q = -p_lp, -q_lq
    kl_pq, kl_qp = (p_lp - p_lq).clamp(0.0, KL_CAP), (q_lq - q_lp).clamp(0.0, KL_CAP)
    max_p, arg_p = lp.max(-1)
    max_q, arg_q = lq.max(-1)
    agree = (arg_p == arg_q).to(lp.dtype)
    return torch.stack([h_p.clamp_min(0.0), max_p, h_q.clamp_min(0.0), max_q, kl_pq, kl_qp, agree], -1)


class MixingGate(nn.Module):
    """Per-token lambda in [0, 1] from :func:`gate_features` [..., F] -> [...].

    ``kind="mlp"``: standardised features -> Linear(F, hidden) -> tanh -> Linear(hidden, 1)
    -> sigmoid (a few hundred parameters). ``kind="binned"``: the closed form, one
    lambda per bin of one feature (``bin_feature``, LM entropy by default), stored as
    logits: sigmoid(-inf) = 0 and sigmoid(+inf) = 1 exactly. Either way the output is a
    sigmoid, so it cannot leave [0, 1].
    """

    def __init__(self, kind: str = "mlp", features: tuple[str, ...] | list[str] = GATE_FEATURES, hidden: int = 32, bins: int = 8,
                 bin_feature: str = "lm_entropy") -> None:
        super().__init__()
        if kind not in GATE_KINDS:
            raise MlpmemError(f"unknown gate kind {kind!r}", f"choose one of {GATE_KINDS}")
        unknown = [f for f in features if f not in GATE_FEATURES]
        if unknown or not features:
            raise MlpmemError(f"unknown gate features {unknown or 'none'}", f"choose among {GATE_FEATURES}")
        if hidden < 1 or bins < 1:
            raise MlpmemError(f"a gate needs hidden >= 1 and bins >= 1, got hidden={hidden}, bins={bins}", "fix the gate settings")
        if bin_feature not in features:
            raise MlpmemError(f"the binned gate's feature {bin_feature!r} is not among its features {list(features)}", "add it to the features")
        self.kind, self.features, self.hidden, self.bins, self.bin_feature = kind, tuple(features), int(hidden), int(bins), bin_feature
        self.index = [GATE_FEATURES.index(f) for f in self.features]  # columns of gate_features' output
        n = len(self.features)
        if kind == "mlp":
            self.register_buffer("shift", torch.zeros(n))
            self.register_buffer("scale", torch.ones(n))
            self.inner = nn.Linear(n, self.hidden)
            self.out = nn.Linear(self.hidden, 1)
            nn.init.zeros_(self.out.weight)  # starts as a constant lambda (sigmoid of out.bias)
        else:
            self.register_buffer("edges", torch.zeros(self.bins - 1))
            self.register_buffer("bin_logits", torch.zeros(self.bins))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "features": list(self.features), "hidden": self.hidden, "bins": self.bins, "bin_feature": self.bin_feature}

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [..., len(GATE_FEATURES)] (all features, in GATE_FEATURES order) -> lambda [...]."""
        x = feats[..., self.index].to(self.scale.dtype if self.kind == "mlp" else self.edges.dtype)
        if self.kind == "binned":
            col = x[..., self.features.index(self.bin_feature)].contiguous()
            return torch.sigmoid(self.bin_logits[torch.bucketize(col, self.edges)])
        return torch.sigmoid(self.out(torch.tanh(self.inner((x - self.shift) / self.scale))))[..., 0]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_dict().values())


def memory_fingerprint(memory: nn.Module) -> str:
    """A hash that identifies a memory's weights (16 hex digits): its config, and a strided sample of up to 4096
    values of every tensor rounded to bfloat16 (so float32 and bfloat16 copies agree). A gate records it."""
    import hashlib

    h = hashlib.sha256(json.dumps(dataclasses.asdict(memory.config), sort_keys=True, default=str).encode())
    for name, t in sorted(memory.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 4096)][:4096].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_gate(gate_meta: dict[str, Any], memory: nn.Module, where: str = "the gate") -> None:
    """Refuse a gate trained for another memory (its meta's memory_fingerprint against this memory's)."""
    want = (gate_meta or {}).get("memory_fingerprint")
    if not want:
        raise MlpmemError(f"{where} does not record the memory it was trained for (no memory_fingerprint)", "train the gate again with mlpmem")
    got = memory_fingerprint(memory)
    if got != want:
        raise MlpmemError(f"{where} was trained for another memory (memory fingerprint {want}, this memory's is {got})",
                          "train a gate for this memory (recipe `eval: {mixing: gated}`, or mlpmem.gate.fit_gate), or use mixing='fixed'")


def build_gate(data: dict[str, Any]) -> MixingGate:
    try:
        return MixingGate(**data)
    except TypeError as e:
        raise MlpmemError(f"the gate's config {data} does not describe a gate ({e})", "save the gate again with mlpmem")


def read_gate_folder(folder: str | os.PathLike | None = None, files: dict[str, str] | None = None) -> tuple[MixingGate, dict[str, Any]]:
    """(gate in eval mode, its meta) from a gate folder (or its two files by name). Safetensors weights, JSON config."""
    files = files or {GATE_CONFIG: str(Path(folder) / GATE_CONFIG), GATE_WEIGHTS: str(Path(folder) / GATE_WEIGHTS)}
    where = Path(files[GATE_CONFIG]).parent
    for name in (GATE_CONFIG, GATE_WEIGHTS):
        if not files.get(name) or not Path(files[name]).is_file():
            raise MlpmemError(f"{where} holds no complete gate ({name} is missing)", "train or save the gate again")
    try:
        data = json.loads(Path(files[GATE_CONFIG]).read_text())
        gate = build_gate(data["config"])
        gate.load_state_dict(load_file(files[GATE_WEIGHTS]), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise MlpmemError(f"the gate in {where} is not readable ({str(e).splitlines()[0][:200]})", "train or save the gate again")
    check_gate_values(gate, str(where))
    return gate.eval(), data.get("meta", {})


def check_gate_values(gate: MixingGate, where: str) -> None:
    """NaN weights would give NaN lambdas (the sigmoid bounds everything else); the binned gate's edges must be sorted."""
    for name, t in gate.state_dict().items():
        if torch.isnan(t).any() or (name != "bin_logits" and not torch.isfinite(t).all()):
            raise MlpmemError(f"the gate in {where} has non-finite values in {name}", "train the gate again")
    if gate.kind == "binned" and gate.bins > 1 and not bool((gate.edges[1:] >= gate.edges[:-1]).all()):
        raise MlpmemError(f"the binned gate in {where} has unsorted bin edges", "train the gate again")


def write_gate_folder(folder: str | os.PathLike, gate: MixingGate, meta: dict[str, Any]) -> Path:
    """Write a gate: weights (safetensors), then the config that rebuilds it and its meta (written last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").float().contiguous().clone() for k, v in gate.state_dict().items()}
    tmp = folder / (GATE_WEIGHTS + ".partial")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / GATE_WEIGHTS)
    (folder / (GATE_CONFIG + ".partial")).write_text(json.dumps({"config": gate.config(), "meta": meta}, indent=2, default=str))
    os.replace(folder / (GATE_CONFIG + ".partial"), folder / GATE_CONFIG)
    return folder


def mix_per_token(lm_logprobs: torch.Tensor, memory_logprobs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """log((1 - lam) p_LM + lam p_mem) with lam [...] per position and log-probs [..., V]; exact at lam 0 and 1."""
    lam = lam.to(lm_logprobs.dtype)[..., None]
    return torch.logaddexp(torch.log1p(-lam) + lm_logprobs, torch.log(lam) + memory_logprobs)


class MemoryRouter(nn.Module):
    """Per-token weights over the LM and K memories (issue 12 item 2, the scoring path).

    ``forward(feats [..., K, F]) -> weights [..., K + 1]``: the :func:`gate_features` of each memory
    against the LM, standardised, through Linear(K*F, hidden) -> tanh -> Linear(hidden, K + 1) and a
    softmax, so the weights are >= 0 and sum to 1 by construction; column 0 is the LM's weight.
    """

    def __init__(self, n_memories: int, hidden: int = 32) -> None:
        super().__init__()
        if n_memories < 1:
            raise MlpmemError(f"a router needs at least one memory, got {n_memories}", "pass the memories to route between")
        self.n_memories, self.hidden = int(n_memories), int(hidden)
        n = self.n_memories * len(GATE_FEATURES)
        self.register_buffer("shift", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))
        self.inner = nn.Linear(n, self.hidden)
        self.out = nn.Linear(self.hidden, self.n_memories + 1)
        nn.init.zeros_(self.out.weight)  # starts as fixed weights (softmax of out.bias)

    def config(self) -> dict[str, Any]:
        return {"n_memories": self.n_memories, "hidden": self.hidden}

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.shape[-2:] != (self.n_memories, len(GATE_FEATURES)):
            raise MlpmemError(f"the router takes features of {self.n_memories} memories [..., {self.n_memories}, {len(GATE_FEATURES)}], "
                              f"got shape {tuple(feats.shape)}", "pass one gate_features row per memory, in the router's order")
        x = feats.flatten(-2).to(self.scale.dtype)
        return self.out(torch.tanh(self.inner((x - self.shift) / self.scale)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.logits(feats).softmax(-1)


def mix_routed(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k p_k: ``logprobs`` [..., K + 1, V] (full rows) or [..., K + 1] (per target), ``weights`` [..., K + 1]."""
    w = weights.to(logprobs.dtype)
    if logprobs.dim() == w.dim() + 1:
        return torch.logsumexp(torch.log(w)[..., None] + logprobs, dim=-2)
    return torch.logsumexp(torch.log(w) + logprobs, dim=-1)


# ============================================================================ several memories: components and the router's files
# A *component* is anything mixed with the LM: an nn.Module mapping the hidden state at its read site
# [..., d] to logits [..., V] (an MLPMemory), or to normalised log-probs [..., V] when it says so with
# ``returns_logprobs = True`` (a kNN-LM retriever, mlpmem.retrieval.KNNRetriever), plus a meta dict:
# ``layer`` and ``site`` (where it reads), and when known ``tokenizer_hash``, ``model_id`` (or
# ``base_model``) and ``model_fingerprint`` (the base model it was built for). The model reads every
# distinct site in one LM pass and mixes the LM with the components, by fixed weights or a router.

MEMORIES_DIR = "memories"  # a saved-by-reference folder keeps the second and later memories here, one subfolder each
ROUTER_DIR = "router"
ROUTER_CONFIG = "router_config.json"
NAME_RE = r"[A-Za-z][A-Za-z0-9_]{0,63}"
RESERVED_NAMES = ("lm", "gate", "router", "memory_router", "extra_memories")
MODEL_MIXINGS = ("fixed", "gated", "routed")


def check_model_mixing(mixing: str) -> str:
    if mixing not in MODEL_MIXINGS:
        raise MlpmemError(f"mixing must be one of {', '.join(MODEL_MIXINGS)}, got {mixing!r}",
                          "pass mixing='fixed' (fixed weights), 'gated' (one memory, lambda per token from its gate) or 'routed' "
                          "(weights per token from the router over several memories)")
    return mixing


def component_kind(module: nn.Module) -> str:
    """``"mlp"`` for an MLPMemory, ``"knn"`` for a kNN-LM retriever that its meta rebuilds (``from_reference``: the
    datastore and index folders, k, T), else ``"module"`` (mixed, but not savable)."""
    if isinstance(module, MLPMemory):
        return "mlp"
    if hasattr(type(module), "from_reference") and (getattr(module, "meta", None) or {}).get("kind") == "knn":
        return "knn"
    return "module"


def component_logprobs(module: nn.Module, h: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """h [..., d] -> the component's log-probs [..., V] (float32): a memory's logits / T, log-softmaxed; a retriever's as they are."""
    out = module(h).float()
    if getattr(module, "returns_logprobs", False):
        return out
    if temperature != 1.0:
        out = out / temperature
    return out.log_softmax(-1)


def component_fingerprint(module: nn.Module, meta: dict[str, Any] | None = None) -> str:
    """What a router records of each component it was fitted for: a memory's weight fingerprint, a retriever's own
    ``fingerprint`` (attribute or method) where it has one, else a hash of its meta."""
    import hashlib

    if isinstance(module, MLPMemory):
        return memory_fingerprint(module)
    meta = meta if meta is not None else getattr(module, "meta", {})
    if component_kind(module) == "knn":  # what decides its output: the data (manifest hashes), the read site, k and T
        meta = {k: meta.get(k) for k in ("datastore_manifest_sha256", "index_manifest_sha256", "layer", "site", "k", "temperature")}
    fp = getattr(module, "fingerprint", None)
    if fp is not None:
        return str(fp() if callable(fp) else fp)
    text = json.dumps(_jsonable(meta), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_name(name: str, taken: list[str]) -> str:
    if not isinstance(name, str) or not re.fullmatch(NAME_RE, name) or name in RESERVED_NAMES:
        raise MlpmemError(f"{name!r} cannot name a memory", "use a letter followed by letters, digits or _ (up to 64), not one of " + ", ".join(RESERVED_NAMES))
    if name in taken:
        raise MlpmemError(f"the model already has a memory named {name!r}", "pass another name=, or remove_memory it first")
    return name


def check_same_base(metas: dict[str, dict[str, Any]]) -> None:
    """Refuse components built for different base models or tokenizers (their recorded tokenizer hashes, weight fingerprints)."""
    fix = "combine only memories trained on the same base model and tokenizer"
    for key, label in (("tokenizer_hash", "tokenizers"), ("model_fingerprint", "base models")):
        seen = {}
        for name, meta in metas.items():
            v = (meta or {}).get(key)
            if isinstance(v, dict):  # a model fingerprint: its weights' hash says which model
                v = v.get("weights_sha256")
            if v:
                seen[name] = v
        if len(set(seen.values())) > 1:
            raise MlpmemError(f"the memories were built for different {label}: " + ", ".join(f"{n} {v}" for n, v in seen.items()), fix)


def check_weights(weights: Any, n_memories: int) -> list[float]:
    """Fixed mixture weights over the LM and n memories: n + 1 numbers in [0, 1] that sum to 1 (to 1e-6)."""
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise MlpmemError(f"mixture weights must be a list of numbers, got {weights!r}", f"pass {n_memories + 1} numbers: the LM's weight, then each memory's")
    if len(w) != n_memories + 1:
        raise MlpmemError(f"the model has {n_memories} memories, so it needs {n_memories + 1} mixture weights (the LM first), got {len(w)}",
                          "pass one weight for the LM and one per memory, in the model's order (model.memory_names)")
    if not all(0.0 <= x <= 1.0 for x in w) or abs(sum(w) - 1.0) > 1e-6:  # the comparisons also refuse NaN
        raise MlpmemError(f"mixture weights must each lie in [0, 1] and sum to 1, got {w}", "pass weights such as [0.6, 0.2, 0.2] (the LM first)")
    return w


def weights_from_lambda(lam: float, n_memories: int) -> list[float]:
    """lambda split evenly over the memories: [1 - lambda, lambda / n, ...]; n = 1 gives [1 - lambda, lambda]."""
    return [1.0 - lam] + [lam / n_memories] * n_memories


def read_router_folder(files: dict[str, str]) -> tuple[MemoryRouter, dict[str, Any]]:
    """(router in eval mode, its meta) from a router folder's two files by name (safetensors weights, JSON config)."""
    where = Path(files[ROUTER_CONFIG]).parent
    for name in (ROUTER_CONFIG, GATE_WEIGHTS):
        if not files.get(name) or not Path(files[name]).is_file():
            raise MlpmemError(f"{where} holds no complete router ({name} is missing)", "fit the router again and save the model")
    try:
        data = json.loads(Path(files[ROUTER_CONFIG]).read_text())
        router = MemoryRouter(**data["config"])
        router.load_state_dict(load_file(files[GATE_WEIGHTS]), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise MlpmemError(f"the router in {where} is not readable ({str(e).splitlines()[0][:200]})", "fit the router again and save the model")
    check_router_values(router, str(where))
    return router.eval(), data.get("meta", {})


def write_router_folder(folder: Path, router: MemoryRouter, meta: dict[str, Any]) -> None:
    """Write a router: weights (safetensors), then its config and meta (the fingerprints of the memories it was fitted for)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").float().contiguous().clone() for k, v in router.state_dict().items()}
    save_file(state, str(folder / (GATE_WEIGHTS + ".partial")), metadata={"format": "pt"})
    os.replace(folder / (GATE_WEIGHTS + ".partial"), folder / GATE_WEIGHTS)
    (folder / (ROUTER_CONFIG + ".partial")).write_text(json.dumps({"config": router.config(), "meta": meta}, indent=2, default=str))
    os.replace(folder / (ROUTER_CONFIG + ".partial"), folder / ROUTER_CONFIG)


def check_router_values(router: MemoryRouter, where: str) -> None:
    """Non-finite weights would give NaN weights per token (the softmax bounds everything else)."""
    for name, t in router.state_dict().items():
        if not torch.isfinite(t).all():
            raise MlpmemError(f"the router in {where} has non-finite values in {name}", "fit the router again")


# ============================================================================ reading the LM's hidden state
# mlpmem.models.capture does the same for the datastore (with more options); it is not imported here
# because this file must load without mlpmem, and mlpmem.models must import without transformers.
# tests/test_hf_remote.py checks that both read the same tensors at both sites.


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers, found from its structure (no per-model table)."""
    n = model.config.get_text_config().num_hidden_layers
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise MlpmemError(f"could not find the decoder layers of {type(model).__name__} (no list of {n} modules)", "use a standard Hugging Face causal LM")


def resolve_layer(model: nn.Module, layer: int) -> int:
    """A possibly negative layer index as a non-negative one, range checked."""
    n = len(decoder_layers(model))
    if not -n <= layer < n:
        raise MlpmemError(f"layer {layer} is out of range: the model has {n} decoder layers", f"choose a layer in {-n}..{n - 1} (negative counts from the end; -1 is the last)")
    return layer % n


@contextlib.contextmanager
def hidden_state(model: nn.Module, layer: int, site: str) -> Iterator[dict[str, torch.Tensor]]:
    """Hook layer ``layer`` of ``model`` while inside: ``store["h"]`` is its hidden state [batch, seq, d].

    ``ffn_input``: the input of the layer's feed-forward block, after its norm (the
    kNN-LM key). ``output``: the layer's output (residual stream).
    """
    if site not in SITES:
        raise MlpmemError(f"unknown hidden-state site {site!r}", f"choose one of {SITES}")
    block = decoder_layers(model)[layer]
    store: dict[str, torch.Tensor] = {}
    if site == "ffn_input":
        mlp = getattr(block, "mlp", None) or getattr(block, "feed_forward", None)
        if mlp is None:
            raise MlpmemError(f"decoder layer {type(block).__name__} has no `mlp` block to hook", "use site 'output' for this model")
        handle = mlp.register_forward_pre_hook(lambda m, args: store.__setitem__("h", args[0]))
    else:
        handle = block.register_forward_hook(lambda m, args, out: store.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        yield store
    finally:
        handle.remove()


class ReadSite(NamedTuple):
    """Where the memory reads: decoder ``layer`` (non-negative) and ``site`` within it."""

    layer: int
    site: str


def keep_positions(x: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> the kept positions, with transformers' meaning of ``logits_to_keep``: 0 all, n the last n, a tensor those."""
    if isinstance(logits_to_keep, int):
        return x if logits_to_keep == 0 else x[:, -logits_to_keep:]
    return x[:, logits_to_keep]


# ============================================================================ config


class MLPMemoryConfig(PretrainedConfig):
    """Config of an LM + memory pair.

    ``text_config``: the base LM's own config (a sub-config, as in LlavaConfig), so
    the model class can build the LM. ``memory_config``: the memory's
    :class:`MemoryConfig` as a dict. ``memory_meta``: where the memory reads (layer,
    site), the base model's id, tokenizer hash and weight fingerprint, its training
    data and results. ``base_model``: a hub id, a folder or an mlpmem model name.
    ``base_weights``: ``"included"`` (the weights file holds the LM too) or
    ``"reference"`` (only ``memory/`` is saved; the base is loaded from
    ``base_model``); folders saved before mlpmem 0.2 have neither it nor a
    text_config (``base_subfolder`` was their full export) and load by reference.
    ``max_position_embeddings`` / ``vocab_size``: the base's, for tools that read
    them from the top-level config (lm-eval). ``mixing``: ``"fixed"`` (one lambda) or
    ``"gated"`` (lambda per token from the gate described by ``gate_config``, whose
    weights are ``gate.*`` in a full export and ``gate/`` in a folder saved by reference).

    Several memories (issue 12): the fields above describe the first one (``memory_name``,
    default ``"memory"``; ``memory_kind`` ``"mlp"`` or ``"knn"``, a kNN-LM retriever saved by
    reference to its run folder); ``extra_memories`` lists the others in order, each
    ``{"name", "kind", "memory_config", "memory_meta"}`` (weights ``extra_memories.NAME.*`` in a
    full export, ``memories/NAME/`` by reference). ``weights``: fixed mixture weights [LM, each
    memory] (None: lambda_ split evenly over the memories). ``mixing="routed"`` takes per-token
    weights from the router described by ``router_config`` ({"config", "meta"}; its meta names the
    fingerprints of the memories it was fitted for), saved as ``memory_router.*`` or ``router/``.
    """

    model_type = "mlpmem"
    if SubConfigSpec is not None:
        sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True)}
    else:
        sub_configs = {"text_config": AutoConfig}

    text_config: dict | PretrainedConfig | None = None
    memory_config: dict | None = None
    memory_meta: dict | None = None
    base_model: str | None = None
    base_weights: str | None = None
    base_subfolder: str | None = None
    lambda_: float = 0.25
    memory_temperature: float = 1.0
    # "gated": lambda per token from the gate (gate_config: {"config": MixingGate's, "meta": ...}); "fixed": lambda_
    mixing: str = "fixed"
    gate_config: dict | None = None
    memory_name: str | None = None
    memory_kind: str | None = None
    extra_memories: list | None = None
    weights: list | None = None
    router_config: dict | None = None
    max_position_embeddings: int | None = None
    vocab_size: int | None = None

    def text(self) -> PretrainedConfig | None:
        """The base LM's config as a config object (older transformers leave the JSON dict as it is)."""
        if isinstance(self.text_config, dict):
            self.text_config = AutoConfig.for_model(**self.text_config)
        return self.text_config

    def saved_by_reference(self) -> bool:
        return self.text_config is None or self.base_weights == "reference"


# ============================================================================ model


class MLPMemoryForCausalLM(PreTrainedModel, GenerationMixin):
    """A frozen causal LM mixed with one or more memories; ``forward`` returns log-probs as ``logits``.

    ``MLPMemoryForCausalLM(config)`` builds every part from the config (random
    weights, as any ``cls(config)``); :meth:`from_pretrained` loads saved ones;
    :meth:`from_parts` pairs a loaded LM with a memory (and more, ``memories=``);
    :meth:`add_memory` / :meth:`remove_memory` change the set later. ``.memory`` is the
    first memory (and, with one memory, the only one), ``.gate`` its gate; the others are
    in ``.extra_memories``; ``components()`` lists all of them by name, in mixing order.
    """

    config_class = MLPMemoryConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    # the memories keep float32 when the LM is loaded in half precision: they are small next to
    # the LM, and their log-softmax over the vocabulary is where half precision would hurt
    _keep_in_fp32_modules_strict = ["memory", "gate", "extra_memories", "memory_router"]
    # attention runs in the base LM, which decides what it supports
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: MLPMemoryConfig, lm: PreTrainedModel | None = None, memory: nn.Module | None = None,
                 gate: MixingGate | None = None, extra: dict[str, nn.Module] | None = None, router: MemoryRouter | None = None) -> None:
        super().__init__(config)
        given = lm is not None
        if lm is None:
            if config.text() is None:
                raise MlpmemError(
                    "this LM + memory config has no text_config (the base model's config), so it cannot build the base model",
                    "load the folder with MLPMemoryForCausalLM.from_pretrained (it reads the base model by reference), or export it again with mlpmem",
                )
            lm = AutoModelForCausalLM.from_config(config.text())
        entries = list(config.extra_memories or [])
        extra = dict(extra or {})
        if memory is None:
            memory = _build_component(config.memory_kind, config.memory_config, config.memory_meta)
        for e in entries:
            if e["name"] not in extra:
                extra[e["name"]] = _build_component(e.get("kind"), e.get("memory_config"), e.get("memory_meta"))
        if gate is None and config.gate_config:
            gate = build_gate(config.gate_config["config"])
        if router is None and config.router_config:
            router = MemoryRouter(**config.router_config["config"])
        self.lm = lm
        self.memory = memory
        self.extra_memories = nn.ModuleDict({e["name"]: extra[e["name"]] for e in entries})
        self.gate = gate  # the first memory's gate; None: no per-token lambda
        self.memory_router = router  # per-token weights over the LM and every memory; None: fixed weights
        self.tokenizer = None  # kept to save it next to the model; not a module
        self.lambda_ = check_lambda(config.lambda_)
        self.memory_temperature = check_temperature(config.memory_temperature)
        self.weights = check_weights(config.weights, self.n_memories) if config.weights is not None else None
        self.sites: dict[str, ReadSite] = {}
        for name in self.memory_names:
            meta = self.component_meta(name)
            self.sites[name] = ReadSite(resolve_layer(lm, int(meta["layer"])), str(meta["site"]))
        self.mixing_mode = "fixed"
        self.set_lambda(mode=config.mixing or "fixed")
        # older or remote-code models compute every position's logits: slice them here instead
        self._lm_keeps_logits = "logits_to_keep" in inspect.signature(lm.forward).parameters
        self.post_init()
        if given:
            # the generation defaults (eos, pad, bos, max_length) are the base model's
            self.generation_config = copy.deepcopy(lm.generation_config)

    def init_weights(self) -> None:
        # every part initialises itself when built (the LM in from_config, a memory in its
        # constructor), and parts handed in arrive trained: initialising them again here would
        # at best repeat that and at worst erase a trained part. Weights missing from a
        # checkpoint are still initialised by from_pretrained, through _init_weights.
        pass

    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this for weights a checkpoint lacks, module by module (those of the LM
        # go to the LM's own _init_weights): a memory's get its "plain" start
        plain_init(module)

    # ------------------------------------------------------------------ the memories

    @property
    def memory_names(self) -> list[str]:
        """The memories' names in mixing order (the router's and ``weights``' order after the LM)."""
        return [self.config.memory_name or "memory", *(e["name"] for e in self.config.extra_memories or [])]

    @property
    def n_memories(self) -> int:
        return 1 + len(self.config.extra_memories or [])

    @property
    def site(self) -> ReadSite:
        """Where the first memory reads (the single-memory attribute)."""
        return self.sites[self.memory_names[0]]

    @property
    def router(self) -> MemoryRouter | None:
        return self.memory_router

    def components(self) -> dict[str, nn.Module]:
        """Every memory by name, in mixing order."""
        return {self.memory_names[0]: self.memory, **dict(self.extra_memories.items())}

    def component_meta(self, name: str) -> dict[str, Any]:
        if name == self.memory_names[0]:
            return dict(self.config.memory_meta or {})
        for e in self.config.extra_memories or []:
            if e["name"] == name:
                return dict(e.get("memory_meta") or {})
        raise MlpmemError(f"the model has no memory named {name!r}", f"choose one of {self.memory_names}")

    def add_memory(self, memory: "str | os.PathLike | nn.Module", name: str | None = None, meta: dict[str, Any] | None = None) -> str:
        """Add a memory: a memory folder of mlpmem's train stage, or a module (an MLPMemory, or a component
        such as mlpmem.retrieval.KNNRetriever, with its ``meta`` or ``meta=``). Returns its name.

        It must read a site of this LM and have been built for the same base model and tokenizer as the
        others. A router fitted for the previous set no longer applies: it is dropped (mixing falls back
        to fixed weights, lambda split evenly) until one is fitted for the new set (:meth:`set_router`).
        """
        module, meta = _component_from(memory, meta)
        name = check_name(name or _free_name(self.memory_names), self.memory_names)
        check_same_base({**{n: self.component_meta(n) for n in self.memory_names}, name: meta})
        check_component(self.lm, module, meta, self.tokenizer)
        self.extra_memories[name] = module.to(_device_of(self.lm)).eval()
        self.config.extra_memories = [*(self.config.extra_memories or []), _entry(name, module, meta)]
        self.sites[name] = ReadSite(resolve_layer(self.lm, int(meta["layer"])), str(meta["site"]))
        forget_fitted_mixing(self, f"memory {name!r} added")
        return name

    def remove_memory(self, name: str) -> None:
        """Remove a memory by name; the last one cannot go (an LM without memories is the base model itself)."""
        names = self.memory_names
        self.component_meta(name)  # refuses an unknown name
        if len(names) == 1:
            raise MlpmemError(f"{name!r} is the model's only memory, and a model needs at least one",
                              "add another memory first, or use the base model alone (lambda_=0 gives it bit for bit)")
        if name == names[0]:  # the next memory takes the first place, with its own meta; the gate was the first memory's
            first = self.config.extra_memories[0]
            self.memory = self.extra_memories.pop(first["name"])
            self.config.memory_name, self.config.memory_kind = first["name"], first.get("kind", "mlp")
            self.config.memory_config, self.config.memory_meta = first.get("memory_config"), first.get("memory_meta")
            self.config.extra_memories = self.config.extra_memories[1:]
            self.gate, self.config.gate_config = None, None
        else:
            del self.extra_memories[name]
            self.config.extra_memories = [e for e in self.config.extra_memories if e["name"] != name]
        self.sites.pop(name)
        forget_fitted_mixing(self, f"memory {name!r} removed")

    def set_router(self, router: MemoryRouter, meta: dict[str, Any] | None = None, mixing: str = "routed") -> None:
        """Attach a router (mlpmem.gate.fit_router's, or mlpmem.hf.fit_router's) for this model's memories, in order.

        ``meta``: the router's record; its ``memory_fingerprints`` must be this model's memories'
        (a router fitted for other memories is refused). Without one, the router is taken to be
        fitted for the memories as they are now, and that is recorded.
        """
        if not isinstance(router, MemoryRouter):
            raise MlpmemError(f"a router must be a MemoryRouter, got {type(router).__name__}", "fit one with mlpmem.gate.fit_router")
        if router.n_memories != self.n_memories:
            raise MlpmemError(f"the router weighs {router.n_memories} memories and this model has {self.n_memories}",
                              "fit a router for this model's memories (mlpmem.hf.fit_router)")
        check_router_values(router, "the router")
        meta = dict(meta) if meta else {}
        if meta.get("memory_fingerprints") is None:
            meta.update(self.router_meta())
        check_router(meta, self)
        self.memory_router = router.to(_device_of(self.lm)).eval()
        self.config.router_config = {"config": router.config(), "meta": _jsonable(meta)}
        self.set_lambda(mode=mixing)

    def router_meta(self) -> dict[str, Any]:
        """What a router fitted for this model's memories records: their names and fingerprints, in order."""
        return {"memory_names": self.memory_names,
                "memory_fingerprints": [component_fingerprint(m, self.component_meta(n)) for n, m in self.components().items()]}

    # ------------------------------------------------------------------ building from parts

    @classmethod
    def from_parts(
        cls,
        lm: PreTrainedModel,
        memory: nn.Module,
        meta: dict[str, Any],
        *,
        tokenizer: Any = None,
        base_model: str | None = None,
        lambda_: float = 0.25,
        memory_temperature: float = 1.0,
        gate: MixingGate | None = None,
        gate_meta: dict[str, Any] | None = None,
        mixing: str | None = None,
        name: str | None = None,
        memories: "list[tuple[str, nn.Module, dict[str, Any]]] | None" = None,
        weights: list[float] | None = None,
        router: MemoryRouter | None = None,
        router_meta: dict[str, Any] | None = None,
    ) -> "MLPMemoryForCausalLM":
        """Pair a loaded LM with a memory (and its mixing gate, if any), and optionally more memories.

        ``meta`` is the memory's meta (at least ``layer`` and ``site``; ``tokenizer_hash``,
        ``model_id`` and ``model_fingerprint`` when known). ``base_model`` is the
        reference saved in the config (default: meta's model_id, else the LM's
        name_or_path). The LM is checked against the memory: layer, sizes, and where
        mlpmem is installed the tokenizer and the weights' fingerprint. ``gate`` (with
        ``gate_meta``, which must name this memory's fingerprint) mixes per token; ``mixing``
        defaults to ``"routed"`` with a router, else ``"gated"`` when a gate is given and there
        is one memory, else ``"fixed"``. ``name``: the memory's name (default ``"memory"``).
        ``memories``: more memories as (name, module, meta), in order; ``weights``: fixed mixture
        weights [LM, each memory] (default: lambda_ split evenly); ``router`` (with ``router_meta``,
        whose fingerprints must be these memories') weighs them per token.
        """
        memory, meta = _component_from(memory, meta)
        name = check_name(name or "memory", [])
        parts = [(name, memory, meta)]
        for n, m, mt in memories or []:
            m, mt = _component_from(m, mt)
            parts.append((check_name(n, [p[0] for p in parts]), m, mt))
        check_same_base({n: mt for n, _, mt in parts})  # first: a mix of bases is named as such
        for _, m, mt in parts:
            check_component(lm, m, mt, tokenizer)
        for n, m, _ in parts:
            if component_kind(m) == "module":
                logger.info("memory %r (%s) cannot be saved with the model (it is neither an MLPMemory nor a retriever with a run folder)", n, type(m).__name__)
        if gate is not None:
            check_gate(gate_meta or {}, memory)
            check_gate_values(gate, "the gate")
        mixing = check_model_mixing(mixing or ("routed" if router is not None else "gated" if gate is not None and len(parts) == 1 else "fixed"))
        ref = base_model or meta.get("model_id") or meta.get("base_model") or getattr(lm.config, "name_or_path", None) or None
        text_cfg = lm.config.get_text_config()
        config = MLPMemoryConfig(
            text_config=copy.deepcopy(lm.config),
            memory_config=dataclasses.asdict(memory.config) if isinstance(memory, MLPMemory) else None,
            memory_meta=_jsonable(dict(meta)),
            memory_name=name,
            memory_kind=component_kind(memory),
            extra_memories=[_entry(n, m, mt) for n, m, mt in parts[1:]] or None,
            weights=check_weights(weights, len(parts)) if weights is not None else None,
            base_model=str(ref) if ref else None,
            lambda_=check_lambda(lambda_),
            memory_temperature=check_temperature(memory_temperature),
            mixing="fixed",
            gate_config={"config": gate.config(), "meta": _jsonable(gate_meta or {})} if gate is not None else None,
            max_position_embeddings=getattr(text_cfg, "max_position_embeddings", None),
            vocab_size=int(lm.get_output_embeddings().weight.shape[0]),
            eos_token_id=lm.generation_config.eos_token_id,
            bos_token_id=lm.generation_config.bos_token_id,
            pad_token_id=lm.generation_config.pad_token_id,
        )
        config.dtype = config.text_config.dtype = lm.dtype  # what dtype="auto" restores
        model = cls(config, lm=lm, memory=memory, gate=gate.eval() if gate is not None else None, extra={n: m.eval() for n, m, _ in parts[1:]})
        model.tokenizer = tokenizer
        if router is not None:
            model.set_router(router, router_meta, mixing=mixing)
        else:
            model.set_lambda(mode=mixing)
        return model.eval()  # an inference wrapper: no dropout in the LM

    @classmethod
    def from_memory(cls, memory_dir: "str | os.PathLike | list", base_model: str | None = None, **kwargs: Any) -> "MLPMemoryForCausalLM":
        """Pair one or more memory folders from mlpmem's train stage with their base model (needs mlpmem; see mlpmem.hf.from_memory)."""
        try:
            from mlpmem.hf import from_memory
        except ImportError:
            raise MlpmemError("from_memory reads a memory folder of mlpmem's train stage and needs the mlpmem package", "install mlpmem, or load an exported folder with from_pretrained")
        return from_memory(cls, memory_dir, base_model, **kwargs)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        base_model: "str | os.PathLike | PreTrainedModel | None" = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> "MLPMemoryForCausalLM":
        """Load a saved LM + memory (a folder or a hub repo id).

        A full export (the weights file holds the LM and the memories) goes through
        transformers' own ``from_pretrained`` unchanged, with all its keywords
        (``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``dtype``,
        ``device_map``, ...); ``lambda_=`` and ``memory_temperature=`` override the
        saved values, as any config attribute. Two cases build the model from
        parts instead: a folder saved by reference (the base model is loaded from
        the name in its config) and ``base_model=`` (a name or a loaded model used
        instead of the saved base). ``tokenizer=`` is checked against the memory's.
        """
        config = kwargs.get("config")
        fix = "pass a folder or repo written by MLPMemoryForCausalLM.save_pretrained, or save the model again"
        local = Path(pretrained_model_name_or_path)
        if (local.is_dir() or not _hub_like(str(pretrained_model_name_or_path))) and not (local / kwargs.get("subfolder", "") / "config.json").is_file():
            raise MlpmemError(f"{local} holds no saved LM + memory model (config.json is missing)", fix)
        if not isinstance(config, PretrainedConfig):
            hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
            try:
                config = MLPMemoryConfig.from_pretrained(pretrained_model_name_or_path, **hub)
            except OSError as e:
                raise MlpmemError(f"{pretrained_model_name_or_path} holds no saved LM + memory model ({str(e).splitlines()[0][:200]})", fix)
        if getattr(config, "model_type", None) != "mlpmem":
            raise MlpmemError(f"{pretrained_model_name_or_path} holds a {config.model_type!r} model, not an LM + memory ('mlpmem')", fix)
        if base_model is None and not config.saved_by_reference():
            if local.is_dir() and not any((local / kwargs.get("subfolder", "")).glob("model*.safetensors")):
                raise MlpmemError(f"the full export in {local} is incomplete: it holds no model.safetensors", "export the model again with save_pretrained(..., full_export=True)")
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            if "lambda_" in kwargs and "weights" not in kwargs:
                model.weights = model.config.weights = None  # the lambda asked for, not the saved weights
            if model.gate is not None:
                check_gate((model.config.gate_config or {}).get("meta", {}), model.memory, f"the gate in {pretrained_model_name_or_path}")
                check_gate_values(model.gate, str(pretrained_model_name_or_path))
            if model.memory_router is not None:
                check_router((model.config.router_config or {}).get("meta", {}), model, f"the router in {pretrained_model_name_or_path}")
                check_router_values(model.memory_router, str(pretrained_model_name_or_path))
            if tokenizer is not None:
                for n, m in model.components().items():
                    check_component(model.lm, m, model.component_meta(n), tokenizer)
                model.tokenizer = tokenizer
            return model
        return _from_pretrained_parts(cls, str(pretrained_model_name_or_path), config, base_model, tokenizer, kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, full_export: bool = False, tokenizer: Any = None, **kwargs: Any) -> None:  # type: ignore[override]
        """Write the model: config.json, the weights, this file (for trust_remote_code), the tokenizer, README.md.

        ``full_export=True``: ``model.safetensors`` holds the LM and the memories, the
        folder needs nothing else, and it loads through transformers' standard
        path. Otherwise only the memories are saved (the first in ``memory/``, the
        others in ``memories/NAME/``, the router in ``router/``) and the config names
        the base model, which must still be loadable from there (or be passed as
        ``base_model=``) later. A kNN-LM retriever is saved by reference to its run
        folder, so it needs ``full_export=False``. Other keywords go to transformers'
        save_pretrained (``max_shard_size``, ...). ``model.push_to_hub(repo)`` works as
        for any model (it saves by reference); to publish a full export, save it and
        upload the folder (``huggingface_hub.upload_folder``). config.json is deleted
        first and written last, so an interrupted save is never taken for a finished one.
        """
        if kwargs.get("push_to_hub"):
            # transformers would upload before the tokenizer and the card are written
            raise MlpmemError("save_pretrained(push_to_hub=True) would upload an incomplete folder",
                              "save the folder, then upload it with huggingface_hub.upload_folder, or call model.push_to_hub(repo_id)")
        kinds = {n: component_kind(m) for n, m in self.components().items()}
        unsavable = [n for n, k in kinds.items() if k == "module"]
        if unsavable:
            raise MlpmemError(f"the memories {unsavable} cannot be saved: they are neither MLP memories nor retrievers with a run folder",
                              "remove them before saving (remove_memory), or add them again after loading")
        if full_export and any(k != "mlp" for k in kinds.values()):
            raise MlpmemError(f"a full export holds MLP memories only, and {[n for n, k in kinds.items() if k != 'mlp']} are kNN-LM retrievers (an index is saved by reference)",
                              "save with full_export=False (the retriever's run folder is named in the config)")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        # base/ and memory/ are replaced below: only in a folder an earlier save of this class wrote
        if not _saved_by_us(folder) and any((folder / name).exists() for name in ("base", MEMORY_DIR, GATE_DIR, MEMORIES_DIR, ROUTER_DIR)):
            raise MlpmemError(f"{folder} holds a base/ or memory/ folder that no earlier save of an mlpmem model wrote, and saving would replace it",
                              "save into a new or empty folder")
        (folder / "config.json").unlink(missing_ok=True)
        tok = tokenizer if tokenizer is not None else self.tokenizer
        self.config.lambda_, self.config.memory_temperature = self.lambda_, self.memory_temperature
        self.config.mixing, self.config.weights = self.mixing_mode, self.weights
        if self.gate is None:
            self.config.gate_config = None
        if self.memory_router is None:
            self.config.router_config = None
        self.config.base_subfolder = None
        for stale in [folder / "base", *folder.glob("model*.safetensors"), *folder.glob("model.safetensors.index.json")]:
            _remove(stale)  # a previous save of the other kind must not shadow this one
        for stale in (MEMORY_DIR, GATE_DIR, MEMORIES_DIR, ROUTER_DIR):
            _remove(folder / stale)
        n_params = sum(m.num_parameters() for m in self.components().values() if isinstance(m, MLPMemory))
        if full_export:  # one weights file with every part, through transformers' own save
            if tok is None:
                raise MlpmemError("a full export needs the tokenizer, and this model has none attached", "pass tokenizer= to save_pretrained")
            self.config.base_weights = "included"
            # transformers writes config.json before the weights: stage the save, then move config.json last
            staging = folder / ".partial"
            _remove(staging)
            super().save_pretrained(staging, **kwargs)
            tok.save_pretrained(staging)
            (staging / "README.md").write_text(model_card(self.config, True, n_params, _num_params(self.lm)))
            for f in sorted(staging.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(f, folder / f.name)
            staging.rmdir()
            return
        # by reference: the memories only (memory folders), the base named in the config
        if not self.config.base_model:
            raise MlpmemError("the base model has no reference (hub id or folder) to save", "use full_export=True, or build the model with from_parts(..., base_model=PATH)")
        if not _hub_like(self.config.base_model) or Path(self.config.base_model).exists():
            logger.warning("the saved folder names its base model by the local name %r: it loads only where that exists "
                           "(or with base_model=); full_export=True makes it self-contained", self.config.base_model)
        self.config.base_weights = "reference"
        for i, (name, module) in enumerate(self.components().items()):
            if isinstance(module, MLPMemory):
                write_memory_folder(folder / MEMORY_DIR if i == 0 else folder / MEMORIES_DIR / name, module, self.component_meta(name))
        if self.gate is not None:
            write_gate_folder(folder / GATE_DIR, self.gate, (self.config.gate_config or {}).get("meta", {}))
        if self.memory_router is not None:
            write_router_folder(folder / ROUTER_DIR, self.memory_router, (self.config.router_config or {}).get("meta", {}))
        self.generation_config.save_pretrained(folder)
        custom_object_save(self, folder, config=self.config)  # this file, and auto_map in the config
        if tok is not None:
            tok.save_pretrained(folder)
        (folder / "README.md").write_text(model_card(self.config, False, n_params, _num_params(self.lm)))
        self.config.save_pretrained(folder)

    # ------------------------------------------------------------------ mixing weights

    def set_lambda(self, lambda_: float | None = None, memory_temperature: float | None = None, mode: str | None = None,
                   weights: list[float] | None = None) -> None:
        """Set the defaults used when a call does not pass them: lambda, memory temperature, mixing mode
        ("fixed", "gated" or "routed") and fixed weights [LM, each memory] (a new lambda_ clears them)."""
        if mode is not None:
            check_model_mixing(mode)
            if mode == "gated" and (self.gate is None or self.n_memories > 1):
                raise MlpmemError("mixing='gated' needs a gate, and this model has none" if self.gate is None else
                                  f"mixing='gated' is for one memory (its gate), and this model has {self.n_memories}",
                                  "use mixing='fixed', or load a memory saved with its gate" if self.gate is None else
                                  "use mixing='routed' with a router for these memories (set_router), or mixing='fixed'")
            if mode == "routed" and self.memory_router is None:
                raise MlpmemError("mixing='routed' needs a router, and this model has none",
                                  "fit one for its memories (mlpmem.hf.fit_router) or attach one (set_router), or use mixing='fixed'")
            self.mixing_mode = self.config.mixing = mode
        if lambda_ is not None:
            self.lambda_ = self.config.lambda_ = check_lambda(lambda_)
            self.weights = self.config.weights = None
        if weights is not None:
            self.weights = self.config.weights = check_weights(weights, self.n_memories)
        if memory_temperature is not None:
            self.memory_temperature = self.config.memory_temperature = check_temperature(memory_temperature)

    @contextlib.contextmanager
    def mixing(self, lambda_: float | None = None, memory_temperature: float | None = None, mode: str | None = None,
               weights: list[float] | None = None) -> Iterator["MLPMemoryForCausalLM"]:
        """``with model.mixing(lambda_=0.5, mode="fixed"): ...``: set lambda / T / mixing mode / weights inside the block, restore them after."""
        saved = (self.lambda_, self.memory_temperature, self.mixing_mode, self.weights)
        self.set_lambda(lambda_, memory_temperature, mode, weights)
        try:
            yield self
        finally:
            self.lambda_, self.memory_temperature, self.mixing_mode, self.weights = saved
            self.config.lambda_, self.config.memory_temperature, self.config.mixing, self.config.weights = saved

    def fixed_weights(self, lambda_: float | None = None, weights: list[float] | None = None) -> list[float]:
        """The fixed mixture weights [LM, each memory] a call uses: ``weights``, else ``lambda_`` split evenly,
        else the model's weights, else its lambda split evenly."""
        if weights is not None:
            return check_weights(weights, self.n_memories)
        if lambda_ is not None:
            return weights_from_lambda(check_lambda(lambda_), self.n_memories)
        return list(self.weights) if self.weights is not None else weights_from_lambda(self.lambda_, self.n_memories)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        lambda_: float | None = None,
        memory_temperature: float | None = None,
        mixing: str | None = None,
        weights: list[float] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> ``logits`` [B, K, V] = the mixture's log-probs (float32).

        K is the number of kept positions (``logits_to_keep``: 0 keeps all, an int n
        the last n, a tensor the given positions). The LM and the memories all run
        only on the kept positions, so a decode step costs one call of each memory on one
        row per sequence; the LM runs once, with a hook at every distinct read site.
        lambda = 0 returns exactly ``log_softmax(lm_logits.float())`` and skips the
        memories; with one memory lambda = 1 returns its log-probs alone. With
        ``labels`` [B, T] the loss is the mean next-token NLL under the mixture
        (needs all positions kept). ``lambda_`` / ``memory_temperature`` given here
        (or to ``generate``, which passes unknown keywords to every step's forward)
        override the model's defaults for this call. ``mixing="gated"`` (one memory) takes
        lambda per position from the gate (over :func:`gate_features` of the two
        distributions); ``mixing="routed"`` takes weights over the LM and every memory per
        position from the router (over the features of each memory against the LM);
        ``"fixed"`` mixes by ``weights`` [LM, each memory] (default: lambda split evenly over
        the memories). A ``lambda_`` or ``weights`` given to a call asks for the fixed
        mixture (so ``lambda_=0`` is the base LM whatever the mode).
        """
        fixed_asked = lambda_ is not None or weights is not None
        if mixing is not None and fixed_asked and check_model_mixing(mixing) != "fixed":
            raise MlpmemError(f"a call cannot take both mixing={mixing!r} and a fixed lambda_ or weights", "pass one of them")
        mode = check_model_mixing(mixing) if mixing is not None else ("fixed" if fixed_asked else self.mixing_mode)
        if mode == "gated" and (self.gate is None or self.n_memories > 1):
            raise MlpmemError("mixing='gated' needs a gate, and this model has none" if self.gate is None else
                              f"mixing='gated' is for one memory, and this model has {self.n_memories}",
                              "use mixing='fixed', or load a memory saved with its gate" if self.gate is None else "use mixing='routed' or 'fixed'")
        if mode == "routed" and self.memory_router is None:
            raise MlpmemError("mixing='routed' needs a router, and this model has none", "attach one with set_router, or use mixing='fixed'")
        w = self.fixed_weights(lambda_, weights) if mode == "fixed" else None
        temp = self.memory_temperature if memory_temperature is None else check_temperature(memory_temperature)
        comps = self.components()
        # a memory with weight 0 is not run at all: lambda = 0 is the base LM's own call
        active = [n for i, n in enumerate(comps) if w is None or w[i + 1] > 0.0]
        base_kwargs: dict[str, Any] = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        if cache_position is not None:
            base_kwargs["cache_position"] = cache_position
        if self._lm_keeps_logits:
            base_kwargs["logits_to_keep"] = logits_to_keep
        with contextlib.ExitStack() as stack:
            stores = {site: stack.enter_context(hidden_state(self.lm, *site)) for site in dict.fromkeys(self.sites[n] for n in active)}
            out = self.lm(**base_kwargs)
        logits = out.logits if self._lm_keeps_logits else keep_positions(out.logits, logits_to_keep)
        logprobs = logits.float().log_softmax(-1)
        lps = {n: component_logprobs(comps[n], keep_positions(stores[self.sites[n]]["h"], logits_to_keep), temp) for n in active}
        for n, lp in lps.items():
            if lp.shape != logprobs.shape:
                raise MlpmemError(f"memory {n!r} gives log-probs of shape {tuple(lp.shape)}, the LM {tuple(logprobs.shape)}",
                                  "use a memory built for this base model's vocabulary")
        if mode == "gated":
            mem_lp = lps[active[0]]
            gate_lam = self.gate(gate_features(logprobs, mem_lp))  # [B, K], in [0, 1] (a sigmoid)
            logprobs = mix_per_token(logprobs, mem_lp, gate_lam.to(logprobs.dtype))
        elif mode == "routed":
            feats = torch.stack([gate_features(logprobs, lps[n]) for n in comps], -2)  # [B, K, N, F]
            log_w = torch.log(self.memory_router(feats).to(logprobs.dtype))  # [B, K, N + 1], rows sum to 1 (a softmax)
            mixed = log_w[..., :1] + logprobs
            for i, n in enumerate(comps):
                mixed = torch.logaddexp(mixed, log_w[..., i + 1 : i + 2] + lps[n])
            logprobs = mixed
        elif len(comps) == 1 and active:  # one memory, fixed lambda: the two-term form, exact at lambda 1
            lam = w[1]
            mem_lp = lps[active[0]]
            logprobs = mem_lp if lam == 1.0 else torch.logaddexp(logprobs + math.log1p(-lam), mem_lp + math.log(lam))
        elif active:  # several memories, fixed weights: log sum_k w_k p_k over the terms with weight > 0
            terms = ([logprobs + math.log(w[0])] if w[0] > 0.0 else []) + [lps[n] + math.log(w[i + 1]) for i, n in enumerate(comps) if n in lps]
            logprobs = terms[0]
            for t in terms[1:]:
                logprobs = torch.logaddexp(logprobs, t)
        loss = None
        if labels is not None:
            if logprobs.shape[1] != labels.shape[1]:
                raise MlpmemError("labels need the log-probs of every position", "call with logits_to_keep=0 when passing labels")
            loss = F.nll_loss(logprobs[:, :-1].reshape(-1, logprobs.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss, logits=logprobs, past_key_values=getattr(out, "past_key_values", None),
            hidden_states=getattr(out, "hidden_states", None), attentions=getattr(out, "attentions", None),
        )

    # ------------------------------------------------------------------ generation: the base model decides
    # the cache is shaped from config.text_config (the base's config) by transformers itself, and beam
    # search reorders it through the Cache object: only the inputs of each step need the base model

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        # our own keywords (lambda_, memory_temperature, logits_to_keep) pass through unchanged
        return self.lm.prepare_inputs_for_generation(input_ids, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm.get_output_embeddings()


MLPMemoryConfig.register_for_auto_class()
MLPMemoryForCausalLM.register_for_auto_class("AutoModelForCausalLM")


# ============================================================================ checks, loading by reference, the card


def check_parts(lm: nn.Module, memory: nn.Module, meta: dict[str, Any], tokenizer: Any = None) -> None:
    """Refuse an LM and memory (or any component) that do not fit: input layer and site, and for an MLPMemory
    hidden and logits sizes; with mlpmem installed also the tokenizer (hash) and the base model's weights (fingerprint)."""
    fix = "use the base model (and tokenizer) the memory was trained for, or train a memory for this model"
    for key in ("layer", "site"):
        if key not in meta:
            raise MlpmemError(f"the memory's meta does not say which {key} it reads", "pass the meta returned by load_memory, with 'layer' and 'site'")
    if meta["site"] not in SITES:
        raise MlpmemError(f"the memory reads the unknown site {meta['site']!r}", f"the site must be one of {SITES}")
    text_cfg = lm.config.get_text_config()
    try:
        resolve_layer(lm, int(meta["layer"]))
    except MlpmemError:
        raise MlpmemError(f"the memory reads decoder layer {meta['layer']}, but the base model {_name(lm)} has only {text_cfg.num_hidden_layers} layers", fix)
    if not isinstance(memory, MLPMemory):  # a retriever: its output size is checked on its first call
        pass
    elif memory.config.d_in != text_cfg.hidden_size:
        raise MlpmemError(f"the memory reads {memory.config.d_in}-dim hidden states but the base model {_name(lm)} has hidden size {text_cfg.hidden_size}", fix)
    v = int(lm.get_output_embeddings().weight.shape[0])
    if isinstance(memory, MLPMemory) and memory.config.vocab_size != v:
        raise MlpmemError(f"the memory outputs {memory.config.vocab_size} logits but the base model {_name(lm)} outputs {v}", fix)
    if hasattr(memory, "check_lm"):  # a retriever checks its own sizes (mlpmem.retrieval.KNNRetriever.check_lm)
        memory.check_lm(lm, tokenizer)
    try:
        from mlpmem.hf import check_base
    except ImportError:
        logger.info("mlpmem is not installed: the base model's tokenizer and weights are not checked against the memory's record")
        return
    check_base(lm, meta, tokenizer)


check_component = check_parts  # a component is checked as a memory is


def forget_fitted_mixing(model: "MLPMemoryForCausalLM", what: str) -> None:
    """After a memory was added or removed: the router and fixed weights were fitted for the previous set, so they go
    (fixed mixing, lambda split evenly), and a gate stays in use only for a single first memory it belongs to."""
    if model.memory_router is not None or model.weights is not None:
        logger.warning("%s: the router and fixed weights fitted for the previous memories are dropped (fixed mixing, lambda %.3f "
                       "split evenly, until set_router or set_lambda(weights=...))", what, model.lambda_)
    model.memory_router, model.config.router_config = None, None
    model.weights = model.config.weights = None
    if model.mixing_mode == "routed" or (model.mixing_mode == "gated" and (model.gate is None or model.n_memories > 1)):
        model.mixing_mode = model.config.mixing = "fixed"


def check_router(meta: dict[str, Any], model: "MLPMemoryForCausalLM", where: str = "the router") -> None:
    """Refuse a router fitted for other memories: its meta's memory_fingerprints against the model's memories, in order."""
    want = (meta or {}).get("memory_fingerprints")
    if not want:
        raise MlpmemError(f"{where} does not record the memories it was fitted for (no memory_fingerprints)", "fit the router again with mlpmem.hf.fit_router")
    got = model.router_meta()["memory_fingerprints"]
    if list(want) != got:
        raise MlpmemError(f"{where} was fitted for other memories (fingerprints {list(want)}, this model's memories {model.memory_names} are {got})",
                          "fit a router for these memories, in this order (mlpmem.hf.fit_router), or use mixing='fixed'")


def _component_from(memory: Any, meta: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """(module, meta) from a memory folder (memory_config.json + model.safetensors) or a module with its meta."""
    if isinstance(memory, (str, os.PathLike)):
        folder = Path(memory)
        files = {f: str(folder / f) for f in (MEMORY_CONFIG, MEMORY_WEIGHTS)}
        if not all(Path(f).is_file() for f in files.values()):
            raise MlpmemError(f"{folder} is not a memory folder (it needs {MEMORY_CONFIG} and {MEMORY_WEIGHTS})",
                              "pass a train stage's memory folder (RUN/train/memory), or a module such as KNNRetriever.from_run(RUN)")
        module, saved = read_memory_folder(files)
        return module, dict(meta if meta is not None else saved)
    if not isinstance(memory, nn.Module):
        raise MlpmemError(f"a memory must be a folder or an nn.Module, got {type(memory).__name__}", "pass RUN/train/memory or a loaded module")
    meta = meta if meta is not None else getattr(memory, "meta", None)
    if not meta:
        raise MlpmemError(f"the {type(memory).__name__} comes without a meta (its layer and site)", "pass meta= with at least 'layer' and 'site'")
    return memory, dict(meta)


def _entry(name: str, module: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """A memory's entry in config.extra_memories."""
    return {"name": name, "kind": component_kind(module),
            "memory_config": dataclasses.asdict(module.config) if isinstance(module, MLPMemory) else None, "memory_meta": _jsonable(dict(meta))}


def _build_component(kind: str | None, memory_config: dict | None, meta: dict | None) -> nn.Module:
    """A memory from its config entry: an MLPMemory (random weights, loaded next), or a kNN-LM retriever from its run folder."""
    if (kind or "mlp") == "mlp":
        return MLPMemory(MemoryConfig(**memory_config))
    if kind == "knn":
        try:
            from mlpmem.retrieval import KNNRetriever
        except ImportError:
            raise MlpmemError("this model mixes a kNN-LM retriever, which needs the mlpmem package (mlpmem.retrieval)", "install mlpmem")
        return KNNRetriever.from_reference(dict(meta or {}))
    raise MlpmemError(f"a saved memory of kind {kind!r} cannot be rebuilt", "save the model again with mlpmem")


def _free_name(taken: list[str]) -> str:
    i = len(taken)
    while f"memory_{i}" in taken:
        i += 1
    return f"memory_{i}"


def _device_of(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def _from_pretrained_parts(cls: type, name: str, config: MLPMemoryConfig, base_model: Any, tokenizer: Any, kwargs: dict) -> MLPMemoryForCausalLM:
    """from_pretrained for a folder saved by reference, or with ``base_model=``: load the two parts, then pair them."""
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    kwargs.pop("config", None)
    # a lambda_ given here asks for that lambda: the saved fixed weights (which would take precedence) are dropped
    weights = kwargs.pop("weights", None if "lambda_" in kwargs else config.weights)
    lam = kwargs.pop("lambda_", config.lambda_)
    temp = kwargs.pop("memory_temperature", config.memory_temperature)
    mixing = kwargs.pop("mixing", None)
    dtype = kwargs.pop("dtype", None)
    device = kwargs.pop("device", None)
    device_map = kwargs.pop("device_map", None)
    for k in ("trust_remote_code", "_from_auto", "_commit_hash", "adapter_kwargs"):
        kwargs.pop(k, None)
    if kwargs:
        logger.info("from_pretrained of a model saved by reference ignores %s", sorted(kwargs))
    memory, meta = _load_memory(name, config, hub)
    memories = [(e["name"], *_load_memory(name, config, hub, e)) for e in config.extra_memories or []]
    gate, gate_meta = _load_gate(name, config, hub)
    if gate is not None:
        check_gate(gate_meta, memory, f"the gate in {name}")
    elif mixing == "gated":
        raise MlpmemError(f"{name} holds no gate, so mixing='gated' is not possible", "use mixing='fixed', or save the model with its gate")
    router, router_meta = _load_router(name, config, hub)
    if router is None and mixing == "routed":
        raise MlpmemError(f"{name} holds no router, so mixing='routed' is not possible", "use mixing='fixed', or fit a router (mlpmem.hf.fit_router) and save the model")
    if mixing is None and (gate is not None or router is not None):
        mixing = config.mixing
    base_hub = {k: v for k, v in hub.items() if k not in ("revision", "subfolder")}  # another repository
    if isinstance(base_model, nn.Module):
        lm, tok, ref = base_model, tokenizer, config.base_model
    else:
        if base_model is not None:
            ref, sub = str(base_model), None
        elif config.base_subfolder:  # a full export of mlpmem < 0.2: the base in a subfolder
            ref, sub = name, config.base_subfolder
            if Path(name).is_dir():
                ref, sub = str(Path(name) / config.base_subfolder), None
                if not (Path(ref) / "config.json").is_file() or not any(Path(ref).glob("*.safetensors")) and not any(Path(ref).glob("*.bin")):
                    raise MlpmemError(f"the full export in {name} is incomplete: {ref} holds no base model", "export the model again with save_pretrained(..., full_export=True)")
            base_hub = dict(hub, subfolder=sub) if sub else base_hub
        elif config.base_model:
            ref = config.base_model
        else:
            raise MlpmemError(f"{name} names no base model", "pass base_model= to from_pretrained")
        lm, tok = load_base(ref, dtype, base_hub)
        tok = tokenizer if tokenizer is not None else tok
    if tok is None:
        logger.warning("cannot check that the base model's tokenizer is the memory's: pass tokenizer= to check it")
    model = cls.from_parts(lm, memory, meta, tokenizer=tok, base_model=config.base_model if isinstance(base_model, nn.Module) or base_model is None else str(base_model),
                           lambda_=lam, memory_temperature=temp, gate=gate, gate_meta=gate_meta, mixing=mixing,
                           name=config.memory_name, memories=memories, weights=weights,
                           router=router, router_meta=router_meta)
    if device is not None or isinstance(device_map, (str, torch.device)):
        model.to(device if device is not None else device_map)
    return model


def _load_memory(name: str, config: MLPMemoryConfig, hub: dict, entry: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A memory of a saved model: the first (``entry`` None) from ``memory/``, another from ``memories/NAME/``, else
    from the ``memory.*`` / ``extra_memories.NAME.*`` weights of a full export; a kNN-LM retriever from its run folder."""
    if entry is None:
        entry = {"name": config.memory_name or "memory", "kind": config.memory_kind, "memory_config": config.memory_config, "memory_meta": config.memory_meta}
        sub, prefix = MEMORY_DIR, "memory."
    else:
        sub, prefix = f"{MEMORIES_DIR}/{entry['name']}", f"extra_memories.{entry['name']}."
    meta = dict(entry.get("memory_meta") or {})
    if (entry.get("kind") or "mlp") != "mlp":
        return _build_component(entry.get("kind"), entry.get("memory_config"), meta).eval(), meta
    files = {}
    for fname in (MEMORY_CONFIG, MEMORY_WEIGHTS):
        files[fname] = _resolve(name, f"{sub}/{fname}", hub)
    if all(files.values()):
        return read_memory_folder(files)
    if config.saved_by_reference():
        missing = [f for f, p in files.items() if not p]
        raise MlpmemError(f"{name} holds no complete memory ({sub}/{missing[0]} is missing)", "save the model again with save_pretrained")
    # a full export, loaded with another base: take the memory's weights out of the full weights
    state = {k.removeprefix(prefix): v for k, v in _full_weights(name, hub, prefix).items()}
    with torch.device("meta"):
        memory = MLPMemory(MemoryConfig(**entry["memory_config"]))
    try:
        memory.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise MlpmemError(f"the memory weights in {name} do not fit its config ({str(e).splitlines()[0][:200]})", "export the model again with save_pretrained(..., full_export=True)")
    memory.apply_freeze()
    return memory.eval(), meta


def _full_weights(name: str, hub: dict, prefix: str, required: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a full export whose names start with ``prefix`` (every shard read)."""
    index = _resolve(name, "model.safetensors.index.json", hub)
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values())) if index else ["model.safetensors"]
    state = {}
    for shard in shards:
        path = _resolve(name, shard, hub)
        if not path:
            if not required:
                continue
            raise MlpmemError(f"{name} is missing its weights file {shard}", "save the model again with save_pretrained(..., full_export=True)")
        state.update({k: v for k, v in load_file(path).items() if k.startswith(prefix)})
    return state


def _load_router(name: str, config: MLPMemoryConfig, hub: dict) -> tuple[MemoryRouter | None, dict[str, Any]]:
    """The router of a saved model: its ``router/`` folder, else the ``memory_router.*`` weights of a full export; (None, {}) if none."""
    if not config.router_config:
        return None, {}
    files = {fname: _resolve(name, f"{ROUTER_DIR}/{fname}", hub) for fname in (ROUTER_CONFIG, GATE_WEIGHTS)}
    if all(files.values()):
        return read_router_folder(files)
    if config.saved_by_reference():
        raise MlpmemError(f"{name} names a router in its config but holds no complete router ({ROUTER_DIR}/ is missing or partial)",
                          "save the model again with save_pretrained")
    router = MemoryRouter(**config.router_config["config"])
    state = {k.removeprefix("memory_router."): v.float() for k, v in _full_weights(name, hub, "memory_router.", required=False).items()}
    try:
        router.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MlpmemError(f"the router weights in {name} do not fit its config ({str(e).splitlines()[0][:200]})", "export the model again with save_pretrained")
    check_router_values(router, name)
    return router.eval(), dict(config.router_config.get("meta") or {})


def _load_gate(name: str, config: MLPMemoryConfig, hub: dict) -> tuple[MixingGate | None, dict[str, Any]]:
    """The gate of a saved model: its ``gate/`` folder, else the ``gate.*`` weights of a full export; (None, {}) if it has none."""
    if not config.gate_config:
        return None, {}
    files = {fname: _resolve(name, f"{GATE_DIR}/{fname}", hub) for fname in (GATE_CONFIG, GATE_WEIGHTS)}
    if all(files.values()):
        return read_gate_folder(files=files)
    if config.saved_by_reference():
        raise MlpmemError(f"{name} names a gate in its config but holds no complete gate ({GATE_DIR}/ is missing or partial)",
                          "save the model again with save_pretrained, or load it with mixing='fixed' after removing gate_config")
    index = _resolve(name, "model.safetensors.index.json", hub)
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values())) if index else ["model.safetensors"]
    state = {}
    for shard in shards:
        path = _resolve(name, shard, hub)
        if path:
            state.update({k.removeprefix("gate."): v.float() for k, v in load_file(path).items() if k.startswith("gate.")})
    gate = build_gate(config.gate_config["config"])
    try:
        gate.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MlpmemError(f"the gate weights in {name} do not fit its config ({str(e).splitlines()[0][:200]})", "export the model again with save_pretrained")
    check_gate_values(gate, name)
    return gate.eval(), dict(config.gate_config.get("meta") or {})


def _resolve(name: str, filename: str, hub: dict) -> str | None:
    """A file of a saved model, local or from the hub (cache); None if it does not exist."""
    if Path(name).is_dir():
        path = Path(name) / hub.get("subfolder", "") / filename
        return str(path) if path.is_file() else None
    return cached_file(name, filename, _raise_exceptions_for_missing_entries=False, **hub)


def load_base(ref: str, dtype: Any, hub: dict) -> tuple[PreTrainedModel, Any]:
    """(base LM in eval mode, its tokenizer or None) from a name: mlpmem's loader where installed (it knows
    mlpmem's model names and GGUF files, and refuses non-causal models), else transformers'."""
    try:
        from mlpmem.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None and not hub:
        lm, tok, _ = load_model(ref, dtype=_dtype_name(dtype))
        return lm, tok
    try:
        lm = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype if dtype is not None else "auto", **hub)
    except (OSError, ValueError) as e:
        raise MlpmemError(f"could not load the base model {ref!r} ({str(e).splitlines()[0][:200]})",
                          "pass base_model= a loadable model, or save the LM + memory with full_export=True")
    try:
        tok = AutoTokenizer.from_pretrained(ref, **hub)
    except (OSError, ValueError):
        tok = None
    return lm.eval().requires_grad_(False), tok


def _model_label(name: str) -> str:
    """How results name a base model: mlpmem's label of an alias where mlpmem is installed, else the name."""
    try:
        from mlpmem.models import model_label
    except ImportError:
        return name
    return model_label(name)


def model_card(config: MLPMemoryConfig, full_export: bool, memory_params: int, lm_params: int) -> str:
    """README.md of a saved LM + memory: what it is made of, how it was trained, what it scored, how to load it."""
    meta = config.memory_meta or {}
    mem = config.memory_config or {}
    base = config.base_model or "(unknown)"
    label = _model_label(base)  # an alias (the offline default) is named for what it is
    hub_like = _hub_like(base) and not Path(base).exists()
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- mlpmem", "- mlp-memory"]
    if hub_like:
        front.append(f"base_model: {base}")
    front.append("---")
    lines = [
        *front, "",
        f"# {label} + MLP memory", "",
        "A causal language model mixed at every position with a retriever-pretrained MLP memory "
        "([MLP Memory, arXiv 2508.01832](https://arxiv.org/abs/2508.01832)), built with mlpmem.", "",
        "| | |", "|---|---|",
        f"| base model | `{base}`{f' = {label}' if label != base else ''} ({lm_params:,} parameters{', included' if full_export else ', loaded by reference'}) |",
        f"| memory | {memory_params:,} parameters, {mem.get('n_blocks')} blocks, {mem.get('activation')}, "
        f"reads layer {meta.get('layer')} ({meta.get('site')}) |",
        f"| lambda (memory weight) | {config.lambda_} |",
        f"| memory temperature | {config.memory_temperature} |",
        f"| mixing | {config.mixing or 'fixed'}"
        + (f" (gate: {(config.gate_config or {}).get('config', {}).get('kind')}, lambda per token from the two distributions)" if config.gate_config else "")
        + (" (router: weights per token over the LM and every memory)" if config.router_config else "") + " |",
    ]
    if config.extra_memories:
        names = [config.memory_name or "memory", *(e["name"] for e in config.extra_memories)]
        metas = [meta, *((e.get("memory_meta") or {}) for e in config.extra_memories)]
        kinds = [config.memory_kind or "mlp", *(e.get("kind") or "mlp" for e in config.extra_memories)]
        lines.append("| memories | " + ", ".join(f"`{n}` ({'kNN-LM' if k == 'knn' else 'MLP'}, layer {m.get('layer')} {m.get('site')})"
                                                  for n, m, k in zip(names, metas, kinds)) + " |")
        if config.weights:
            lines.append(f"| fixed weights (LM, memories) | {config.weights} |")
    for key, label in (("corpus", "training corpus"), ("datastore", "datastore"), ("targets", "kNN targets"), ("model", "recipe model")):
        if meta.get(key):
            lines.append(f"| {label} | `{meta[key]}` |")
    lines += ["", "## Results", ""]
    results = meta.get("results")
    if results:
        lines += ["```json", json.dumps(results, indent=2, sort_keys=True, default=str), "```"]
    else:
        lines.append("No results were recorded with this memory.")
    lines += [
        "", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True{", dtype=" + chr(34) + "auto" + chr(34) if full_export else ""})',
        'tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        'out = model.generate(**tok(["Fellow citizens"], return_tensors="pt"), max_new_tokens=30)',
        "out = model.generate(..., lambda_=0.0)  # the base model alone; 1.0 the memory alone", "```", "",
        "`logits` are the mixture's log-probabilities. " + (
            "The folder is self-contained." if full_export else
            f"The base model is loaded from `{base}`; pass `base_model=` to use a copy from elsewhere."), "",
    ]
    return "\n".join(lines)


def _hub_like(name: str) -> bool:
    """Whether ``name`` has the form of a hub repo id (``org/name`` or ``name``), rather than a path."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "/"))


def _dtype_name(dtype: Any) -> str:
    # transformers 5 loads a checkpoint in its own dtype unless told otherwise: so does a base loaded by reference
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")


def _name(lm: nn.Module) -> str:
    return str(getattr(getattr(lm, "config", None), "name_or_path", "") or type(lm).__name__)


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _saved_by_us(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier save of this class (its config.json says model_type mlpmem)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "mlpmem"
    except (OSError, ValueError, AttributeError):
        return False


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _jsonable(obj: Any) -> Any:
    """Plain JSON values (tuples as lists, paths and other objects as strings)."""
    return json.loads(json.dumps(obj, default=str))
