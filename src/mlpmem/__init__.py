"""mlpmem: a retriever-pretrained MLP memory for Hugging Face causal LMs."""

__version__ = "0.1.0"
