"""Knowledge probe: a multiple-choice task built from the memory's own training text.

Each item is ~32 tokens of a training document (the context) and 4 continuations
of ~8 tokens: the one that really followed, and 3 taken from other documents of the
same split. A model that has stored the corpus (the memory was trained on it; the
base LM was not) should prefer the true one. The folder holds ``items.jsonl``
(every item traceable to its document and token position), ``probe.yaml`` (an
lm-eval task over it, from ``mlpmem/tasks/knowledge_probe.yaml``), ``config.json``
and ``manifest.json``. Score both models on the same items through lm-eval, e.g.::

    mlpmem-lm-eval --model mlpmem --model_args memory=MEM,lambda_=0 --tasks mlpmem_probe --include_path PROBE_DIR
    mlpmem-lm-eval --model mlpmem --model_args memory=MEM,lambda_=0.25 --tasks mlpmem_probe --include_path PROBE_DIR

Items are a deterministic function of (corpus, seed, sizes).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlpmem.errors import MlpmemError

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).parent / "tasks" / "knowledge_probe.yaml"


@dataclass
class ProbeConfig:
    n_items: int = 200
    seed: int = 0
    model: str | None = None  # whose tokenizer detokenizes; None: the corpus's model
    context_tokens: int = 32
    continuation_tokens: int = 8
    n_distractors: int = 3
    task_name: str = "mlpmem_probe"


def build_probe(
    corpus_dir: Path,
    out_dir: Path,
    n_items: int = 200,
    seed: int = 0,
    model: str | None = None,
    *,
    context_tokens: int = 32,
    continuation_tokens: int = 8,
    n_distractors: int = 3,
    task_name: str = "mlpmem_probe",
    overwrite: bool = False,
) -> Path:
    """Write ``items.jsonl`` + ``probe.yaml`` for lm-eval into ``out_dir`` (skipped if already done). Returns out_dir."""
    import yaml

    from mlpmem.corpus import Corpus
    from mlpmem.files import file_record, read_json
    from mlpmem.folders import prepare_out
    from mlpmem.manifest import write_manifest
    from mlpmem.models import load_tokenizer, tokenizer_hash

    cfg = ProbeConfig(n_items, seed, model, context_tokens, continuation_tokens, n_distractors, task_name)
    if min(n_items, context_tokens, continuation_tokens, n_distractors) < 1:
        raise MlpmemError(
            f"probe sizes must be positive ({asdict(cfg)})", "use e.g. n_items=200, context 32, continuation 8, 3 distractors"
        )
    corpus = Corpus(Path(corpus_dir))
    name = model or corpus.model_id
    tok = load_tokenizer(name)
    corpus.check_tokenizer(tokenizer_hash(tok), name)
    out_dir = Path(out_dir)
    if prepare_out(out_dir, {**asdict(cfg), "corpus": str(Path(corpus_dir).resolve())}, overwrite, kind="probe") == "done":
        log.info("probe in %s is up to date", out_dir)
        return out_dir
    tokens, owner = corpus.tokens("train"), corpus.doc_index("train")
    doc_ids = [d["id"] for d in read_json(Path(corpus_dir) / "documents.json")["train"]]
    items = make_items(tokens, owner, tok, cfg, int(corpus.manifest["separator_id"]))
    for it in items:
        it["source"]["document"] = doc_ids[it["source"]["document"]]
    data = out_dir / "items.jsonl"
    data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    task = yaml.safe_load(TEMPLATE.read_text())
    task["task"] = task_name
    task["dataset_kwargs"]["data_files"]["test"] = str(data.resolve())
    (out_dir / "probe.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    write_manifest(
        out_dir,
        "probe",
        {
            "corpus": str(Path(corpus_dir).resolve()),
            "corpus_hash": corpus.manifest.get("corpus_hash"),
            "model_id": corpus.model_id,
            "tokenizer_hash": corpus.tokenizer_hash,
            "n_items": len(items),
            "task": task_name,
            "items": file_record(out_dir, data),
            "chance_accuracy": 1 / (n_distractors + 1),
        },
    )
    log.info("probe: %d items in %s (task %s)", len(items), out_dir, task_name)
    return out_dir


def make_items(tokens: np.ndarray, owner: np.ndarray, tok, cfg: ProbeConfig, sep: int) -> list[dict]:
    """Sample probe items from a token stream [T] with per-token document index [T].

    Spans (context + continuation) lie inside one document and hold no separator;
    every continuation starts at a word boundary (a token whose text begins with a
    space), so where a choice starts gives nothing away. Distractors come from
    other documents when there are several, else from at least a span away.
    """
    C, L, k = cfg.context_tokens, cfg.continuation_tokens, cfg.n_distractors
    tokens, owner = np.asarray(tokens, dtype=np.int64), np.asarray(owner)
    n = len(tokens)
    starts_word = _word_start_table(tok, int(tokens.max()) + 1)

    def ok_spans(length: int) -> np.ndarray:
        """Start positions s whose tokens s..s+length-1 lie in one document and hold no separator."""
        if n < length:
            return np.zeros(0, dtype=np.int64)
        s = np.arange(n - length + 1)
        is_sep = np.concatenate([[0], np.cumsum(tokens == sep)])
        return s[(owner[s] == owner[s + length - 1]) & (is_sep[s + length] - is_sep[s] == 0)]

    span = ok_spans(C + L)
    span = span[starts_word[tokens[span + C]]]  # the true continuation starts a word
    cont = ok_spans(L)
    cont = cont[starts_word[tokens[cont]]]
    if len(span) == 0 or len(cont) < k + 1:
        raise MlpmemError(
            f"the training split has no room for probe items of {C} + {L} tokens inside one document",
            "use a larger corpus, or smaller context_tokens / continuation_tokens",
        )
    several_docs = len(np.unique(owner)) > 1
    rng = np.random.default_rng(cfg.seed)
    items: list[dict] = []
    for s in rng.permutation(span):
        if len(items) == cfg.n_items:
            break
        ctx_ids, true_ids = tokens[s : s + C].tolist(), tokens[s + C : s + C + L].tolist()
        context, truth = tok.decode(ctx_ids), tok.decode(true_ids)
        if context + truth != tok.decode(ctx_ids + true_ids):
            continue  # a character split across the cut: the texts would not join back
        draws = cont[rng.integers(0, len(cont), 20 * k)]  # bounded: a few collide with each other or with the truth
        far = draws[(owner[draws] != owner[s]) if several_docs else (np.abs(draws - s) > C + L)]
        choices, sources = [truth], [int(s + C)]
        for q in far:
            text = tok.decode(tokens[q : q + L].tolist())
            if text not in choices and text.strip():
                choices.append(text)
                sources.append(int(q))
                if len(choices) == k + 1:
                    break
        if len(choices) < k + 1:
            continue
        label = int(rng.integers(k + 1))
        order = list(range(1, k + 1))
        order.insert(label, 0)
        items.append(
            {
                "id": len(items),
                "context": context,
                "choices": [choices[i] for i in order],
                "label": label,
                "source": {"document": int(owner[s]), "position": int(s), "choice_positions": [sources[i] for i in order]},
            }
        )
    if len(items) < cfg.n_items:
        log.warning("the corpus gave only %d probe items of the %d asked for", len(items), cfg.n_items)
    if not items:
        raise MlpmemError("no probe item could be built from the training split", "use a larger corpus, or fewer distractors")
    return items


def _word_start_table(tok, size: int) -> np.ndarray:
    """bool [size]: does token v's text begin with a space? (All True if the tokenizer never says so.)"""
    table = np.array([t.startswith(" ") for t in tok.batch_decode([[v] for v in range(size)])], dtype=bool)
    if not table.any():  # e.g. tokenizers that drop leading spaces when decoding one token
        log.warning("cannot tell word starts from this tokenizer; continuations may start mid-word")
        table[:] = True
    return table
