"""``MLPMemoryConfig``: the composite config of an LM + memory pair (the base LM's config as ``text_config``)."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

try:  # sub-config specs are how transformers >= 5.x builds `text_config` from a dict
    from transformers.configuration_utils import SubConfigSpec
except ImportError:
    SubConfigSpec = None


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
    # what save_pretrained wrote: {"files": {path: {size, sha256}}, "tensors": {name: shape}} of every part but the
    # base LM's tensors; checked on load (a changed, missing or swapped file is refused, not initialised afresh)
    integrity: dict | None = None
    max_position_embeddings: int | None = None
    vocab_size: int | None = None

    def text(self) -> PretrainedConfig | None:
        """The base LM's config as a config object (older transformers leave the JSON dict as it is)."""
        if isinstance(self.text_config, dict):
            self.text_config = AutoConfig.for_model(**self.text_config)
        return self.text_config

    def saved_by_reference(self) -> bool:
        return self.text_config is None or self.base_weights == "reference"
