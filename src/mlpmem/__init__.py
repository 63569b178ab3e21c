"""mlpmem: a retriever-pretrained MLP memory for Hugging Face causal LMs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # the HF classes import torch and transformers: load them only when asked for
    if name in ("MLPMemoryForCausalLM", "MLPMemoryConfig"):
        from mlpmem import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'mlpmem' has no attribute {name!r}")
