"""Knowledge tasks for lm-evaluation-harness, built from public data shipped by package registries.

Two steps (``mlpmem tasks source`` and ``mlpmem tasks build``), because the items must
come from text the memory trained on, and which documents that is depends on the
corpus stage's split:

1. :func:`build_source` unpacks WordNet (Debian ``wordnet-base``) and writes
   ``wordnet.jsonl``, the memory's text (one document per synset, ``"word, synonym
   (noun): definition."``, a seeded sample of synsets with a plain headword), and
   ``synsets.jsonl`` (every synset: all glosses of every word, for distractors and for
   the hallucination figure). Train a memory on it with ``mlpmem run`` (recipe
   ``bench/recipes/wordnet50k.yaml``).
2. :func:`build_tasks` reads that run's corpus folder and makes items only from the
   synsets whose documents are in its *train* split (the memory saw them, the base LM
   was not trained on this text, a retriever over the training text can find them):

   - ``mlpmem_wn_mc``: "Which word is defined as ...?" with 4 choices; the distractors
     are headwords of the same part of speech and lexicographer file (noun.animal,
     verb.motion, ...) that are also in the training text, so familiarity with a word
     does not give the answer away;
   - ``mlpmem_wn_em``: the same questions, answered by greedy generation, exact match
     against any word of the synset;
   - ``mlpmem_wn_define``: "Define the word X." scored against the gold definition by
     token F1 and ROUGE-L, plus ``unsupported``, the share of generated content words
     found in no gloss of any sense of X (the HaluEval analogue; lower is better);
   - ``mlpmem_sotu_facts`` (with ``--sotu-corpus``): a sentence of a training speech
     with a number or capitalised name blanked out, 4 choices of the same kind;
   - ``mlpmem_reasoning``: generated arithmetic, ordering and comparison items whose
     answers are in no corpus (the StrategyQA analogue: does the memory cost anything?).

   Each task has a ``test`` and a disjoint ``valid`` file (valid tunes RAG's k and chunk
   size). The folder records the source package, version, licence, the sha256 of every
   input, the corpus's hash, split and tokenizer, the seed and the command.

Everything is a deterministic function of (inputs, seed, sizes).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mlpmem.errors import MlpmemError

log = logging.getLogger(__name__)

TASKS = ("mlpmem_wn_mc", "mlpmem_wn_em", "mlpmem_wn_define", "mlpmem_sotu_facts", "mlpmem_reasoning")
STOPWORDS = frozenset(
    (
        "a an the of to in on at by for from with without into onto over under about as and or but nor not no so than then "
        "that this these those there here which who whom whose what when where why how it its it's is are was were be been "
        "being am do does did doing has have had having can could may might must shall should will would one ones some any "
        "all each every either neither both such other another more most less least very too also only just especially "
        "usually often something someone somebody anything anyone thing things person people used use using make made "
        "word words define definition means meaning refers refer kind type form act state quality i you he she we they "
        "them him her his their our your my me us if up out off down again further once same own s e g etc"
    ).split()
)


def command_line() -> str:
    """The command that is running, for the manifest (``mlpmem tasks ...`` or the bench script)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("mlpmem", "__main__.py")):
        argv[0] = "mlpmem"
    return " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------- step 1: the source


@dataclass
class SourceConfig:
    n_synsets: int = 2600  # documents of the memory's text (~30 SmolLM2 tokens each)
    seed: int = 0


def build_source(out_dir: Path, deb: Path | None = None, n_synsets: int = 2600, seed: int = 0, overwrite: bool = False) -> Path:
    """Unpack ``wordnet-base`` (``deb``, or ``apt-get download``) and write ``wordnet.jsonl`` + ``synsets.jsonl``."""
    import tempfile

    from mlpmem import wordnet
    from mlpmem.manifest import file_record, prepare_out, sha256_file, write_manifest

    cfg = SourceConfig(n_synsets, seed)
    if n_synsets < 10:
        raise MlpmemError(f"n_synsets must be at least 10, got {n_synsets}", "use e.g. --n-synsets 2600 (about 80k tokens)")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data, deb_path, info = wordnet.extract_package(Path(deb) if deb else None, Path(tmp))  # checked before claiming --out
        if prepare_out(out_dir, asdict(cfg), overwrite, kind="tasks_source") == "done":
            log.info("WordNet source in %s is up to date", out_dir)
            return out_dir
        inputs = {name: sha256_file(data / name) for name in wordnet.DATA_FILES}
        synsets = [s for name in wordnet.DATA_FILES for s in wordnet.parse_data_file(data / name)]
        deb_sha = sha256_file(deb_path)
        if info.get("copyright_file"):
            (out_dir / "COPYRIGHT.wordnet").write_text(Path(info["copyright_file"]).read_text(errors="replace"))
    docs = select_documents(synsets, n_synsets, seed)
    (out_dir / "synsets.jsonl").write_text("".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in synsets), encoding="utf-8")
    (out_dir / "wordnet.jsonl").write_text(
        "".join(json.dumps({"id": s.id, "text": s.text()}, ensure_ascii=False) + "\n" for s in docs), encoding="utf-8"
    )
    files = {"wordnet": file_record(out_dir, out_dir / "wordnet.jsonl"), "synsets": file_record(out_dir, out_dir / "synsets.jsonl")}
    if (out_dir / "COPYRIGHT.wordnet").exists():
        files["copyright"] = file_record(out_dir, out_dir / "COPYRIGHT.wordnet")
    write_manifest(
        out_dir,
        "tasks_source",
        {
            "source": {
                "package": wordnet.PACKAGE,
                "version": info.get("version"),
                "licence": info["licence"],
                "deb": deb_path.name,
                "deb_sha256": deb_sha,
                "data_files_sha256": inputs,
            },
            "command": command_line(),
            "n_synsets_total": len(synsets),
            "n_documents": len(docs),
            "files": files,
        },
    )
    log.info(
        "WordNet %s: %d synsets, %d documents for the memory in %s", info.get("version"), len(synsets), len(docs), out_dir / "wordnet.jsonl"
    )
    return out_dir


def select_documents(synsets: list, n: int, seed: int) -> list:
    """A seeded sample of ``n`` synsets with a plain headword, one per headword, in WordNet order.

    Distractors are drawn from the same lexicographer file, so the sample keeps only
    files with at least 4 such synsets.
    """
    from mlpmem import wordnet

    seen, cand = set(), []
    for s in synsets:
        if wordnet.good_headword(s) and s.lemmas[0] not in seen:
            seen.add(s.lemmas[0])
            cand.append(s)
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(cand)), min(n, len(cand))))
    return [cand[i] for i in picked]


# ---------------------------------------------------------------- metrics (pure functions; the tasks' utils.py calls them)

_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lowercase, punctuation and leading articles removed, spaces collapsed (the answer a person would accept)."""
    t = _PUNCT.sub(" ", text.lower().replace("_", " "))
    t = re.sub(r"^\s*(a|an|the)\s+", " ", t)
    return " ".join(t.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the first line of the generation, normalised, equals any answer, normalised."""
    lines = prediction.strip().splitlines()
    first = normalize(lines[0] if lines else "")
    return float(first in {normalize(a) for a in answers})


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between two texts (multiset overlap of normalised tokens)."""
    from collections import Counter

    p, r = tokens(prediction), tokens(reference)
    if not p or not r:
        return float(p == r)
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(r)
    return 2 * prec * rec / (prec + rec)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of normalised tokens."""
    p, r = tokens(prediction), tokens(reference)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def stem(word: str) -> str:
    """A crude suffix strip, enough to match 'animals' with 'animal' and 'moving' with 'move'."""
    for suf in ("ingly", "edly", "ness", "ing", "ies", "ied", "es", "ed", "ly", "s", "e", "y"):
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            return word[: -len(suf)]
    return word


def content_stems(text: str) -> list[str]:
    """Stems of the content words of a text (letters only, not stopwords, 3+ letters)."""
    return [stem(w) for w in tokens(text) if w.isalpha() and len(w) >= 3 and w not in STOPWORDS]


def unsupported_share(prediction: str, support: set[str]) -> float | None:
    """Share of the generation's content words whose stem is in no gloss of the word (None: no content words)."""
    words = content_stems(prediction.strip().split("\n")[0])
    if not words:
        return None
    return sum(w not in support for w in words) / len(words)


def define_scores(prediction: str, references: list[str], support: list[str]) -> dict[str, float]:
    """Token F1 and ROUGE-L against the best reference definition, the unsupported share, and whether the answer
    held no content word at all (``empty``; its unsupported share counts as 0, so read the two together)."""
    first = (prediction.strip().splitlines() or [""])[0]
    share = unsupported_share(first, set(support))
    return {
        "f1": max(token_f1(first, r) for r in references),
        "rougeL": max(rouge_l(first, r) for r in references),
        "unsupported": 0.0 if share is None else share,
        "empty": float(share is None),
    }


# ---------------------------------------------------------------- step 2: the tasks


@dataclass
class TasksConfig:
    n_items: int = 400  # test items per WordNet task (the define task takes half)
    n_valid: int = 60  # valid items per task, disjoint from test (tunes RAG's k and chunk size)
    n_sotu: int = 1000
    n_reasoning: int = 450
    shots: int = 1  # worked examples in every generation prompt (from synsets outside the memory's text)
    seed: int = 0


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def corpus_hash_of(docs: list[dict]) -> str:
    """The corpus stage's hash of a document list (sha256 over sha256(id NUL text) per document)."""
    import hashlib

    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(f"{d['id']}\0{d['text']}".encode()).digest())
    return h.hexdigest()


def train_documents(corpus_dir: Path, expected_hash: str | None, what: str) -> tuple[list[str], dict]:
    """Ids of the documents wholly inside a corpus folder's train split, and its manifest.

    Refuses a corpus built from another text (``expected_hash``): its train split would
    not be the text the items come from. The last train document is left out (the
    token cap may have cut it).
    """
    from mlpmem.corpus import Corpus
    from mlpmem.manifest import read_json

    corpus = Corpus(Path(corpus_dir))
    if expected_hash is not None and corpus.manifest.get("corpus_hash") != expected_hash:
        raise MlpmemError(
            f"the corpus in {corpus_dir} was built from {corpus.manifest.get('source')!r}, not from {what} (its corpus hash differs)",
            f"pass the corpus folder of the run trained on {what} (RUN/corpus), or build the run again from it",
        )
    docs = read_json(Path(corpus_dir) / "documents.json")["train"]
    return [d["id"] for d in docs[:-1]], corpus.manifest


def _shuffled(items: list, seed: int, salt: str) -> list:
    out = list(items)
    random.Random(f"{seed}:{salt}").shuffle(out)
    return out


def _place(answer, distractors: list, rng: random.Random) -> tuple[list, int]:
    label = rng.randrange(len(distractors) + 1)
    choices = list(distractors)
    choices.insert(label, answer)
    return choices, label


def wordnet_items(synsets: list[dict], train_ids: list[str], cfg: TasksConfig) -> dict[str, tuple[list[dict], list[dict]]]:
    """(test, valid) items of the three WordNet tasks, from the synsets in ``train_ids``."""
    by_id = {s["id"]: s for s in synsets}
    train = [by_id[i] for i in train_ids if i in by_id]
    if len(train) < 8:
        raise MlpmemError(
            f"the corpus's train split holds only {len(train)} WordNet synsets",
            "build the corpus from wordnet.jsonl with more train tokens",
        )
    senses: dict[str, list[dict]] = {}
    for s in synsets:
        for lem in s["lemmas"]:
            senses.setdefault(lem.lower(), []).append(s)
    pool: dict[tuple[str, str], list[dict]] = {}
    for s in train:
        pool.setdefault((s["pos"], s["lexname"]), []).append(s)
    by_pos: dict[str, list[dict]] = {}
    for s in train:
        by_pos.setdefault(s["pos"], []).append(s)
    train_set = {s["id"] for s in train}
    shots = [
        s
        for s in _shuffled([s for s in synsets if s["id"] not in train_set], cfg.seed, "shots")
        if re.fullmatch(r"[a-z]{4,}", s["lemmas"][0]) and 4 <= len(s["definition"].split()) <= 14
    ][: max(cfg.shots, 0)]

    def question(s: dict) -> str:
        return f'Question: Which {s["pos"]} is defined as "{s["definition"]}"?\nAnswer:'

    def define_prompt(s: dict) -> str:
        return f'Define the {s["pos"]} "{s["lemmas"][0]}".\nDefinition:'

    qa_prefix = "".join(f"{question(s)} {s['lemmas'][0]}\n\n" for s in shots)
    def_prefix = "".join(f"{define_prompt(s)} {s['definition']}.\n\n" for s in shots)
    order = _shuffled(train, cfg.seed, "wordnet")
    n_valid = cfg.n_valid
    mc, em, define = [], [], []
    for s in order:
        if len(mc) >= cfg.n_items + n_valid:
            break
        rng = random.Random(f"{cfg.seed}:{s['id']}")
        answer = s["lemmas"][0]
        taken = {lem.lower() for lem in s["lemmas"]}
        same = [d for d in pool[(s["pos"], s["lexname"])] if d["lemmas"][0] not in taken and d["definition"] != s["definition"]]
        if len(same) < 3:
            same += [d for d in by_pos[s["pos"]] if d["lemmas"][0] not in taken and d not in same and d["definition"] != s["definition"]]
        if len(same) < 3:
            continue
        distractors = [d["lemmas"][0] for d in rng.sample(same, 3)]
        choices, label = _place(f" {answer}", [f" {w}" for w in distractors], rng)
        base = {"synset": s["id"], "pos": s["pos"], "lexname": s["lexname"], "query": s["definition"]}
        mc.append({**base, "prompt": question(s), "choices": choices, "label": label, "answers": s["lemmas"]})  # choices show the form
        em.append({**base, "prompt": qa_prefix + question(s), "answers": s["lemmas"]})
        if len(define) < (cfg.n_items + n_valid) // 2 + n_valid:
            word_senses = senses.get(answer, [s])
            support = {stem(answer)} | {x for d in word_senses for lem in d["lemmas"] for x in content_stems(lem)}
            for d in word_senses:
                support |= set(content_stems(d["definition"])) | {x for e in d["examples"] for x in content_stems(e)}
            refs = [s["definition"]] + [d["definition"] for d in word_senses if d["id"] != s["id"]]
            define.append(
                {
                    "synset": s["id"],
                    "pos": s["pos"],
                    "word": answer,
                    "query": answer,
                    "prompt": def_prefix + define_prompt(s),
                    "references": refs,
                    "support": sorted(support),
                }
            )
    if len(mc) < n_valid + 1:
        raise MlpmemError(
            f"only {len(mc)} WordNet items could be built from the train split",
            "use a corpus with more train tokens, or a smaller --n-valid",
        )
    return {
        name: (items[n_valid:], items[:n_valid])
        for name, items in (("mlpmem_wn_mc", mc), ("mlpmem_wn_em", em), ("mlpmem_wn_define", define))
    }


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_NUMBER = re.compile(r"(?<![\w$.,])(\d{1,3}(?:,\d{3})+|\d+)(?![\w,]*\d)")
_NAME = re.compile(r"(?<=[a-z,;] )([A-Z][a-z]{3,})(?=[ ,.;])")


def sotu_items(texts: list[tuple[str, str]], cfg: TasksConfig) -> tuple[list[dict], list[dict]]:
    """(test, valid) fill-in-the-blank facts from State of the Union training speeches [(document id, text)].

    One blank per sentence: a number (a year, a figure) or a capitalised name inside the
    sentence; the 3 distractors are of the same kind, taken from the same speeches (years
    near the answer, figures with as many digits, other names).
    """
    sentences = []
    for doc_id, text in texts:
        for sent in _SENT.split(" ".join(text.split())):
            if 8 <= len(sent.split()) <= 50:
                sentences.append((doc_id, sent))
    numbers, names = set(), set()
    for _, sent in sentences:
        numbers |= set(_NUMBER.findall(sent))
        names |= set(_NAME.findall(sent))
    numbers_by_len: dict[int, list[str]] = {}
    for n in sorted(numbers):
        numbers_by_len.setdefault(len(n), []).append(n)
    names_sorted = sorted(names)
    # first one blank per sentence, then (if more items are wanted) a second one: the first items of the
    # file (what lm-eval's --limit takes) are then independent sentences
    items, wanted = [], cfg.n_sotu + cfg.n_valid
    order = _shuffled(sentences, cfg.seed, "sotu")
    used: list[set] = [set() for _ in order]
    for _ in range(2):
        for i, (doc_id, sent) in enumerate(order):
            if len(items) >= wanted:
                break
            rng = random.Random(f"{cfg.seed}:{doc_id}:{sent}:{len(used[i])}")
            found = [("number", m) for m in _NUMBER.finditer(sent)] + [("name", m) for m in _NAME.finditer(sent)]
            rng.shuffle(found)
            for kind, m in found:
                if m.start(1) in used[i]:
                    continue
                item = _sotu_item(doc_id, sent, kind, m, numbers_by_len, names_sorted, rng)
                if item is not None:
                    items.append(item)
                    used[i].add(m.start(1))
                    break
    test = items[cfg.n_valid :]
    if len(items) < cfg.n_valid + 1:
        raise MlpmemError(f"only {len(items)} State of the Union items could be built", "use a corpus with more train tokens")
    return test, items[: cfg.n_valid]


def _sotu_item(doc_id: str, sent: str, kind: str, m: re.Match, numbers_by_len: dict, names_sorted: list, rng: random.Random) -> dict | None:
    answer = m.group(1)
    if kind == "number":
        if len(answer) == 4 and answer.isdigit() and 1700 <= int(answer) <= 2020:
            cands = [str(int(answer) + d) for d in (-30, -20, -10, -5, -3, -2, -1, 1, 2, 3, 5, 10, 20, 30)]
        else:
            cands = [n for n in numbers_by_len.get(len(answer), []) if n != answer]
    else:
        cands = [n for n in names_sorted if n != answer]
    cands = sorted({c for c in cands if c != answer and c not in sent})
    if len(cands) < 3:
        return None
    choices, label = _place(f" {answer}", [f" {c}" for c in rng.sample(cands, 3)], rng)
    blanked = sent[: m.start(1)] + "___" + sent[m.end(1) :]
    return {
        "document": doc_id,
        "kind": kind,
        "query": blanked.replace("___", " "),
        "answers": [answer],
        "prompt": f'From a State of the Union address: "{blanked}"\nQuestion: What is the missing word or number (___)?\nAnswer:',
        "choices": choices,
        "label": label,
    }


def reasoning_items(cfg: TasksConfig) -> tuple[list[dict], list[dict]]:
    """(test, valid) generated arithmetic, ordering and comparison items (answers in no corpus), a third of each."""
    rng = random.Random(f"{cfg.seed}:reasoning")
    items = []
    total = cfg.n_reasoning + cfg.n_valid
    for i in range(total):
        kind = ("arithmetic", "ordering", "comparison")[i % 3]
        if kind == "arithmetic":
            a, b = rng.randrange(10, 90), rng.randrange(10, 90)
            op = rng.choice("+-")
            ans = a + b if op == "+" else a - b
            wrong = sorted({ans + d for d in (-10, -2, -1, 1, 2, 10)} - {ans})
            choices, label = _place(f" {ans}", [f" {w}" for w in rng.sample(wrong, 3)], rng)
            prompt = f"Question: What is {a} {op} {b}?\nAnswer:"
        elif kind == "ordering":
            nums = rng.sample(range(1, 100), 4)
            which = rng.choice(("largest", "smallest"))
            ans = max(nums) if which == "largest" else min(nums)
            choices = [f" {n}" for n in nums]
            label = nums.index(ans)
            prompt = f"Question: Which is the {which} of {', '.join(map(str, nums))}?\nAnswer:"
        else:
            a, b = rng.sample(range(1, 100), 2)
            word = rng.choice(("greater", "less"))
            truth = a > b if word == "greater" else a < b
            choices, label = [" yes", " no"], 0 if truth else 1
            prompt = f"Question: Is {a} {word} than {b}?\nAnswer:"
        items.append({"kind": kind, "prompt": prompt, "query": prompt, "choices": choices, "label": label})
    items = _shuffled(items, cfg.seed, "reasoning-order")
    return items[cfg.n_valid :], items[: cfg.n_valid]


# ---------------------------------------------------------------- writing the task folder

# the tasks are files, as lm-evaluation-harness keeps them: a YAML body per kind of task and the metrics' utils.py,
# copied into a built task folder beside the items (mlpmem/tasks/knowledge/)
TASK_FILES = Path(__file__).parent / "tasks" / "knowledge"
_MC, _EM, _DEFINE = ((TASK_FILES / f"{kind}.yaml").read_text() for kind in ("multiple_choice", "exact_match", "define"))
BODY = {"mlpmem_wn_mc": _MC, "mlpmem_wn_em": _EM, "mlpmem_wn_define": _DEFINE, "mlpmem_sotu_facts": _MC, "mlpmem_reasoning": _MC}
PRIMARY = {
    "mlpmem_wn_mc": "acc",
    "mlpmem_wn_em": "exact_match",
    "mlpmem_wn_define": "f1",
    "mlpmem_sotu_facts": "acc",
    "mlpmem_reasoning": "acc",
}


def task_yaml(name: str, data: Path) -> str:
    """An lm-eval task over a local jsonl file (``!function`` tags cannot be written by yaml.safe_dump)."""
    return (
        f"# written by `mlpmem tasks build`; see manifest.json for the source and the command\n"
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        f"test_split: test\n{BODY[name.removesuffix('_valid')]}metadata:\n  version: 1.0\n"
    )


def build_tasks(
    source_dir: Path,
    corpus_dir: Path,
    out_dir: Path,
    *,
    sotu_corpus: Path | None = None,
    n_items: int = 400,
    n_valid: int = 60,
    n_sotu: int = 1000,
    n_reasoning: int = 450,
    shots: int = 1,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the knowledge tasks (``<task>.yaml`` + ``<task>.test.jsonl``, ``<task>_valid.yaml`` + ``<task>.valid.jsonl``,
    ``utils.py``, ``manifest.json``) into ``out_dir``. Returns out_dir (skipped when already built with these settings)."""
    from mlpmem.manifest import file_record, prepare_out, read_manifest, sha256_file, write_manifest

    cfg = TasksConfig(n_items, n_valid, n_sotu, n_reasoning, shots, seed)
    if min(n_items, n_sotu, n_reasoning) < 1 or n_valid < 1 or shots < 0:
        raise MlpmemError(f"task sizes must be positive ({asdict(cfg)})", "use e.g. --n-items 400 --n-valid 60")
    source_dir, corpus_dir = Path(source_dir), Path(corpus_dir)
    src = read_manifest(source_dir, "tasks_source")
    wn_docs = _read_jsonl(source_dir / "wordnet.jsonl")
    train_ids, cman = train_documents(corpus_dir, corpus_hash_of(wn_docs), f"{source_dir / 'wordnet.jsonl'}")
    sotu = None
    if sotu_corpus is not None:
        sotu = _sotu_texts(Path(sotu_corpus))
    inputs = {"wordnet.jsonl": sha256_file(source_dir / "wordnet.jsonl"), "synsets.jsonl": sha256_file(source_dir / "synsets.jsonl")}
    resolved = {
        **asdict(cfg),
        "source": str(source_dir.resolve()),
        "corpus": str(corpus_dir.resolve()),
        "sotu_corpus": str(Path(sotu_corpus).resolve()) if sotu_corpus else None,
        "inputs_sha256": inputs,
    }
    out_dir = Path(out_dir)
    if prepare_out(out_dir, resolved, overwrite, kind="tasks") == "done":
        log.info("tasks in %s are up to date", out_dir)
        return out_dir
    synsets = _read_jsonl(source_dir / "synsets.jsonl")
    built = wordnet_items(synsets, train_ids, cfg)
    if sotu is not None:
        built["mlpmem_sotu_facts"] = sotu_items(sotu[0], cfg)
    built["mlpmem_reasoning"] = reasoning_items(cfg)
    shutil.copyfile(TASK_FILES / "utils.py", out_dir / "utils.py")
    files, tasks = {"utils": file_record(out_dir, out_dir / "utils.py")}, {}
    for name, (test, valid) in built.items():
        for split, items in (("test", test), ("valid", valid)):
            data = out_dir / f"{name}.{split}.jsonl"
            data.write_text("".join(json.dumps({"id": i, **it}, ensure_ascii=False) + "\n" for i, it in enumerate(items)), encoding="utf-8")
            task = name if split == "test" else f"{name}_valid"
            (out_dir / f"{task}.yaml").write_text(task_yaml(task, data))
            files[f"{task}.data"] = file_record(out_dir, data)
            files[f"{task}.yaml"] = file_record(out_dir, out_dir / f"{task}.yaml")
        tasks[name] = {
            "n_test": len(test),
            "n_valid": len(valid),
            "metric": PRIMARY[name],
            "chance": _chance(test) if BODY[name] is _MC else None,
        }
    wordnet_split = {**split_fingerprint(corpus_dir), "n_train_documents_used": len(train_ids)}
    write_manifest(
        out_dir,
        "tasks",
        {
            "command": command_line(),
            "config": resolved,
            "source": src["source"],
            "source_manifest_sha256": sha256_file(source_dir / "manifest.json"),
            "inputs_sha256": inputs,
            "wordnet_corpus": wordnet_split,
            "sotu_corpus": sotu[1] if sotu else None,
            "tasks": tasks,
            "files": files,
        },
    )
    log.info("tasks in %s: %s", out_dir, ", ".join(f"{k} ({v['n_test']} + {v['n_valid']} valid)" for k, v in tasks.items()))
    return out_dir


def _chance(items: list[dict]) -> float:
    return sum(1 / len(it["choices"]) for it in items) / len(items)


def _sotu_texts(corpus_dir: Path) -> tuple[list[tuple[str, str]], dict]:
    """[(document id, text)] of a corpus folder's train split (decoded with its tokenizer), and a record of that corpus."""
    import numpy as np

    from mlpmem.corpus import Corpus
    from mlpmem.manifest import read_json
    from mlpmem.models import load_tokenizer

    corpus = Corpus(corpus_dir)  # the texts are decoded as rag.split_texts does, keeping document ids
    tok = load_tokenizer(corpus.model_id)
    tokens, owner = corpus.tokens("train"), corpus.doc_index("train")
    ids = [d["id"] for d in read_json(corpus_dir / "documents.json")["train"]]
    sep = int(corpus.manifest["separator_id"])
    bounds = np.flatnonzero(np.diff(owner)) + 1
    texts = [
        (ids[int(owner[p[0]])], tok.decode([t for t in tokens[p].tolist() if t != sep])) for p in np.split(np.arange(len(tokens)), bounds)
    ]
    record = {**split_fingerprint(corpus_dir), "source": corpus.manifest.get("source"), "n_train_tokens": int(len(tokens))}
    return texts, record


def split_fingerprint(corpus_dir: Path, split: str = "train") -> dict:
    """What identifies a corpus split: the corpus's hash (its documents), the sha256 of the split's document ids
    (the split: seed, fractions, token caps), and the tokenizer."""
    import hashlib

    from mlpmem.corpus import Corpus
    from mlpmem.manifest import read_json

    c = Corpus(Path(corpus_dir))
    ids = [d["id"] for d in read_json(Path(corpus_dir) / "documents.json")[split]]
    return {
        "corpus": str(Path(corpus_dir).resolve()),
        "split": split,
        "corpus_hash": c.manifest.get("corpus_hash"),
        "split_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "model_id": c.model_id,
        "tokenizer_hash": c.tokenizer_hash,
    }


def check_tasks(tasks_dir: Path, corpus_dir: Path | None = None, tokenizer_hash: str | None = None) -> dict:
    """Refuse a task folder built for another corpus split or tokenizer than the one about to be used. Returns its manifest.

    ``corpus_dir``: a corpus the tasks must have been built from (the memory's, or the
    retrieval index's): same documents, same train split, same tokenizer.
    ``tokenizer_hash``: the scoring model's tokenizer.
    """
    from mlpmem.manifest import read_manifest

    m = read_manifest(Path(tasks_dir), "tasks")
    fix = "build the tasks again from this run's corpus: mlpmem tasks build --source SOURCE --corpus RUN/corpus --out NEW_FOLDER"
    built = [b for b in (m.get("wordnet_corpus"), m.get("sotu_corpus")) if b]
    if corpus_dir is not None:
        now = split_fingerprint(Path(corpus_dir))
        same_text = [b for b in built if b["corpus_hash"] == now["corpus_hash"]]
        if not same_text:
            raise MlpmemError(
                f"the tasks in {tasks_dir} were built from {' and '.join(b['corpus'] for b in built)}, "
                f"not from the text of {corpus_dir} (the corpus hashes differ)",
                fix,
            )
        b = same_text[0]
        if b["tokenizer_hash"] != now["tokenizer_hash"]:
            raise MlpmemError(
                f"the tasks in {tasks_dir} were built for the tokenizer of {b['model_id']!r}, "
                f"but {corpus_dir} was tokenized for {now['model_id']!r}",
                fix,
            )
        if b["split_sha256"] != now["split_sha256"]:
            raise MlpmemError(
                f"the tasks in {tasks_dir} were built from another train split of this text than the one in {corpus_dir} "
                "(other seed, fractions or token caps): some items would ask about text the memory never saw",
                fix,
            )
    if tokenizer_hash is not None and built and tokenizer_hash not in {b["tokenizer_hash"] for b in built}:
        raise MlpmemError(
            f"the tasks in {tasks_dir} were built for the tokenizer of {built[0]['model_id']!r}, and the model being scored has another one",
            fix,
        )
    return m
