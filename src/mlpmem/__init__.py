"""mlpmem: a retriever-pretrained MLP memory for Hugging Face causal LMs."""

from mlpmem._version import __version__  # noqa: F401


def _register_integration() -> None:
    """Give the model class (mlpmem.modeling, which imports nothing of mlpmem) what needs the library.

    Each hook imports its module on first use, so ``import mlpmem`` stays light (no torch).
    """
    import importlib

    from mlpmem.modeling import integration

    def lazy(module: str, attr: str):
        def call(*args, **kwargs):
            target = importlib.import_module(module)
            for part in attr.split("."):
                target = getattr(target, part)
            return target(*args, **kwargs)

        return call

    integration.register(
        check_base=lazy("mlpmem.transformers_integration", "check_base"),
        from_memory=lazy("mlpmem.transformers_integration", "from_memory"),
        load_base=lazy("mlpmem.transformers_integration", "load_base"),
        model_label=lazy("mlpmem.models", "model_label"),
        build_knn=lazy("mlpmem.retrieval", "KNNRetriever.from_reference"),
    )


_register_integration()


def __getattr__(name: str):
    # the HF classes import torch and transformers: load them only when asked for
    if name in ("MLPMemoryForCausalLM", "MLPMemoryConfig"):
        from mlpmem import transformers_integration

        return getattr(transformers_integration, name)
    raise AttributeError(f"module 'mlpmem' has no attribute {name!r}")
