"""Stage 1: documents -> deterministic split by document -> token streams -> windows.

Document rules: a ``.txt`` file is one document (``txt_documents="file"``) or
one document per blank-line-separated block (``"blank_line"``); a ``.jsonl``
line and a ``.parquet`` row are one document each (text in ``text_field``);
a folder means every such file under it, in sorted order. ``builtin:sotu`` is
the State of the Union corpus vendored with the package; ``hf:NAME`` loads a
Hugging Face dataset (needs the ``datasets`` extra, and network or a cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpmem.errors import MlpmemError
from mlpmem.files import load_npy, save_npy, write_json
from mlpmem.folders import prepare_out
from mlpmem.manifest import read_manifest, write_manifest
from mlpmem.models import DEFAULT_MODEL, load_tokenizer, separator_id, tokenizer_hash, resolve_model

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
BUILTIN = {"builtin:sotu": Path(__file__).parent / "data" / "sotu.jsonl.xz"}


@dataclass
class CorpusConfig:
    source: str = "builtin:sotu"
    model: str = DEFAULT_MODEL  # whose tokenizer
    text_field: str = "text"
    txt_documents: str = "file"  # "file" or "blank_line"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    train_tokens: int | None = None  # caps; the last document taken is cut to fit
    valid_tokens: int | None = None
    test_tokens: int | None = None
    seed: int = 0

    def problems(self) -> list[str]:
        from mlpmem.typed_config import need, one_of

        fr = (self.valid_fraction, self.test_fraction)
        return (
            need(
                isinstance(self.source, str) and self.source.strip() != "", "source", "must name a file, a folder, builtin:sotu or hf:NAME"
            )
            + need(bool(self.text_field), "text_field", "must not be empty")
            + one_of(self, "txt_documents", ("file", "blank_line"))
            + need(
                all(0 < f < 1 for f in fr) and sum(fr) < 1,
                "valid_fraction",
                f"and test_fraction must lie in (0, 1) with a sum below 1, got {fr[0]!r} and {fr[1]!r}",
            )
            + [
                f"{k}: must be at least 2 tokens (or null for no cap), got {getattr(self, k)!r}"
                for k in ("train_tokens", "valid_tokens", "test_tokens")
                if getattr(self, k) is not None and getattr(self, k) < 2
            ]
        )


@dataclass
class Document:
    id: str
    text: str


# ---------------------------------------------------------------- reading


def _read_jsonl(path: Path, field: str, lines) -> list[Document]:
    docs = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MlpmemError(
                f"{path} line {i + 1} is not valid JSON ({e.msg})", 'fix that line; each line must be a JSON object such as {"text": "..."}'
            )
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise MlpmemError(
                f"{path} line {i + 1} has no string field {field!r}",
                f"give each line a {field!r} field, or name the right field with --text-field",
            )
        docs.append(Document(str(row.get("id", f"{path.name}:{i + 1}")), row[field]))
    return docs


def _read_file(path: Path, cfg: CorpusConfig) -> list[Document]:
    try:
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            if cfg.txt_documents == "blank_line":
                blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
                return [Document(f"{path.name}#{i}", b) for i, b in enumerate(blocks) if b]
            return [Document(path.name, text)]
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return _read_jsonl(path, cfg.text_field, f)
        if path.name.endswith(".jsonl.xz"):
            with lzma.open(path, "rt", encoding="utf-8") as f:
                return _read_jsonl(path, cfg.text_field, f)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if cfg.text_field not in table.column_names:
                raise MlpmemError(
                    f"{path} has no column {cfg.text_field!r} (columns: {table.column_names})", "name the text column with --text-field"
                )
            texts = table.column(cfg.text_field).to_pylist()
            return [Document(f"{path.name}:{i}", t) for i, t in enumerate(texts) if isinstance(t, str)]
    except UnicodeDecodeError as e:
        raise MlpmemError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", "convert the file to UTF-8")
    except (OSError, lzma.LZMAError) as e:
        raise MlpmemError(f"cannot read {path} ({e})", "check that the file exists, is readable and is not corrupted")
    except Exception as e:  # pyarrow raises its own types for broken files
        if type(e).__module__.startswith("pyarrow"):
            raise MlpmemError(f"cannot read {path} as parquet ({e})", "check that the file is a valid parquet file")
        raise
    raise MlpmemError(f"{path} has an unsupported extension", "use .txt, .jsonl or .parquet files")


def load_documents(cfg: CorpusConfig) -> list[Document]:
    """All documents of the source, in a stable order."""
    if cfg.txt_documents not in ("file", "blank_line"):
        raise MlpmemError(f"txt_documents must be 'file' or 'blank_line', not {cfg.txt_documents!r}", "pick one of the two rules")
    src = cfg.source
    if src in BUILTIN:
        docs = _read_file(BUILTIN[src], CorpusConfig(text_field="text"))
    elif src.startswith("hf:"):
        docs = _load_hf(src[3:], cfg.text_field)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise MlpmemError(
                f"corpus {src!r} does not exist", "pass a .txt/.jsonl/.parquet file or a folder of them, 'builtin:sotu', or 'hf:DATASET'"
            )
        files = (
            sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in (".txt", ".jsonl", ".parquet"))) if path.is_dir() else [path]
        )
        if not files:
            raise MlpmemError(f"folder {path} has no .txt, .jsonl or .parquet files", "put the corpus files in it, or pass a file")
        docs = [d for f in files for d in _read_file(f, cfg)]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise MlpmemError(f"corpus {src!r} is empty (no non-blank documents)", "check the file contents and --text-field")
    return docs


def drop_duplicates(docs: list[Document]) -> tuple[list[Document], int]:
    """Keep the first document of each exact text: a text under two ids would otherwise land in two splits.

    Returns (documents, how many were dropped).
    """
    seen: set[bytes] = set()
    out = []
    for d in docs:
        h = hashlib.sha256(d.text.encode()).digest()
        if h not in seen:
            seen.add(h)
            out.append(d)
    return out, len(docs) - len(out)


def _load_hf(name: str, field: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise MlpmemError(
            "loading a Hugging Face dataset needs the `datasets` package", "pip install 'mlpmem[hf]', or export the data to .jsonl"
        )
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as e:
        raise MlpmemError(
            f"could not load dataset {name!r} ({str(e).splitlines()[0][:200]})",
            "check the name, or export the data to .jsonl and pass the file",
        )
    if field not in ds.column_names:
        raise MlpmemError(
            f"dataset {name!r} has no column {field!r} (columns: {ds.column_names})", "name the text column with --text-field"
        )
    return [Document(f"{repo}:{i}", t) for i, t in enumerate(ds[field]) if isinstance(t, str)]


# ---------------------------------------------------------------- splitting


def split_documents(docs: list[Document], valid_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Assign documents to splits by a seeded hash of their id and text.

    The order depends on each document alone, not on the others, so adding a
    document to a corpus does not move the rest between splits.
    """
    if not (0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise MlpmemError(
            f"valid_fraction={valid_fraction} and test_fraction={test_fraction} must be in (0, 1) with a sum below 1", "e.g. 0.1 and 0.1"
        )
    if len(docs) < 3:
        raise MlpmemError(
            f"the corpus has {len(docs)} document(s) but the split by document needs at least 3 (train, valid, test)",
            "add documents, or for one long .txt file use --txt-documents blank_line to make each paragraph block a document",
        )
    keys = [hashlib.sha256(f"{seed}\0{d.id}\0{d.text}".encode()).hexdigest() for d in docs]
    order = sorted(range(len(docs)), key=lambda i: keys[i])
    n_test = max(1, round(test_fraction * len(docs)))
    n_valid = max(1, round(valid_fraction * len(docs)))
    return {"test": order[:n_test], "valid": order[n_test : n_test + n_valid], "train": order[n_test + n_valid :]}


def tokenize_split(texts: list[str], tok, sep: int, max_tokens: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents into one stream with ``sep`` after each document.

    Returns ``tokens`` int32 [T] and ``doc_index`` int32 [T] (which document of
    the list each token belongs to). Stops once ``max_tokens`` are reached.
    """
    chunks, owners, total = [], [], 0
    batch = 16
    for b in range(0, len(texts), batch):
        for j, ids in enumerate(tok(texts[b : b + batch], add_special_tokens=False)["input_ids"]):
            ids = list(ids) + [sep]
            if max_tokens is not None:
                ids = ids[: max_tokens - total]
            chunks.append(np.asarray(ids, dtype=np.int32))
            owners.append(np.full(len(ids), b + j, dtype=np.int32))
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                return np.concatenate(chunks), np.concatenate(owners)
    return np.concatenate(chunks), np.concatenate(owners)


def windows(n_tokens: int, context: int, stride: int) -> np.ndarray:
    """Scoring windows over a stream of ``n_tokens`` tokens: int64 [W, 3] rows (begin, end, keep_from).

    A window feeds tokens ``begin..end-1`` and keeps the predictions for
    positions ``keep_from..min(end, n_tokens-1)-1`` (position t predicts token
    t+1). Every position 0..n_tokens-2 is kept exactly once, in order, with at
    least ``context - stride`` tokens of context after the first window.
    """
    if not 1 <= stride <= context:
        raise MlpmemError(f"stride {stride} must be between 1 and the context {context}", "use e.g. context 512, stride 256")
    last = n_tokens - 1  # positions that have a next token
    out, begin, kept = [], 0, 0
    while kept < last:
        end = min(begin + context, n_tokens)
        stop = min(end, last)
        if stop > kept:
            out.append((begin, end, kept))
            kept = stop
        begin += stride
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def window_batches(W: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive rows of :func:`windows` in batches of at most ``batch_size`` windows of one length
    (a batch stacks into one tensor without padding; only the last windows are shorter)."""
    i = 0
    while i < len(W):
        j, length = i + 1, W[i, 1] - W[i, 0]
        while j < len(W) and j - i < batch_size and W[j, 1] - W[j, 0] == length:
            j += 1
        yield W[i:j]
        i = j


# ---------------------------------------------------------------- the stage


def build_corpus(out_dir: Path, cfg: CorpusConfig, overwrite: bool = False) -> Path:
    """Read, split and tokenize a corpus into ``out_dir``; skip if already done."""
    from mlpmem.typed_config import validate

    out_dir = Path(out_dir)
    validate(cfg, "corpus")
    docs, n_dup = drop_duplicates(load_documents(cfg))  # validate everything before writing anything
    if n_dup:
        log.info("dropped %d duplicate document(s) (exact same text as an earlier one), so that no text is in two splits", n_dup)
    parts = split_documents(docs, cfg.valid_fraction, cfg.test_fraction, cfg.seed)
    tok = load_tokenizer(cfg.model)
    _, model_id = resolve_model(cfg.model)
    if prepare_out(out_dir, cfg, overwrite, kind="corpus") == "done":
        old = read_manifest(out_dir, "corpus")
        if n_dup and "n_duplicates_dropped" not in old:
            raise MlpmemError(
                f"the corpus in {out_dir} was built before duplicates were removed, and the source has {n_dup} duplicate document(s) that may sit in two splits",
                "pass --overwrite to rebuild it without them",
            )
        log.info("corpus in %s is up to date", out_dir)
        return out_dir
    sep = separator_id(tok)
    corpus_hash = hashlib.sha256()
    for d in docs:
        corpus_hash.update(hashlib.sha256(f"{d.id}\0{d.text}".encode()).digest())
    caps = {"train": cfg.train_tokens, "valid": cfg.valid_tokens, "test": cfg.test_tokens}
    splits, documents = {}, {}
    for split in SPLITS:
        idx = parts[split]
        tokens, owner = tokenize_split([docs[i].text for i in idx], tok, sep, caps[split])
        if len(tokens) < 2:
            raise MlpmemError(f"the {split} split has fewer than 2 tokens", "use a larger corpus or larger token caps")
        used = int(owner[-1]) + 1
        counts = np.bincount(owner, minlength=used)
        documents[split] = [{"id": docs[i].id, "n_tokens": int(c)} for i, c in zip(idx[:used], counts)]
        splits[split] = {
            "n_tokens": int(len(tokens)),
            "n_documents": used,
            "tokens": save_npy(out_dir / f"tokens.{split}.npy", tokens),
            "doc_index": save_npy(out_dir / f"doc_index.{split}.npy", owner),
        }
        log.info("%s: %d documents, %d tokens", split, used, len(tokens))
    write_json(out_dir / "documents.json", documents)
    write_manifest(
        out_dir,
        "corpus",
        {
            "source": cfg.source,
            "model_id": model_id,
            "tokenizer_hash": tokenizer_hash(tok),
            "separator_id": sep,
            "n_documents_total": len(docs),
            "n_duplicates_dropped": n_dup,
            "corpus_hash": corpus_hash.hexdigest(),
            "splits": splits,
        },
    )
    return out_dir


class Corpus:
    """Reader of a finished corpus folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, "corpus")
        self.model_id = self.manifest["model_id"]
        self.tokenizer_hash = self.manifest["tokenizer_hash"]

    def tokens(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise MlpmemError(f"unknown split {split!r}", f"choose one of {SPLITS}")
        return load_npy(self.folder, self.manifest["splits"][split]["tokens"], mmap=False)

    def doc_index(self, split: str) -> np.ndarray:
        return load_npy(self.folder, self.manifest["splits"][split]["doc_index"], mmap=False)

    def check_tokenizer(self, tok_hash: str, model_id: str) -> None:
        if tok_hash != self.tokenizer_hash:
            raise MlpmemError(
                f"the corpus in {self.folder} was tokenized for {self.model_id!r}, whose tokenizer differs from that of {model_id!r}",
                "build the corpus again with --model set to the model you use",
            )
