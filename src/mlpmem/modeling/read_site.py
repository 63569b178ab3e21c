"""Where a memory reads the LM, and the one hook that reads it.

A *read site* is a decoder layer and a place in it: ``ffn_input`` (the input of the layer's
feed-forward block, after its norm: the kNN-LM key) or ``output`` (the layer's output, the
residual stream). The datastore, training, scoring and the model class all read hidden states
through :func:`capture`, so they read the same tensors. Torch only (no transformers), so the
datastore's loader imports it cheaply.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
from torch import nn

from .errors import MlpmemError

SITES = ("ffn_input", "output")


class ReadSite(NamedTuple):
    """Where a hidden state is read: decoder ``layer`` (non-negative once resolved) and ``site`` within it."""

    layer: int
    site: str = "ffn_input"


def parse_site(text: str) -> ReadSite:
    """``"LAYER:SITE"`` (site default ``output``) as written on the command line and in recipes."""
    layer, _, site = text.partition(":")
    try:
        return ReadSite(int(layer), site or "output")
    except ValueError:
        raise MlpmemError(f"cannot read hidden-state site {text!r}", "write it as LAYER:SITE, e.g. -1:output or 12:ffn_input")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers, found from its structure (no per-model table)."""
    n = model.config.get_text_config().num_hidden_layers
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise MlpmemError(
        f"could not find the decoder layers of {type(model).__name__} (no list of {n} modules)", "use a standard Hugging Face causal LM"
    )


def check_layer(layer: int, n_layers: int, what: str = "layer") -> int:
    """A possibly negative layer index (counting from the end) as a non-negative one, range checked."""
    if not -n_layers <= layer < n_layers:
        raise MlpmemError(
            f"{what} {layer} is out of range: the model has {n_layers} decoder layers",
            f"choose a layer in {-n_layers}..{n_layers - 1} (negative counts from the end; -1 is the last)",
        )
    return layer % n_layers


def resolve_layer(model: nn.Module, layer: int) -> int:
    """A possibly negative layer index of ``model`` as a non-negative one, range checked."""
    return check_layer(layer, len(decoder_layers(model)))


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def capture(model: nn.Module, sites: list[ReadSite], stop_early: bool = False) -> Iterator[dict[ReadSite, torch.Tensor]]:
    """Hook ``model`` at every site while inside: ``store[site]`` is its hidden state [batch, seq, d] after a forward.

    With ``stop_early`` the forward pass is cut after the deepest captured site (later layers and
    the logits are not needed for a datastore); call the model through :func:`run_captured`. The
    hooks are removed on exit, whatever happens (lm-evaluation-harness's scoped-hook habit).
    """
    layers = decoder_layers(model)
    store: dict[ReadSite, torch.Tensor] = {}
    deepest = max(sites, key=lambda s: (s.layer, SITES.index(s.site))) if sites else None  # no sites: the LM's log-probs alone
    handles = []

    def make(site: ReadSite, is_pre: bool):
        def hook(module, args, output=None):
            store[site] = args[0] if is_pre else (output[0] if isinstance(output, tuple) else output)
            if stop_early and site == deepest:
                raise _StopForward

        return hook

    try:
        for s in sites:
            if s.site not in SITES:
                raise MlpmemError(f"unknown hidden-state site {s.site!r}", f"choose one of {SITES}")
            layer = layers[s.layer]
            if s.site == "ffn_input":
                mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
                if mlp is None:
                    raise MlpmemError(
                        f"decoder layer {type(layer).__name__} has no `mlp` block to hook", "use site 'output' for this model"
                    )
                handles.append(mlp.register_forward_pre_hook(make(s, True)))
            else:
                handles.append(layer.register_forward_hook(make(s, False)))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_captured(model: nn.Module, **inputs):
    """Call ``model(**inputs)`` and swallow the early stop of :func:`capture`. Returns the output or None."""
    try:
        return model(**inputs)
    except _StopForward:
        return None


def keep_positions(x: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> the kept positions, with transformers' meaning of ``logits_to_keep``: 0 all, n the last n, a tensor those."""
    if isinstance(logits_to_keep, int):
        return x if logits_to_keep == 0 else x[:, -logits_to_keep:]
    return x[:, logits_to_keep]
