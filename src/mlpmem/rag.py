"""Retrieval-augmented generation baseline: BM25 over the memory's training text, top-k passages in the prompt.

Why bm25s: it is pure Python over numpy/scipy (one wheel, no Java, unlike pyserini's
Lucene; no Rust build, unlike tantivy), indexes the few thousand passages of a
memory's training text in well under a second, and scores with the usual Okapi
BM25. Install it with ``pip install 'mlpmem[rag]'``.

The passages are the documents of a corpus folder's train split (the text the memory
trained on), decoded with its tokenizer and packed whole, in order, into passages of
at most ``chunk_words`` words (a longer document is cut into pieces of that size).
For each request the query is the task document's ``query`` field when it has one
(the knowledge tasks give the definition, the word or the sentence; without it the
prompt itself), and the prompt becomes::

    Background:
    <passage 1>
    ...
    <passage k>

    <prompt>

In lm-evaluation-harness the backend ``mlpmem-rag`` wraps the LM + memory of the
``mlpmem`` backend (``lambda_=0``: the LM alone, through the same code path) or, with
``pretrained=`` and no memory, a plain HF model (through :class:`SharedContextLM`); both
run each prompt once for all its choices unless ``shared_context=false``::

    mlpmem-lm-eval --model mlpmem-rag --model_args memory=RUN/train/memory,lambda_=0,k=3,chunk_words=48 --tasks ... --include_path TASKS
    mlpmem-lm-eval --model mlpmem-rag --model_args pretrained=MODEL,corpus=RUN/corpus --tasks ...
    mlpmem-lm-eval --model mlpmem-rag --model_args memory=RUN/train/memory,preset=top5x100 --tasks ...

``preset=top3x100`` and ``preset=top5x100`` are RAG as users deploy it: the top 3 or 5
passages of about 100 words (:data:`PRESETS`); without a preset, ``k`` defaults to 3 and
``chunk_words`` to 48.

``corpus`` defaults to the corpus the memory was trained on (from its manifests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpmem.errors import MlpmemError

log = logging.getLogger(__name__)

HEADER = "Background:\n"


@dataclass
class RagConfig:
    k: int = 3
    chunk_words: int = 48

    def check(self) -> None:
        if int(self.k) < 1 or int(self.chunk_words) < 1:
            raise MlpmemError(
                f"RAG needs k >= 1 and chunk_words >= 1, got k={self.k}, chunk_words={self.chunk_words}", "use e.g. k=3, chunk_words=48"
            )


# RAG as users deploy it: passages of about 100 words (DPR's Wikipedia passages; LangChain's and LlamaIndex's
# defaults are of that order), the top 3 or 5 before the question; beside a k and chunk size tuned on valid items
PRESETS = {"top3x100": RagConfig(3, 100), "top5x100": RagConfig(5, 100)}


def rag_config(preset: str | None = None, k: int | str | None = None, chunk_words: int | str | None = None) -> RagConfig:
    """The retrieval settings from a preset name or explicit ``k`` and ``chunk_words`` (the defaults fill what is not given)."""
    if preset is not None:
        if preset not in PRESETS:
            raise MlpmemError(f"no RAG preset {preset!r}", f"use one of {', '.join(PRESETS)}, or give k= and chunk_words=")
        if k is not None or chunk_words is not None:
            raise MlpmemError(
                f"the RAG preset {preset!r} sets k and chunk_words, and k={k}, chunk_words={chunk_words} were given too",
                "give either preset= or k= and chunk_words=",
            )
        cfg = PRESETS[preset]
    else:
        default = RagConfig()
        cfg = RagConfig(int(default.k if k is None else k), int(default.chunk_words if chunk_words is None else chunk_words))
    cfg.check()
    return cfg


def split_texts(corpus_dir: Path, split: str = "train") -> list[str]:
    """The documents of a corpus folder's split, as text (decoded with the corpus's tokenizer, separators dropped)."""
    import numpy as np

    from mlpmem.corpus import Corpus
    from mlpmem.models import load_tokenizer

    corpus = Corpus(Path(corpus_dir))
    tok = load_tokenizer(corpus.model_id)
    tokens, owner = corpus.tokens(split), corpus.doc_index(split)
    sep = int(corpus.manifest["separator_id"])
    bounds = np.flatnonzero(np.diff(owner)) + 1
    return [tok.decode([t for t in tokens[p].tolist() if t != sep]).strip() for p in np.split(np.arange(len(tokens)), bounds)]


def chunk(texts: list[str], chunk_words: int) -> list[str]:
    """Pack whole documents, in order, into passages of at most ``chunk_words`` words; cut longer documents."""
    out, cur, n = [], [], 0
    for text in texts:
        words = text.split()
        if not words:
            continue
        if len(words) > chunk_words:
            if cur:
                out.append(" ".join(cur))
                cur, n = [], 0
            out += [" ".join(words[i : i + chunk_words]) for i in range(0, len(words), chunk_words)]
            continue
        if n + len(words) > chunk_words and cur:
            out.append(" ".join(cur))
            cur, n = [], 0
        cur.append(text.strip())
        n += len(words)
    if cur:
        out.append(" ".join(cur))
    return out


class BM25Retriever:
    """BM25 (bm25s, English stopwords) over a list of passages."""

    def __init__(self, passages: list[str]) -> None:
        passages = [p for p in passages if p.strip()]
        if not passages:
            raise MlpmemError(
                "the retrieval index is empty: the corpus split has no text to retrieve from",
                "pass a corpus folder (RUN/corpus) whose train split holds text",
            )
        try:
            import bm25s
        except ImportError:
            raise MlpmemError("the RAG baseline needs the bm25s package", "pip install 'mlpmem[rag]'")
        self.passages = passages
        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)

    @classmethod
    def from_corpus(cls, corpus_dir: Path, chunk_words: int, split: str = "train") -> BM25Retriever:
        return cls(chunk(split_texts(corpus_dir, split), chunk_words))

    def search(self, queries: list[str], k: int) -> list[list[str]]:
        """The top-``k`` passages of each query, best first (a query with no indexed word gets none)."""
        k = min(int(k), len(self.passages))
        out: list[list[str]] = []
        for q in queries:  # one at a time: bm25s refuses a batch in which a query has no known token
            toks = self._bm25s.tokenize([q], stopwords="en", show_progress=False)
            if not any(w in self.index.vocab_dict for w in toks.vocab):
                out.append([])
                continue
            ids, scores = self.index.retrieve(toks, k=k, show_progress=False)
            out.append([self.passages[int(i)] for i, s in zip(ids[0], scores[0]) if s > 0])
        return out


def augment(prompt: str, passages: list[str]) -> str:
    """The prompt with the retrieved passages before it (unchanged when nothing was retrieved)."""
    return f"{HEADER}{chr(10).join(passages)}\n\n{prompt}" if passages else prompt


def memory_corpus(memory_dir: Path) -> Path:
    """The corpus folder a trained memory's datastore was built from (memory_config -> datastore manifest)."""
    from mlpmem.files import read_json
    from mlpmem.manifest import read_manifest

    cfg_path = Path(memory_dir) / "memory_config.json"
    if not cfg_path.is_file():
        raise MlpmemError(
            f"{memory_dir} is not a trained memory folder (no memory_config.json), so its corpus is unknown",
            "pass corpus=RUN/corpus for the retrieval index",
        )
    ds = read_json(cfg_path).get("meta", {}).get("datastore")
    if not ds:
        raise MlpmemError(
            f"{cfg_path} does not name the datastore the memory was trained on", "pass corpus=RUN/corpus for the retrieval index"
        )
    return Path(read_manifest(Path(ds), "datastore")["corpus"])


from lm_eval.api.model import LM  # noqa: E402  (this module is imported only by those who use lm-eval)
from lm_eval.api.registry import register_model  # noqa: E402

from mlpmem.lm_eval_backend import ModelArgs  # noqa: E402


class WrappedLM(LM):
    """An lm-eval LM that wraps another (``inner``): what it does not define, the inner LM answers."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # rank, world_size, tokenizer_name, ... of the wrapped LM
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size


class RetrievalLM(WrappedLM):
    """An lm-eval LM that puts retrieved passages before every prompt and hands the request to ``inner``.

    ``loglikelihood_rolling`` (perplexity) is passed through unchanged.
    """

    def __init__(self, inner: Any, retriever: BM25Retriever, k: int = 3) -> None:
        super().__init__(inner)
        self.retriever, self.k = retriever, int(k)

    def _augment(self, requests: list) -> list:
        queries = []
        for r in requests:
            doc = r.doc if isinstance(r.doc, dict) else {}
            queries.append(str(doc.get("query") or r.args[0]))
        found = self.retriever.search(queries, self.k)
        for r, passages in zip(requests, found):
            r.arguments = (augment(r.args[0], passages), *r.args[1:])
        return requests

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.inner.loglikelihood(self._augment(requests), disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self.inner.generate_until(self._augment(requests), disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.inner.loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def get_model_info(self) -> dict:
        info = self.inner.get_model_info() if hasattr(self.inner, "get_model_info") else {}
        return {**info, "rag": {"k": self.k, "n_passages": len(self.retriever.passages), "retriever": "bm25s"}}


class SharedContextLM(WrappedLM):
    """An lm-eval LM whose ``loglikelihood`` runs each distinct context once and its continuations after it.

    ``inner``: an HFLM (a plain HF model, or the ``mlpmem`` backend, which does this itself
    unless ``shared_context=false``); the scoring is
    :func:`mlpmem.lm_eval_backend.shared_context_loglikelihood`, with ``inner``'s own
    loglikelihood for what it cannot score the same way (e.g. requests longer than
    ``max_length``). Generation and rolling log-likelihood go to ``inner`` unchanged
    (its generate already uses the cache).
    """

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        from mlpmem.lm_eval_backend import shared_context_loglikelihood

        return shared_context_loglikelihood(self.inner, requests, disable_tqdm, fallback=self.inner.loglikelihood)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self.inner.generate_until(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.inner.loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def get_model_info(self) -> dict:
        info = self.inner.get_model_info() if hasattr(self.inner, "get_model_info") else {}
        return {**info, "loglikelihood": "shared context (mlpmem.rag.SharedContextLM)"}


class RagLM(ModelArgs, RetrievalLM):  # ModelArgs: device= (batch_size=) in --model_args, as for `mlpmem`
    """lm-eval backend ``mlpmem-rag``: BM25 passages + the ``mlpmem`` backend (or a plain HF model); see the module docstring."""

    def __init__(
        self,
        corpus: str | None = None,
        k: int | None = None,
        chunk_words: int | None = None,
        preset: str | None = None,
        memory: str | None = None,
        pretrained: str | None = None,
        lambda_: float = 0.0,
        tasks: str | None = None,
        shared_context: bool | str = True,
        **kwargs: Any,
    ) -> None:
        from mlpmem.lm_eval_backend import parse_bool

        cfg = rag_config(preset, k, chunk_words)
        shared = parse_bool("shared_context", shared_context)
        if corpus is None:
            if memory is None:
                raise MlpmemError(
                    "mlpmem-rag needs corpus=RUN/corpus (the text to retrieve from) when no memory is given",
                    "pass --model_args pretrained=MODEL,corpus=RUN/corpus",
                )
            corpus = str(memory_corpus(Path(memory)))
            log.info("retrieving from %s (the corpus the memory was trained on)", corpus)
        if tasks is not None:
            from mlpmem.knowledge_tasks import check_tasks

            check_tasks(Path(tasks), Path(corpus))
        retriever = BM25Retriever.from_corpus(Path(corpus), cfg.chunk_words)  # before the model loads: a bad corpus fails fast
        if memory is not None or (pretrained is not None and _is_mlpmem_folder(Path(pretrained))):
            from mlpmem.lm_eval_backend import MLPMemoryLM

            inner = MLPMemoryLM(memory=memory, pretrained=pretrained, lambda_=lambda_, shared_context=shared, **kwargs)
        else:
            inner = plain_hflm(pretrained, **kwargs)
            inner = SharedContextLM(inner) if shared else inner
        super().__init__(inner, retriever, cfg.k)  # prompts with passages are long: by default each runs once per item


if __name__ != "__main__":  # run as `python -m mlpmem.rag`, the package's module registers it (below), not this copy
    register_model("mlpmem-rag")(RagLM)


def _is_mlpmem_folder(folder: Path) -> bool:
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "mlpmem"
    except (OSError, ValueError):
        return False


def plain_hflm(pretrained: str | None, device: str | None = None, dtype: str = "float32", **kwargs: Any):
    """lm-eval's HFLM over a plain causal LM named as mlpmem names models (``smollm2-135m``, a folder, a hub name)."""
    from lm_eval.models.huggingface import HFLM

    from mlpmem.models import DEFAULT_MODEL, load_model, resolve_device

    dev = str(resolve_device(device or "auto", "float32")[0])
    model, tok, _ = load_model(pretrained or DEFAULT_MODEL, dtype=dtype, device=dev)
    return HFLM(pretrained=model, tokenizer=tok, backend="causal", device=dev, **kwargs)


if __name__ == "__main__":  # python -m mlpmem.rag: the same as mlpmem-lm-eval
    from mlpmem.lm_eval_cli import main

    main()
