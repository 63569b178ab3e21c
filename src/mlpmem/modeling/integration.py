"""What mlpmem adds to the model class when it is installed: registered from above, never imported from here.

The model class runs where mlpmem is not installed (remote code), so it cannot import mlpmem. The
integration layer (``mlpmem.transformers_integration``, registered when ``import mlpmem`` runs) fills :data:`HOOKS` with:

- ``check_base(lm, meta, tokenizer)``: the tokenizer hash and weight fingerprint against a memory's record;
- ``from_memory(cls, memory_dir, base_model, **kwargs)``: pair memory folders of the train stage with their base;
- ``load_base(ref, dtype)``: a base model by mlpmem's names (aliases, GGUF files) -> (lm, tokenizer);
- ``model_label(name)``: how results name a base model;
- ``build_knn(meta)``: a kNN-LM retriever from its run folder.

Without them the model still loads and mixes; the checks that need mlpmem are skipped (and said so),
and the constructors that need it say how to get it.
"""

from __future__ import annotations

from typing import Any, Callable

HOOKS: dict[str, Callable[..., Any]] = {}


def register(**hooks: Callable[..., Any]) -> None:
    """Install (or replace) integration hooks by name."""
    HOOKS.update(hooks)


def hook(name: str) -> Callable[..., Any] | None:
    """The registered hook ``name``, or None where mlpmem did not register one."""
    return HOOKS.get(name)
