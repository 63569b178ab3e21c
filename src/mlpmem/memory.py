"""The MLP memory: hidden state at one position -> logits over the LM's vocabulary.

An optional input projection, B residual blocks ``x = x + FFN(Norm(x))``, a final
norm and a head to V logits. No attention: every position is mapped on its own,
so a batch is just a bag of rows. The network (:class:`MemoryConfig`,
:class:`MLPMemory`) is defined in :mod:`mlpmem.modeling.mlp_memory`, part of
what an exported model carries, and re-exported here; this module starts a memory
from an LM and saves and loads memory folders. A memory folder holds
``model.safetensors`` and ``memory_config.json`` (the config that rebuilds it, plus
where its inputs come from), so loading needs no flags.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlpmem.errors import MlpmemError
from mlpmem.files import read_json, write_json

# the network itself lives in the self-contained file an exported model carries (one definition)
from mlpmem.modeling.mlp_memory import ACTIVATIONS, Block, FFN, INITS, MLPMemory, MemoryConfig, NORMS, Norm  # noqa: F401  (re-exported)
from mlpmem.modeling.mlp_memory import MEMORY_CONFIG as CONFIG
from mlpmem.modeling.mlp_memory import MEMORY_WEIGHTS as WEIGHTS
from mlpmem.modeling.mlp_memory import saved_config
from mlpmem.modeling.read_site import ReadSite, check_layer, decoder_layers

log = logging.getLogger(__name__)


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
    rows = slice(None) if memory.head_ids is None else memory.head_ids  # a pruned head: its tokens' rows
    memory.head.weight.copy_(head.weight[rows])  # a copy, never a shared tensor: the memory trains its own
    if memory.head.bias is not None:
        memory.head.bias.copy_(lm_bias[rows] if lm_bias is not None else torch.zeros_like(memory.head.bias))
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


# ----------------------------------------------------------------------------- the memory's input


@dataclass(frozen=True)
class MemoryInput:
    """Where a memory reads: the LM's hidden state at decoder ``layer`` (non-negative) and ``site``,
    ``stored`` in the training datastore (array ``array``) or ``recomputed`` by the LM (array None).

    Decided once, by :func:`resolve_memory_input`, and stored in the memory's metadata
    (:meth:`as_meta`: the ``layer``, ``site``, ``input_source`` and ``input_array`` keys); every
    later reader (training data, the pipeline's scoring, evaluation, the HF class) takes it from there.
    """

    layer: int
    site: str
    source: str = "stored"  # stored | recomputed
    array: str | None = None  # the datastore array when stored: "keys" or "h{layer}.{site}"

    def as_meta(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "site": self.site,
            "input_source": self.source,
            "input_array": self.array if self.source == "stored" else "online",
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "MemoryInput":
        """The input recorded in a memory's meta (memories saved before ``input_source`` existed too)."""
        array = meta.get("input_array")
        source = meta.get("input_source") or ("recomputed" if array == "online" else "stored")
        return cls(int(meta["layer"]), str(meta["site"]), source, array if source == "stored" else None)

    @property
    def read_site(self):
        return ReadSite(self.layer, self.site)

    def array_in(self, key_layer: int, key_site: str) -> str:
        """The name this input has in a datastore whose key is (``key_layer``, ``key_site``)."""
        return "keys" if (self.layer, self.site) == (key_layer, key_site) else f"h{self.layer}.{self.site}"  # store.feature_name


def resolve_memory_input(
    input_layer: int | None,
    input_site: str | None,
    init: str,
    mode: str,
    key_layer: int,
    key_site: str,
    lm=None,
    n_layers: int | None = None,
) -> MemoryInput:
    """The one decision of what a memory reads, from a training config's settings and the datastore's key.

    Unset layer and site: the key (``key_layer`` non-negative, ``key_site``), except with ``init
    lm_copy``, which starts as the LM's own head path and so reads the last layer's output. A
    negative layer counts from the end (it needs ``lm`` or ``n_layers``). ``mode`` online:
    recomputed by the LM; offline: stored in the datastore.
    """
    if init == "lm_copy":
        layer, site = (-1 if input_layer is None else input_layer), (input_site or "output")
    else:
        layer, site = (key_layer if input_layer is None else input_layer), (input_site or key_site)
    if lm is not None:
        n_layers = len(decoder_layers(lm))
    if n_layers is not None:
        layer = check_layer(layer, n_layers, "input layer")
    elif layer < 0:
        raise MlpmemError(
            f"input layer {layer} counts from the end, which needs the model", "pass a non-negative --input-layer (or the LM)"
        )
    if init == "lm_copy" and n_layers is not None and (layer, site) != (n_layers - 1, "output"):
        log.warning(
            "init lm_copy reads layer %s (%s): the copy of the LM's head path is exact only on the last layer's output", layer, site
        )
    stored = mode != "online"
    probe = MemoryInput(layer, site)
    return MemoryInput(layer, site, "stored" if stored else "recomputed", probe.array_in(key_layer, key_site) if stored else None)


# ----------------------------------------------------------------------------- training-time dropout


def add_block_dropout(memory: MLPMemory, p: float) -> list:
    """Dropout on each residual block's update (``x + dropout(FFN(Norm(x)))``), in train mode only.

    Forward hooks, so the saved memory (weights and config) is the same with or without
    it and an exported model carries none; returns the hook handles (``.remove()`` them to undo).
    """
    if not p:
        return []
    import torch.nn.functional as F

    return [block.ffn.register_forward_hook(lambda mod, args, out: F.dropout(out, p, mod.training)) for block in memory.blocks]


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

    from mlpmem.folders import marked_kind

    folder = Path(folder)
    kind = marked_kind(folder)
    if kind not in (None, "memory") and not (folder / CONFIG).exists():  # another stage's folder: training into it is no fix
        raise MlpmemError(f"{folder} holds a `{kind}` stage of mlpmem, not a memory", "pass a trained memory folder (RUN/train/memory)")
    fix = f"train the memory again into {folder}, or pass the folder that holds {CONFIG} and {WEIGHTS}"
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).exists():
            raise MlpmemError(f"{folder} holds no complete memory ({name} is missing)", fix)
    data = read_json(folder / CONFIG)
    try:
        cfg = saved_config(data["config"], folder)
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


def run_results(memory_dir: Path) -> dict[str, Any]:
    """What the run that trained this memory measured, from the files the stages leave next to it (or {})."""
    out: dict[str, Any] = {}
    train_manifest = memory_dir.parent / "manifest.json"
    report = memory_dir.parent.parent / "report.json"
    try:
        if train_manifest.is_file():
            m = read_json(train_manifest)
            out.update({k: m[k] for k in ("valid", "steps", "epochs", "n_rows") if m.get(k) is not None})
        if report.is_file():
            r = read_json(report)
            keys = ("ppl", "lambda", "corpus", "n_train_tokens", "n_test_tokens", "memory_dtype")
            out.update({k: r[k] for k in keys if r.get(k) is not None})
    except (OSError, ValueError, MlpmemError) as e:  # results are a courtesy for the model card, never a reason to fail
        log.info("no run results read next to %s (%s)", memory_dir, e)
    return out
