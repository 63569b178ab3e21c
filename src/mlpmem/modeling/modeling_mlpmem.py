"""A Hugging Face causal LM + a retriever-pretrained MLP memory (arXiv 2508.01832), in a few files.

This file is the model, and it is self-contained: ``save_pretrained`` copies it next
to the weights, so ``AutoModelForCausalLM.from_pretrained(folder_or_repo,
trust_remote_code=True)`` works where mlpmem is not installed. It imports only the
standard library, torch, transformers, safetensors and its sibling files (relative
imports, which transformers copies with it). Where mlpmem is installed and imported,
it registers more (:mod:`.integration`: the tokenizer and weight fingerprint checks,
model names such as ``smollm2-135m``, kNN-LM retrievers); nothing here imports mlpmem.

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
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mlpmem import MLPMemoryConfig
from .errors import MlpmemError
from .gating import (
    GATE_CONFIG,
    GATE_DIR,
    GATE_WEIGHTS,
    ROUTER_CONFIG,
    ROUTER_DIR,
    MemoryRouter,
    MixingGate,
    build_gate,
    check_gate,
    check_gate_values,
    check_router_values,
    memory_fingerprint,
    read_gate_folder,
    read_router_folder,
    write_gate_folder,
    write_router_folder,
)
from .integration import hook
from .mixing import (
    check_lambda,
    check_model_mixing,
    check_temperature,
    check_weights,
    gate_features,
    gate_features_pruned,
    mix,
    mix_per_token,
    mix_pruned,
    mix_routed,
    mix_weighted,
    weights_from_lambda,
)
from .mlp_memory import (
    MEMORY_CONFIG,
    MEMORY_DIR,
    MEMORY_WEIGHTS,
    MemoryConfig,
    MLPMemory,
    check_memory_dtype,
    plain_init,
    read_memory_folder,
    write_memory_folder,
)
from .read_site import SITES, ReadSite, capture, keep_positions, resolve_layer
from .saving import _hub_like, _remove, _resolve, check_integrity, check_save_folder, integrity_record, model_card

logger = logging.getLogger(__name__)

# keyword arguments of from_pretrained that say where files come from; a base model saved by
# reference is another repository, so it gets these but not `revision` or `subfolder`
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


# ============================================================================ several memories: components and the router's files
# A *component* is anything mixed with the LM: an nn.Module mapping the hidden state at its read site
# [..., d] to logits [..., V] (an MLPMemory), or to normalised log-probs [..., V] when it says so with
# ``returns_logprobs = True`` (a kNN-LM retriever, mlpmem.retrieval.KNNRetriever), plus a meta dict:
# ``layer`` and ``site`` (where it reads), and when known ``tokenizer_hash``, ``model_id`` (or
# ``base_model``) and ``model_fingerprint`` (the base model it was built for). The model reads every
# distinct site in one LM pass and mixes the LM with the components, by fixed weights or a router.

MEMORIES_DIR = "memories"  # a saved-by-reference folder keeps the second and later memories here, one subfolder each
NAME_RE = r"[A-Za-z][A-Za-z0-9_]{0,63}"
RESERVED_NAMES = ("lm", "gate", "router", "memory_router", "extra_memories")


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
    return output_logprobs(module, module(h), temperature)


def output_logprobs(module: nn.Module, out: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """What :func:`component_logprobs` makes of the component's output ``out`` (computed by it, or by the shared head)."""
    out = out.float()
    if getattr(module, "returns_logprobs", False):
        return out
    if temperature != 1.0:
        out = out / temperature
    return out.log_softmax(-1)


# the shared head call stacks at most this many rows with the weight on the left of the product (see stacked_head)
WEIGHT_LEFT_ROWS = 64


@contextlib.contextmanager
def stacked_head(head: nn.Module | None, rows: Any) -> Iterator[list[torch.Tensor]]:
    """While inside, the LM's output layer ``head`` (an nn.Linear) also computes ``rows()`` in the same call.

    ``rows()`` gives the memories' head inputs [B, K, d] (memories whose head *is* the LM's, see
    :meth:`MLPMemory.head_is`); they are stacked under the LM's own rows, so one matrix product
    reads the output embedding once for all of them: at decode that read is what the head costs.
    The yielded list receives their logits [B, K, V] in order; the LM gets back its own rows only,
    so what it does after its head (e.g. Gemma's soft-capping) applies to its logits alone. The list
    stays empty where the LM did not call ``head`` as expected: the caller then runs the heads apart.

    The head's forward is replaced on the instance for the duration (restored on exit, whatever
    happens): with a few rows the product is taken as ``W @ X^T``, because CPU BLAS reads a
    [V, d] weight once for a narrow right-hand side, where ``X @ W^T`` with 2 rows costs about two
    reads (measured: bench/bench_generate.py).
    """
    out: list[torch.Tensor] = []
    if head is None or not isinstance(head, nn.Linear):
        yield out
        return
    own = head.__dict__.get("forward")  # an instance-level forward someone else set (e.g. accelerate's hooks)
    original = head.forward
    done: list[bool] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        if done:  # the first call only: the logits of this forward
            return original(x)
        done.append(True)
        extra = rows()
        if any(r.shape != x.shape or r.dtype != x.dtype for r in extra):
            return original(x)
        stacked = torch.cat([x, *extra], 0)
        flat = stacked.reshape(-1, stacked.shape[-1])
        if flat.shape[0] <= WEIGHT_LEFT_ROWS:
            y = (head.weight @ flat.T).T.contiguous()
            if head.bias is not None:
                y = y + head.bias
        else:
            y = F.linear(flat, head.weight, head.bias)
        parts = y.reshape(*stacked.shape[:-1], y.shape[-1]).split(x.shape[0], 0)
        out.extend(parts[1:])
        return parts[0]

    head.forward = forward
    try:
        yield out
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward


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
        raise MlpmemError(
            f"{name!r} cannot name a memory",
            "use a letter followed by letters, digits or _ (up to 64), not one of " + ", ".join(RESERVED_NAMES),
        )
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

    def __init__(
        self,
        config: MLPMemoryConfig,
        lm: PreTrainedModel | None = None,
        memory: nn.Module | None = None,
        gate: MixingGate | None = None,
        extra: dict[str, nn.Module] | None = None,
        router: MemoryRouter | None = None,
    ) -> None:
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
        # the mixing settings live in self.config only (saved with it); the properties below read them
        config.lambda_ = check_lambda(config.lambda_)
        config.memory_temperature = check_temperature(config.memory_temperature)
        config.weights = check_weights(config.weights, self.n_memories) if config.weights is not None else None
        self.sites: dict[str, ReadSite] = {}
        for name in self.memory_names:
            meta = self.component_meta(name)
            self.sites[name] = ReadSite(resolve_layer(lm, int(meta["layer"])), str(meta["site"]))
        asked, config.mixing = config.mixing or "fixed", "fixed"
        self.set_lambda(mode=asked)
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

    # ------------------------------------------------------------------ the mixing settings (held in self.config)

    @property
    def lambda_(self) -> float:
        """The memory's weight in fixed mixing (split evenly over several memories unless ``weights`` are set)."""
        return self.config.lambda_

    @property
    def memory_temperature(self) -> float:
        return self.config.memory_temperature

    @property
    def weights(self) -> list[float] | None:
        """Fixed mixture weights [LM, each memory], or None (lambda split evenly)."""
        return self.config.weights

    @property
    def mixing_mode(self) -> str:
        """``"fixed"``, ``"gated"`` or ``"routed"``: how a call that passes no lambda_ or weights mixes."""
        return self.config.mixing

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
            raise MlpmemError(
                f"{name!r} is the model's only memory, and a model needs at least one",
                "add another memory first, or use the base model alone (lambda_=0 gives it bit for bit)",
            )
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
        """Attach a router (mlpmem.gate.fit_router's, or mlpmem.transformers_integration.fit_router's) for this model's memories, in order.

        ``meta``: the router's record; its ``memory_fingerprints`` must be this model's memories'
        (a router fitted for other memories is refused). Without one, the router is taken to be
        fitted for the memories as they are now, and that is recorded.
        """
        if not isinstance(router, MemoryRouter):
            raise MlpmemError(f"a router must be a MemoryRouter, got {type(router).__name__}", "fit one with mlpmem.gate.fit_router")
        if router.n_memories != self.n_memories:
            raise MlpmemError(
                f"the router weighs {router.n_memories} memories and this model has {self.n_memories}",
                "fit a router for this model's memories (mlpmem.transformers_integration.fit_router)",
            )
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
        return {
            "memory_names": self.memory_names,
            "memory_fingerprints": [component_fingerprint(m, self.component_meta(n)) for n, m in self.components().items()],
        }

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
                logger.info(
                    "memory %r (%s) cannot be saved with the model (it is neither an MLPMemory nor a retriever with a run folder)",
                    n,
                    type(m).__name__,
                )
        if gate is not None:
            check_gate(gate_meta or {}, memory)
            check_gate_values(gate, "the gate")
        mixing = check_model_mixing(
            mixing or ("routed" if router is not None else "gated" if gate is not None and len(parts) == 1 else "fixed")
        )
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
        model = cls(
            config, lm=lm, memory=memory, gate=gate.eval() if gate is not None else None, extra={n: m.eval() for n, m, _ in parts[1:]}
        )
        model.tokenizer = tokenizer
        if router is not None:
            model.set_router(router, router_meta, mixing=mixing)
        else:
            model.set_lambda(mode=mixing)
        return model.eval()  # an inference wrapper: no dropout in the LM

    @classmethod
    def from_memory(cls, memory_dir: "str | os.PathLike | list", base_model: str | None = None, **kwargs: Any) -> "MLPMemoryForCausalLM":
        """Pair one or more memory folders from mlpmem's train stage with their base model (needs mlpmem; see mlpmem.transformers_integration.from_memory)."""
        from_memory = hook("from_memory")
        if from_memory is None:
            raise MlpmemError(
                "from_memory reads a memory folder of mlpmem's train stage and needs the mlpmem package",
                "install mlpmem and `import mlpmem`, or load an exported folder with from_pretrained",
            )
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
        instead of the saved base). ``tokenizer=`` is checked against the memory's. ``memory_dtype=``: see
        :meth:`apply_memory_dtype` (unset: int8 where the memory's run was scored in int8).
        """
        memory_dtype = kwargs.pop("memory_dtype", None)
        check_memory_dtype(memory_dtype)  # a typo fails before anything loads
        config = kwargs.get("config")
        fix = "pass a folder or repo written by MLPMemoryForCausalLM.save_pretrained, or save the model again"
        local = Path(pretrained_model_name_or_path)
        if (local.is_dir() or not _hub_like(str(pretrained_model_name_or_path))) and not (
            local / kwargs.get("subfolder", "") / "config.json"
        ).is_file():
            raise MlpmemError(f"{local} holds no saved LM + memory model (config.json is missing)", fix)
        if not isinstance(config, PretrainedConfig):
            hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
            try:
                config = MLPMemoryConfig.from_pretrained(pretrained_model_name_or_path, **hub)
            except OSError as e:
                raise MlpmemError(f"{pretrained_model_name_or_path} holds no saved LM + memory model ({str(e).splitlines()[0][:200]})", fix)
        if getattr(config, "model_type", None) != "mlpmem":
            raise MlpmemError(f"{pretrained_model_name_or_path} holds a {config.model_type!r} model, not an LM + memory ('mlpmem')", fix)
        check_integrity(str(pretrained_model_name_or_path), config, {k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
        if ("lambda_" in kwargs or "weights" in kwargs) and kwargs.get("mixing") is None:
            kwargs["mixing"] = "fixed"  # an explicit lambda_ (or weights) asks for the fixed mixture, as in a call
        fixed = kwargs.get("mixing") == "fixed"  # then a saved gate or router is not used: neither read nor checked
        if base_model is None and not config.saved_by_reference():
            if local.is_dir() and not any((local / kwargs.get("subfolder", "")).glob("model*.safetensors")):
                raise MlpmemError(
                    f"the full export in {local} is incomplete: it holds no model.safetensors",
                    "export the model again with save_pretrained(..., full_export=True)",
                )
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            if "lambda_" in kwargs and "weights" not in kwargs:
                model.config.weights = None  # the lambda asked for, not the saved weights
            if fixed:
                model.gate, model.config.gate_config = None, None
                model.memory_router, model.config.router_config = None, None
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
        else:
            model = _from_pretrained_parts(cls, str(pretrained_model_name_or_path), config, base_model, tokenizer, kwargs)
        model.apply_memory_dtype(memory_dtype)
        return model

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
            raise MlpmemError(
                "save_pretrained(push_to_hub=True) would upload an incomplete folder",
                "save the folder, then upload it with huggingface_hub.upload_folder, or call model.push_to_hub(repo_id)",
            )
        kinds = {n: component_kind(m) for n, m in self.components().items()}
        unsavable = [n for n, k in kinds.items() if k == "module"]
        if unsavable:
            raise MlpmemError(
                f"the memories {unsavable} cannot be saved: they are neither MLP memories nor retrievers with a run folder",
                "remove them before saving (remove_memory), or add them again after loading",
            )
        if full_export and any(k != "mlp" for k in kinds.values()):
            raise MlpmemError(
                f"a full export holds MLP memories only, and {[n for n, k in kinds.items() if k != 'mlp']} are kNN-LM retrievers (an index is saved by reference)",
                "save with full_export=False (the retriever's run folder is named in the config)",
            )
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        # the one rule for writers: only a new or empty folder, or an earlier save of this class, is written to
        check_save_folder(folder)
        (folder / "config.json").unlink(missing_ok=True)
        self.config.integrity = None
        tok = tokenizer if tokenizer is not None else self.tokenizer
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
                raise MlpmemError(
                    "a full export needs the tokenizer, and this model has none attached", "pass tokenizer= to save_pretrained"
                )
            self.config.base_weights = "included"
            # transformers writes config.json before the weights: stage the save, then move config.json last
            staging = folder / ".partial"
            _remove(staging)
            super().save_pretrained(staging, **kwargs)
            tok.save_pretrained(staging)
            (staging / "README.md").write_text(model_card(self.config, True, n_params, _num_params(self.lm)))
            self.config.integrity = integrity_record(staging, self)
            self.config.save_pretrained(staging)  # again, now with what was written
            for f in sorted(staging.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(f, folder / f.name)
            staging.rmdir()
            return
        # by reference: the memories only (memory folders), the base named in the config
        if not self.config.base_model:
            raise MlpmemError(
                "the base model has no reference (hub id or folder) to save",
                "use full_export=True, or build the model with from_parts(..., base_model=PATH)",
            )
        if not _hub_like(self.config.base_model) or Path(self.config.base_model).exists():
            logger.warning(
                "the saved folder names its base model by the local name %r: it loads only where that exists "
                "(or with base_model=); full_export=True makes it self-contained",
                self.config.base_model,
            )
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
        self.config.integrity = integrity_record(folder, self)
        self.config.save_pretrained(folder)

    # ------------------------------------------------------------------ mixing weights

    def set_lambda(
        self,
        lambda_: float | None = None,
        memory_temperature: float | None = None,
        mode: str | None = None,
        weights: list[float] | None = None,
    ) -> None:
        """Set the defaults used when a call does not pass them: lambda, memory temperature, mixing mode
        ("fixed", "gated" or "routed") and fixed weights [LM, each memory] (a new lambda_ clears them)."""
        if mode is not None:
            self.config.mixing = self.check_mixing_mode(mode)
        if lambda_ is not None:
            self.config.lambda_ = check_lambda(lambda_)
            self.config.weights = None
        if weights is not None:
            self.config.weights = check_weights(weights, self.n_memories)
        if memory_temperature is not None:
            self.config.memory_temperature = check_temperature(memory_temperature)

    def check_mixing_mode(self, mode: str) -> str:
        """The one check that this model can mix by ``mode`` (a gate for gated, a router for routed)."""
        check_model_mixing(mode)
        if mode == "gated" and (self.gate is None or self.n_memories > 1):
            raise MlpmemError(
                "mixing='gated' needs a gate, and this model has none"
                if self.gate is None
                else f"mixing='gated' is for one memory (its gate), and this model has {self.n_memories}",
                "use mixing='fixed', or load a memory saved with its gate"
                if self.gate is None
                else "use mixing='routed' with a router for these memories (set_router), or mixing='fixed'",
            )
        if mode == "routed" and self.memory_router is None:
            raise MlpmemError(
                "mixing='routed' needs a router, and this model has none",
                "fit one for its memories (mlpmem.transformers_integration.fit_router) or attach one (set_router), or use mixing='fixed'",
            )
        return mode

    @contextlib.contextmanager
    def mixing(
        self,
        lambda_: float | None = None,
        memory_temperature: float | None = None,
        mode: str | None = None,
        weights: list[float] | None = None,
    ) -> Iterator["MLPMemoryForCausalLM"]:
        """``with model.mixing(lambda_=0.5, mode="fixed"): ...``: set lambda / T / mixing mode / weights inside the block, restore them after."""
        saved = (self.lambda_, self.memory_temperature, self.mixing_mode, self.weights)
        self.set_lambda(lambda_, memory_temperature, mode, weights)
        try:
            yield self
        finally:
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
        mode = self.check_mixing_mode(mixing) if mixing is not None else ("fixed" if fixed_asked else self.mixing_mode)
        w = self.fixed_weights(lambda_, weights) if mode == "fixed" else None
        temp = self.memory_temperature if memory_temperature is None else check_temperature(memory_temperature)
        comps = self.components()
        # a memory with weight 0 is not run at all: lambda = 0 is the base LM's own call
        active = [n for i, n in enumerate(comps) if w is None or w[i + 1] > 0.0]
        base_kwargs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        if cache_position is not None:
            base_kwargs["cache_position"] = cache_position
        if self._lm_keeps_logits:
            base_kwargs["logits_to_keep"] = logits_to_keep
        # memories whose head is the LM's output layer: their head rows join the LM's in one product
        shared = [n for n in active if self._lm_keeps_logits and self.head_shared(n)]

        feats: dict[str, torch.Tensor] = {}

        def head_rows() -> list[torch.Tensor]:
            for n in shared:
                feats[n] = comps[n].features(keep_positions(store[self.sites[n]], logits_to_keep))
            return [feats[n] for n in shared]

        head = self.lm.get_output_embeddings() if shared else None
        with capture(self.lm, list(dict.fromkeys(self.sites[n] for n in active))) as store, stacked_head(head, head_rows) as rows:
            out = self.lm(**base_kwargs)
        logits = out.logits if self._lm_keeps_logits else keep_positions(out.logits, logits_to_keep)
        logprobs = logits.float().log_softmax(-1)
        # empty where the LM did not call its head as expected
        by_head = {n: comps[n].corrected(feats[n], out_n) for n, out_n in zip(shared, rows)}
        # memories whose head is pruned to their text's tokens: log-probs over those tokens [B, K, S]; one memory
        # mixes on them alone (fixed or gated), several get full rows
        pruned = {
            n: output_logprobs(comps[n], comps[n].head_logits(keep_positions(store[self.sites[n]], logits_to_keep)), temp)
            for n in active
            if n not in by_head and isinstance(comps[n], MLPMemory) and comps[n].head_ids is not None
        }
        one_pruned = len(comps) == 1 and bool(pruned) and mode != "routed"

        def memory_logprobs(n: str) -> torch.Tensor:
            if n in by_head:
                return output_logprobs(comps[n], by_head[n], temp)
            if n in pruned:
                return pruned[n] if one_pruned else comps[n].full_vocab(pruned[n])
            return component_logprobs(comps[n], keep_positions(store[self.sites[n]], logits_to_keep), temp)

        lps = {n: memory_logprobs(n) for n in active}
        for n, lp in lps.items():
            shape = (*lp.shape[:-1], comps[n].config.vocab_size) if n in pruned else tuple(lp.shape)
            if shape != tuple(logprobs.shape):
                raise MlpmemError(
                    f"memory {n!r} gives log-probs of shape {shape}, the LM {tuple(logprobs.shape)}",
                    "use a memory built for this base model's vocabulary",
                )
        # the memory's input, for a gate that reads how far it lies from the memory's train inputs
        gate_h = keep_positions(store[self.sites[active[0]]], logits_to_keep) if mode == "gated" and self.gate.reads_hidden else None
        if mode == "gated" and one_pruned:
            mem_lp, ids = lps[active[0]], comps[active[0]].head_ids
            gate_lam = self.gate(gate_features_pruned(logprobs, mem_lp, ids), gate_h)
            logprobs = mix_pruned(logprobs, mem_lp, ids, gate_lam)
        elif mode == "gated":
            mem_lp = lps[active[0]]
            gate_lam = self.gate(gate_features(logprobs, mem_lp), gate_h)  # [B, K], in [0, 1] (a sigmoid)
            logprobs = mix_per_token(logprobs, mem_lp, gate_lam.to(logprobs.dtype))
        elif one_pruned and active:
            logprobs = mix_pruned(logprobs, lps[active[0]], comps[active[0]].head_ids, w[1])
        elif mode == "routed":
            feats = torch.stack([gate_features(logprobs, lps[n]) for n in comps], -2)  # [B, K, N, F]
            weights_tok = self.memory_router(feats)  # [B, K, N + 1], rows sum to 1 (a softmax)
            logprobs = mix_routed(torch.stack([logprobs, *(lps[n] for n in comps)], -2), weights_tok)
        elif len(comps) == 1 and active:  # one memory, fixed lambda: the two-term form, exact at lambda 1
            logprobs = mix(logprobs, lps[active[0]], w[1])
        elif active:  # several memories, fixed weights: log sum_k w_k p_k over the terms with weight > 0
            logprobs = mix_weighted(
                [logprobs, *(lps[n] for n in comps if n in lps)], [w[0], *(w[i + 1] for i, n in enumerate(comps) if n in lps)]
            )
        loss = None
        if labels is not None:
            if logprobs.shape[1] != labels.shape[1]:
                raise MlpmemError("labels need the log-probs of every position", "call with logits_to_keep=0 when passing labels")
            loss = F.nll_loss(logprobs[:, :-1].reshape(-1, logprobs.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logprobs,
            past_key_values=getattr(out, "past_key_values", None),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )

    def apply_memory_dtype(self, memory_dtype: str | None = None) -> None:
        """``memory_dtype`` as every loader takes it: ``"int8"`` runs the MLP memories in int8, ``"float32"`` keeps their
        float weights, unset runs int8 where every MLP memory's run scored it in int8 (``eval.memory_dtype``, in its
        meta's results) and the model is float32, so a loaded or exported memory decodes as its run measured it."""
        if check_memory_dtype(memory_dtype) == "int8":
            self.use_int8_memories()
            return
        mlp = [n for n, m in self.components().items() if isinstance(m, MLPMemory)]
        if memory_dtype not in (None, "") or not mlp:
            return
        if all((self.component_meta(n).get("results") or {}).get("memory_dtype") == "int8" for n in mlp):
            try:
                self.use_int8_memories()
                logger.info("memory_dtype int8, as the memory's run was evaluated (memory_dtype='float32': its float weights)")
            except MlpmemError:  # a bfloat16 model: the float weights, as asked for by the dtype
                logger.info("the memory's run was evaluated in int8, which needs a float32 model: using the float weights")

    def use_int8_memories(self, on: bool = True) -> None:
        """Run every MLP memory's linear layers in int8 at inference (CPU): see :meth:`MLPMemory.use_int8`. The saved
        weights, fingerprints and checks stay those of the float32 memory."""
        for module in self.components().values():
            if isinstance(module, MLPMemory):
                module.use_int8(on)

    def head_shared(self, name: str) -> bool:
        """Whether memory ``name``'s head is the LM's output layer (same weights, dtype, device), so that
        :meth:`forward` runs both in one matrix product. Checked again whenever either weight changes."""
        module, head = self.components()[name], self.lm.get_output_embeddings()
        if not isinstance(module, MLPMemory) or not isinstance(head, nn.Linear):
            return False
        a, b = module.head.weight, head.weight
        # a weight changed in place (training) bumps its _version; a new weight is a new object
        key = (id(a), a._version, a.dtype, a.device, id(b), b._version, b.dtype, b.device, module._int8 is not None)
        cache = self.__dict__.setdefault("_head_shared", {})
        if cache.get(name, (None,))[0] != key:
            cache[name] = (key, module.head_is(head))
        return cache[name][1]

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
            raise MlpmemError(
                f"the memory's meta does not say which {key} it reads", "pass the meta returned by load_memory, with 'layer' and 'site'"
            )
    if meta["site"] not in SITES:
        raise MlpmemError(f"the memory reads the unknown site {meta['site']!r}", f"the site must be one of {SITES}")
    text_cfg = lm.config.get_text_config()
    try:
        resolve_layer(lm, int(meta["layer"]))
    except MlpmemError:
        raise MlpmemError(
            f"the memory reads decoder layer {meta['layer']}, but the base model {_name(lm)} has only {text_cfg.num_hidden_layers} layers",
            fix,
        )
    if not isinstance(memory, MLPMemory):  # a retriever: its output size is checked on its first call
        pass
    elif memory.config.d_in != text_cfg.hidden_size:
        raise MlpmemError(
            f"the memory reads {memory.config.d_in}-dim hidden states but the base model {_name(lm)} has hidden size {text_cfg.hidden_size}",
            fix,
        )
    v = int(lm.get_output_embeddings().weight.shape[0])
    if isinstance(memory, MLPMemory) and memory.config.vocab_size != v:
        raise MlpmemError(f"the memory outputs {memory.config.vocab_size} logits but the base model {_name(lm)} outputs {v}", fix)
    if hasattr(memory, "check_lm"):  # a retriever checks its own sizes (mlpmem.retrieval.KNNRetriever.check_lm)
        memory.check_lm(lm, tokenizer)
    check_base = hook("check_base")
    if check_base is None:
        logger.info("mlpmem is not imported: the base model's tokenizer and weights are not checked against the memory's record")
        return
    check_base(lm, meta, tokenizer)


check_component = check_parts  # a component is checked as a memory is


def forget_fitted_mixing(model: "MLPMemoryForCausalLM", what: str) -> None:
    """After a memory was added or removed: the router and fixed weights were fitted for the previous set, so they go
    (fixed mixing, lambda split evenly), and a gate stays in use only for a single first memory it belongs to."""
    if model.memory_router is not None or model.weights is not None:
        logger.warning(
            "%s: the router and fixed weights fitted for the previous memories are dropped (fixed mixing, lambda %.3f "
            "split evenly, until set_router or set_lambda(weights=...))",
            what,
            model.lambda_,
        )
    model.memory_router, model.config.router_config = None, None
    model.config.weights = None
    if model.mixing_mode == "routed" or (model.mixing_mode == "gated" and (model.gate is None or model.n_memories > 1)):
        model.config.mixing = "fixed"


def check_router(meta: dict[str, Any], model: "MLPMemoryForCausalLM", where: str = "the router") -> None:
    """Refuse a router fitted for other memories: its meta's memory_fingerprints against the model's memories, in order."""
    want = (meta or {}).get("memory_fingerprints")
    if not want:
        raise MlpmemError(
            f"{where} does not record the memories it was fitted for (no memory_fingerprints)",
            "fit the router again with mlpmem.transformers_integration.fit_router",
        )
    got = model.router_meta()["memory_fingerprints"]
    if list(want) != got:
        raise MlpmemError(
            f"{where} was fitted for other memories (fingerprints {list(want)}, this model's memories {model.memory_names} are {got})",
            "fit a router for these memories, in this order (mlpmem.transformers_integration.fit_router), or use mixing='fixed'",
        )


def _component_from(memory: Any, meta: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """(module, meta) from a memory folder (memory_config.json + model.safetensors) or a module with its meta."""
    if isinstance(memory, (str, os.PathLike)):
        folder = Path(memory)
        files = {f: str(folder / f) for f in (MEMORY_CONFIG, MEMORY_WEIGHTS)}
        if not all(Path(f).is_file() for f in files.values()):
            raise MlpmemError(
                f"{folder} is not a memory folder (it needs {MEMORY_CONFIG} and {MEMORY_WEIGHTS})",
                "pass a train stage's memory folder (RUN/train/memory), or a module such as KNNRetriever.from_run(RUN)",
            )
        module, saved = read_memory_folder(files)
        return module, dict(meta if meta is not None else saved)
    if not isinstance(memory, nn.Module):
        raise MlpmemError(
            f"a memory must be a folder or an nn.Module, got {type(memory).__name__}", "pass RUN/train/memory or a loaded module"
        )
    meta = meta if meta is not None else getattr(memory, "meta", None)
    if not meta:
        raise MlpmemError(
            f"the {type(memory).__name__} comes without a meta (its layer and site)", "pass meta= with at least 'layer' and 'site'"
        )
    return memory, dict(meta)


def _entry(name: str, module: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """A memory's entry in config.extra_memories."""
    return {
        "name": name,
        "kind": component_kind(module),
        "memory_config": dataclasses.asdict(module.config) if isinstance(module, MLPMemory) else None,
        "memory_meta": _jsonable(dict(meta)),
    }


def _build_component(kind: str | None, memory_config: dict | None, meta: dict | None) -> nn.Module:
    """A memory from its config entry: an MLPMemory (random weights, loaded next), or a kNN-LM retriever from its run folder."""
    if (kind or "mlp") == "mlp":
        return MLPMemory(MemoryConfig(**memory_config))
    if kind == "knn":
        build_knn = hook("build_knn")
        if build_knn is None:
            raise MlpmemError(
                "this model mixes a kNN-LM retriever, which needs the mlpmem package (mlpmem.retrieval)",
                "install mlpmem and `import mlpmem`",
            )
        return build_knn(dict(meta or {}))
    raise MlpmemError(f"a saved memory of kind {kind!r} cannot be rebuilt", "save the model again with mlpmem")


def _free_name(taken: list[str]) -> str:
    i = len(taken)
    while f"memory_{i}" in taken:
        i += 1
    return f"memory_{i}"


def _device_of(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def _from_pretrained_parts(
    cls: type, name: str, config: MLPMemoryConfig, base_model: Any, tokenizer: Any, kwargs: dict
) -> MLPMemoryForCausalLM:
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
    gate, gate_meta = _load_gate(name, config, hub) if mixing != "fixed" else (None, None)
    if gate is not None:
        check_gate(gate_meta, memory, f"the gate in {name}")
    elif mixing == "gated":
        raise MlpmemError(f"{name} holds no gate, so mixing='gated' is not possible", "use mixing='fixed', or save the model with its gate")
    router, router_meta = _load_router(name, config, hub) if mixing != "fixed" else (None, None)
    if router is None and mixing == "routed":
        raise MlpmemError(
            f"{name} holds no router, so mixing='routed' is not possible",
            "use mixing='fixed', or fit a router (mlpmem.transformers_integration.fit_router) and save the model",
        )
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
                if (
                    not (Path(ref) / "config.json").is_file()
                    or not any(Path(ref).glob("*.safetensors"))
                    and not any(Path(ref).glob("*.bin"))
                ):
                    raise MlpmemError(
                        f"the full export in {name} is incomplete: {ref} holds no base model",
                        "export the model again with save_pretrained(..., full_export=True)",
                    )
            base_hub = dict(hub, subfolder=sub) if sub else base_hub
        elif config.base_model:
            ref = config.base_model
        else:
            raise MlpmemError(f"{name} names no base model", "pass base_model= to from_pretrained")
        lm, tok = load_base(ref, dtype, base_hub)
        tok = tokenizer if tokenizer is not None else tok
    if tok is None:
        logger.warning("cannot check that the base model's tokenizer is the memory's: pass tokenizer= to check it")
    model = cls.from_parts(
        lm,
        memory,
        meta,
        tokenizer=tok,
        base_model=config.base_model if isinstance(base_model, nn.Module) or base_model is None else str(base_model),
        lambda_=lam,
        memory_temperature=temp,
        gate=gate,
        gate_meta=gate_meta,
        mixing=mixing,
        name=config.memory_name,
        memories=memories,
        weights=weights,
        router=router,
        router_meta=router_meta,
    )
    if device is not None or isinstance(device_map, (str, torch.device)):
        model.to(device if device is not None else device_map)
    return model


def _load_memory(name: str, config: MLPMemoryConfig, hub: dict, entry: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A memory of a saved model: the first (``entry`` None) from ``memory/``, another from ``memories/NAME/``, else
    from the ``memory.*`` / ``extra_memories.NAME.*`` weights of a full export; a kNN-LM retriever from its run folder."""
    if entry is None:
        entry = {
            "name": config.memory_name or "memory",
            "kind": config.memory_kind,
            "memory_config": config.memory_config,
            "memory_meta": config.memory_meta,
        }
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
        raise MlpmemError(
            f"the memory weights in {name} do not fit its config ({str(e).splitlines()[0][:200]})",
            "export the model again with save_pretrained(..., full_export=True)",
        )
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
            raise MlpmemError(
                f"{name} is missing its weights file {shard}", "save the model again with save_pretrained(..., full_export=True)"
            )
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
        raise MlpmemError(
            f"{name} names a router in its config but holds no complete router ({ROUTER_DIR}/ is missing or partial)",
            "save the model again with save_pretrained",
        )
    router = MemoryRouter(**config.router_config["config"])
    state = {k.removeprefix("memory_router."): v.float() for k, v in _full_weights(name, hub, "memory_router.", required=False).items()}
    try:
        router.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MlpmemError(
            f"the router weights in {name} do not fit its config ({str(e).splitlines()[0][:200]})",
            "export the model again with save_pretrained",
        )
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
        raise MlpmemError(
            f"{name} names a gate in its config but holds no complete gate ({GATE_DIR}/ is missing or partial)",
            "save the model again with save_pretrained, or load it with mixing='fixed' after removing gate_config",
        )
    state = {k.removeprefix("gate."): v.float() for k, v in _full_weights(name, hub, "gate.", required=False).items()}
    gate = build_gate(config.gate_config["config"])
    try:
        gate.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MlpmemError(
            f"the gate weights in {name} do not fit its config ({str(e).splitlines()[0][:200]})",
            "export the model again with save_pretrained",
        )
    check_gate_values(gate, name)
    return gate.eval(), dict(config.gate_config.get("meta") or {})


def load_base(ref: str, dtype: Any, hub: dict) -> tuple[PreTrainedModel, Any]:
    """(base LM in eval mode, its tokenizer or None) from a name: mlpmem's loader where installed (it knows
    mlpmem's model names and GGUF files, and refuses non-causal models), else transformers'."""
    load_model = hook("load_base")
    if load_model is not None and not hub:
        return load_model(ref, _dtype_name(dtype))
    try:
        lm = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype if dtype is not None else "auto", **hub)
    except (OSError, ValueError) as e:
        raise MlpmemError(
            f"could not load the base model {ref!r} ({str(e).splitlines()[0][:200]})",
            "pass base_model= a loadable model, or save the LM + memory with full_export=True",
        )
    try:
        tok = AutoTokenizer.from_pretrained(ref, **hub)
    except (OSError, ValueError):
        tok = None
    return lm.eval().requires_grad_(False), tok


def _dtype_name(dtype: Any) -> str:
    # transformers 5 loads a checkpoint in its own dtype unless told otherwise: so does a base loaded by reference
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")


def _name(lm: nn.Module) -> str:
    return str(getattr(getattr(lm, "config", None), "name_or_path", "") or type(lm).__name__)


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _jsonable(obj: Any) -> Any:
    """Plain JSON values (tuples as lists, paths and other objects as strings)."""
    return json.loads(json.dumps(obj, default=str))
