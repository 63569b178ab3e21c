"""Knowledge tasks for lm-evaluation-harness, built from public data shipped by package registries.

Two steps (``mlpmem tasks source`` and ``mlpmem tasks build``), because the items must
come from text the memory trained on, and which documents that is depends on the
corpus stage's split:

1. :func:`build_source` unpacks WordNet (Debian ``wordnet-base``) and writes
   ``wordnet.jsonl``, the memory's text (one document per synset, ``"word, synonym
   (noun): definition."``, a seeded sample of synsets with a plain headword), and
   ``synsets.jsonl`` (every synset: all glosses of every word, for distractors and for
   the hallucination figure, and its relations: hypernyms, antonyms, part-whole). Train a memory on it with ``mlpmem run`` (recipe
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
     found in no gloss of any sense of X (the HaluEval analogue; lower is better; over
     the answers that hold a content word, with ``empty``, the share that hold none, beside
     it) and ``right_sense``, the share of definitions closer to the asked sense's gloss
     than to any other sense's;
   - ``mlpmem_wn_relations``: questions about a word's relations (another word of its
     synset, its opposite, what it is a kind, instance, part, member or substance of),
     whose wording is not the memory's text, 4 choices;
   - ``mlpmem_wn_multihop``: two relations chained through a second synset of the
     memory's text ("X is a kind of something. What is another name for that
     something?"), the answer not in X's own document, 4 choices;
   - ``mlpmem_sotu_facts`` (with ``--sotu-corpus``): a sentence of a training speech
     with a number or capitalised name blanked out, 4 choices of the same kind;
   - ``mlpmem_sotu_roles`` (with ``--sotu-corpus``): a number, year or office of a
     training sentence asked for by its role, with the speech and the sentence's topic
     words around it, not its wording, 4 choices of the same kind;
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

TASKS = (
    "mlpmem_wn_mc",
    "mlpmem_wn_em",
    "mlpmem_wn_define",
    "mlpmem_wn_relations",
    "mlpmem_wn_multihop",
    "mlpmem_sotu_facts",
    "mlpmem_sotu_roles",
    "mlpmem_reasoning",
)
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
    from mlpmem.files import file_record, sha256_file
    from mlpmem.folders import prepare_out
    from mlpmem.manifest import write_manifest

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


def sense_overlaps(prediction: str, glosses: list[str]) -> list[float]:
    """F1 between the sets of content-word stems of the prediction and of each gloss (0 when either has none)."""
    p = set(content_stems(prediction))
    out = []
    for g in glosses:
        r = set(content_stems(g))
        same = len(p & r)
        out.append(0.0 if same == 0 else 2 * same / (len(p) + len(r)))
    return out


def right_sense(prediction: str, glosses: list[str]) -> float:
    """1.0 when the prediction's content words match ``glosses[0]`` (the right sense) better than every other gloss
    of the same word, else 0.0: a tie (also 0 against 0, as for an empty answer) is not a right answer.

    A fluent definition of another sense has few ``unsupported`` words (its support is every gloss of the word);
    here it counts as wrong.
    """
    scores = sense_overlaps(prediction, glosses)
    return float(scores[0] > max(scores[1:], default=0.0))


def define_scores(prediction: str, references: list[str], support: list[str]) -> dict[str, float]:
    """Token F1 and ROUGE-L against the best reference definition; ``unsupported``, the share of content words found
    in no gloss of the word (NaN for an answer with no content word: lm-eval's ``nanmean`` averages it over the
    answered items only, where a 0 would reward saying nothing);
    ``empty``, whether the answer held no content word; ``right_sense`` (see :func:`right_sense`; references[0] is
    the asked sense's gloss, the others the word's other senses)."""
    first = (prediction.strip().splitlines() or [""])[0]
    share = unsupported_share(first, set(support))
    return {
        "f1": max(token_f1(first, r) for r in references),
        "rougeL": max(rouge_l(first, r) for r in references),
        "unsupported": float("nan") if share is None else share,
        "empty": float(share is None),
        "right_sense": right_sense(first, references),
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
    from mlpmem.files import read_json

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


# ---------------------------------------------------------------- WordNet questions that are not lookups

# one-hop questions by relation and part of speech ("" for any); the answer is a word the relation leads to
ONE_HOP = {
    ("synonym", ""): 'Which other word means the same as the {pos} "{w}"?',
    ("antonym", ""): 'Which word means the opposite of the {pos} "{w}"?',
    ("hypernym", "noun"): 'The noun "{w}" names a kind of what?',
    ("hypernym", "verb"): 'To "{w}" is a particular way to do what?',
    ("instance_hypernym", ""): '"{w}" is an instance of what?',
    ("part_of", ""): '"{w}" is a part of what?',
    ("member_of", ""): '"{w}" is a member of what?',
    ("substance_of", ""): 'What is "{w}" one of the substances of?',
}
# two hops: the first names an unnamed "something" (which must be a synset of the memory's text), the second asks about it
FIRST_HOP = {
    ("hypernym", "noun"): 'The noun "{w}" names a kind of something.',
    ("hypernym", "verb"): 'To "{w}" is a particular way to do something.',
    ("instance_hypernym", ""): '"{w}" is an instance of something.',
    ("part_of", ""): '"{w}" is a part of something.',
    ("member_of", ""): '"{w}" is a member of something.',
}
SECOND_HOP = {
    ("synonym", ""): "What is another name for that something?",
    ("hypernym", "noun"): "That something is a kind of what?",
    ("hypernym", "verb"): "That something is a particular way to do what?",
}
_PLAIN = re.compile(r"[a-z]{3,}")


def _template(table: dict, relation: str, pos: str) -> str | None:
    return table.get((relation, pos), table.get((relation, "")))


def hop(start: list[tuple[dict, int]], relation: str, by_key: dict[str, dict]) -> list[tuple[dict, int]]:
    """Where ``relation`` leads from (synset, word number) pairs: (synset, word number) pairs, word 0 meaning any word
    of the synset. ``synonym`` stays in the synset; the others follow its pointers from the word or the whole synset."""
    from mlpmem.wordnet import synset_key

    out = []
    for s, i in start:
        if relation == "synonym":
            out += [(s, j) for j in range(1, len(s["lemmas"]) + 1) if j != i] if i else [(s, 0)]
            continue
        for rel, target, src, dst in s.get("pointers", []):
            if rel == relation and src in (0, i) and synset_key(target) in by_key:
                out.append((by_key[synset_key(target)], dst))
    return out


def hop_words(pairs: list[tuple[dict, int]]) -> list[str]:
    """The words (lowercase, in order, once each) of (synset, word number) pairs; word 0 is every word of the synset."""
    words = [w.lower() for s, j in pairs for w in (s["lemmas"] if j == 0 else s["lemmas"][j - 1 : j])]
    return list(dict.fromkeys(words))


def word_senses(word: str, senses: dict[str, list[dict]]) -> list[tuple[dict, int]]:
    """Every (synset, word number) of ``word``: all its senses, so an answer right for another sense is no distractor."""
    return [(s, j + 1) for s in senses.get(word, []) for j, lem in enumerate(s["lemmas"]) if lem.lower() == word]


RELATION_TASKS = ("mlpmem_wn_relations", "mlpmem_wn_multihop")


def relation_items(synsets: list[dict], train_ids: list[str], cfg: TasksConfig, name: str) -> tuple[list[dict], list[dict]]:
    """(test, valid) items of one of the WordNet tasks whose wording is not the memory's text (``name``), about synsets
    in ``train_ids``:

    - ``mlpmem_wn_relations``: one relation of a word (another word of its synset, its opposite, what it is a kind,
      instance, part, member or substance of), asked by the word;
    - ``mlpmem_wn_multihop``: two relations chained through a synset that is itself a document of the memory's text
      ("X is a kind of something; which other word means that something?"), whose answer is not in X's document.

    Every answer is a plain word of the memory's training text. The 3 distractors are headwords of training documents
    of the answer's part of speech and lexicographer file that are right for no sense of the word. Each subject synset
    is asked about once in a task; relations take turns (the one with fewest items first), so rare ones are represented.
    """
    from mlpmem.wordnet import Synset, synset_key

    if synsets and "pointers" not in synsets[0]:
        raise MlpmemError(
            "synsets.jsonl holds no WordNet relations (it was written by an mlpmem that did not keep pointers)",
            "write the source again: mlpmem tasks source --out SOURCE --overwrite (wordnet.jsonl stays the same, so runs stay valid)",
        )
    by_key = {synset_key(s["id"]): s for s in synsets}
    by_id = {s["id"]: s for s in synsets}
    train = [by_id[i] for i in train_ids if i in by_id]
    train_keys = {synset_key(s["id"]) for s in train}
    docs = {s["id"]: Synset(**s).text().lower() for s in train}
    seen = {w for text in docs.values() for w in re.findall(r"[a-z]+", text)}  # the memory's vocabulary
    senses: dict[str, list[dict]] = {}
    for s in synsets:
        for lem in s["lemmas"]:
            senses.setdefault(lem.lower(), []).append(s)
    pool: dict[tuple[str, str], list[str]] = {}
    for s in train:
        if _PLAIN.fullmatch(s["lemmas"][0]):
            pool.setdefault((s["pos"], s["lexname"]), []).append(s["lemmas"][0])
    by_pos: dict[str, list[str]] = {}
    for (pos, _), words in sorted(pool.items()):
        by_pos.setdefault(pos, []).extend(words)

    def usable(word: str, subject: dict, relation: str = "") -> bool:
        """A plain word of the memory's text that is not the subject itself (nor, but for synonyms, one of its words)."""
        own = subject["lemmas"][:1] if relation == "synonym" else subject["lemmas"]
        return bool(_PLAIN.fullmatch(word)) and word in seen and word not in {lem.lower() for lem in own}

    def choose(word: str, answer: str, answer_synset: dict, wrong: set[str], rng: random.Random) -> tuple[list, int] | None:
        cands = [w for w in pool.get((answer_synset["pos"], answer_synset["lexname"]), []) if w not in wrong]
        if len(cands) < 3:
            cands += [w for w in by_pos.get(answer_synset["pos"], []) if w not in wrong and w not in cands]
        if len(set(cands)) < 3:
            return None
        return _place(f" {answer}", [f" {w}" for w in rng.sample(sorted(set(cands)), 3)], rng)

    def one_hop(s: dict, relation: str, rng: random.Random) -> dict | None:
        word, text = s["lemmas"][0], _template(ONE_HOP, relation, s["pos"])
        if text is None:
            return None
        found = hop([(s, 1)], relation, by_key)
        answer = next(((t, w) for t, j in found for w in hop_words([(t, j)]) if usable(w, s, relation)), None)
        if answer is None:
            return None
        right = set(hop_words(hop(word_senses(word, senses), relation, by_key))) | {word}
        placed = choose(word, answer[1], answer[0], right, rng)
        if placed is None:
            return None
        question = text.format(w=word, pos=s["pos"])
        return {
            "synset": s["id"],
            "relation": relation,
            "answer_synset": answer[0]["id"],
            "answer_in_subject_document": answer[1] in re.findall(r"[a-z]+", docs[s["id"]]),
            "query": question,
            "prompt": f"Question: {question}\nAnswer:",
            "choices": placed[0],
            "label": placed[1],
            "answers": [answer[1]],
        }

    def two_hop(s: dict, chain: tuple[str, str], rng: random.Random) -> dict | None:
        word = s["lemmas"][0]
        first, second = _template(FIRST_HOP, chain[0], s["pos"]), _template(SECOND_HOP, chain[1], s["pos"])
        if first is None or second is None:
            return None
        for mid, j in hop([(s, 1)], chain[0], by_key):
            if synset_key(mid["id"]) not in train_keys:  # the second fact must be a document of the memory's text
                continue
            # "another name for that something": not the word that names it (the one-hop answer)
            for t, k in hop([(mid, j or 1) if chain[1] == "synonym" else (mid, j)], chain[1], by_key):
                # the answer is not in the subject's own document: one document cannot give it
                answer = next((w for w in hop_words([(t, k)]) if usable(w, s) and w not in re.findall(r"[a-z]+", docs[s["id"]])), None)
                if answer is None:
                    continue
                right = set(hop_words(hop(hop(word_senses(word, senses), chain[0], by_key), chain[1], by_key)))
                right |= set(hop_words(hop(word_senses(word, senses), chain[0], by_key))) | {word}
                placed = choose(word, answer, t, right, rng)
                if placed is None:
                    return None
                question = f"{first.format(w=word)} {second}"
                return {
                    "synset": s["id"],
                    "relation": "+".join(chain),
                    "via_synset": mid["id"],
                    "answer_synset": t["id"],
                    "query": question,
                    "prompt": f"Question: {question}\nAnswer:",
                    "choices": placed[0],
                    "label": placed[1],
                    "answers": [answer],
                }
        return None

    if name == "mlpmem_wn_relations":
        kinds, make = list(dict.fromkeys(r for r, _ in ONE_HOP)), one_hop
    else:
        kinds, make = list(dict.fromkeys((a, b) for a, _ in FIRST_HOP for b, _ in SECOND_HOP)), two_hop
    items: list[dict] = []
    count = dict.fromkeys(kinds, 0)
    for s in _shuffled(train, cfg.seed, name):
        if len(items) >= cfg.n_items + cfg.n_valid:
            break
        if not _PLAIN.fullmatch(s["lemmas"][0]):
            continue
        rng = random.Random(f"{cfg.seed}:{name}:{s['id']}")
        for kind in sorted(kinds, key=lambda k: (count[k], kinds.index(k))):  # the kind with fewest items first
            item = make(s, kind, rng)
            if item is not None:
                items.append(item)
                count[kind] += 1
                break
    if len(items) < 2:
        raise MlpmemError(
            f"only {len(items)} items of {name} could be built from the train split",
            "use a corpus with more train tokens (more WordNet documents: mlpmem tasks source --n-synsets)",
        )
    # two hops need both synsets in the memory's text, which a small sample rarely holds: valid takes at most a quarter
    n_valid = min(cfg.n_valid, len(items) // 4) or 1
    return items[n_valid:], items[:n_valid]


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_NUMBER = re.compile(r"(?<![\w$.,])(\d{1,3}(?:,\d{3})+|\d+)(?![\w,]*\d)")
_NAME = re.compile(r"(?<=[a-z,;] )([A-Z][a-z]{3,})(?=[ ,.;])")


def sotu_items(texts: list[tuple[str, str]], cfg: TasksConfig) -> tuple[list[dict], list[dict]]:
    """(test, valid) fill-in-the-blank facts from State of the Union training speeches [(document id, text)].

    One blank per sentence: a number (a year, a figure) or a capitalised name inside the
    sentence; the 3 distractors are of the same kind, taken from the same speeches (years
    near the answer, figures with as many digits, other names).
    """
    sentences = sotu_sentences(texts)
    numbers_by_len = _numbers_by_len(sentences)
    names_sorted = sorted({n for _, sent in sentences for n in _NAME.findall(sent)})
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


def sotu_sentences(texts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """[(document id, sentence)] of the speeches, sentences of 8 to 50 words."""
    return [(doc_id, sent) for doc_id, text in texts for sent in _SENT.split(" ".join(text.split())) if 8 <= len(sent.split()) <= 50]


def _numbers_by_len(sentences: list[tuple[str, str]]) -> dict[int, list[str]]:
    """Every number written in the sentences, by its length in characters (distractors look like the answer)."""
    out: dict[int, list[str]] = {}
    for n in sorted({n for _, sent in sentences for n in _NUMBER.findall(sent)}):
        out.setdefault(len(n), []).append(n)
    return out


def is_year(answer: str) -> bool:
    return len(answer) == 4 and answer.isdigit() and 1700 <= int(answer) <= 2020


def same_kind(answer: str, kind: str, sent: str, numbers_by_len: dict[int, list[str]], others: list[str]) -> list[str]:
    """Distractors of the answer's kind that its sentence does not hold: years near a year, numbers of as many
    characters for another number, ``others`` (names, offices) for the rest; sorted."""
    if kind == "number":
        if is_year(answer):
            cands = [str(int(answer) + d) for d in (-30, -20, -10, -5, -3, -2, -1, 1, 2, 3, 5, 10, 20, 30)]
        else:
            cands = [n for n in numbers_by_len.get(len(answer), []) if n != answer]
    else:
        cands = [n for n in others if n != answer]
    return sorted({c for c in cands if c != answer and c not in sent})


def _sotu_item(doc_id: str, sent: str, kind: str, m: re.Match, numbers_by_len: dict, names_sorted: list, rng: random.Random) -> dict | None:
    answer = m.group(1)
    cands = same_kind(answer, kind, sent, numbers_by_len, names_sorted)
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


# a number and the words after it, in which count_role finds what it counts
_COUNT = re.compile(r"(?<![\w$.,])(\d{1,3}(?:,\d{3})+|\d+)((?: [a-z]+){1,6})")
_MULTIPLIER = ("million", "billion", "thousand", "hundred")
_OFFICE = re.compile(
    r"\b((?:Secretary|Commissioner|Department|Director|Bureau) of (?:the )?[A-Z][a-z]+"
    r"(?: (?:Affairs|Engineers|Security|Services|Development|Education|Justice|Commerce|Labor))?|"
    r"Attorney[- ]General|Postmaster[- ]General|Chief Justice|Surgeon General|Vice President)\b"
)
# words that open a sentence or fill it, and say nothing of its topic
_FILLER = frozenset(
    "since within while whether upon during among tonight today last next first year years shall still already nearly".split()
)
_SPEECH = re.compile(r"(\d{4})_([a-z_]+)_[a-z]+")  # the corpus's document ids: 1823_james_monroe_dr
ROLE_QUESTION = {
    "count": "What number of {role} did he give?",
    "percent": "What percentage did he give?",
    "year": "Which year did he name?",
    "office": "Which office or department did he name?",
}


def speech_intro(doc_id: str) -> str:
    """ "In his 1823 State of the Union address, James Monroe" from a document id (a plain phrase for other ids)."""
    m = _SPEECH.fullmatch(doc_id)
    if m is None:
        return "In a State of the Union address, the President"
    name = " ".join(w.capitalize() + ("." if len(w) == 1 else "") for w in m.group(2).split("_"))
    return f"In his {m.group(1)} State of the Union address, {name}"


def keywords(sent: str, leave_out: str, n: int = 6) -> list[str]:
    """Up to ``n`` content words of a sentence in its order (4+ letters, once each), none of them a word of ``leave_out``:
    the sentence's topic, without its wording."""
    drop = {w.lower() for w in re.findall(r"[A-Za-z]+", leave_out)}
    out = []
    for w in re.findall(r"[A-Za-z]+(?:'[a-z]+)?", sent):
        base = w.split("'")[0].lower()
        if len(w) >= 4 and base not in STOPWORDS and base not in _FILLER and base not in drop and w not in out:
            out.append(w)
    return out[:n]


def count_role(words: list[str]) -> str | None:
    """What a number counts, from the lowercase words after it: [multiplier] noun [noun] [of [the] noun [noun]]
    ("million acres of roadless lands", "community police", "per cent"); None when the next word is no noun."""
    if words[:2] == ["per", "cent"]:
        return "per cent"

    def noun(w: str) -> bool:
        return len(w) >= 3 and w not in STOPWORDS

    i = 1 if words and words[0] in _MULTIPLIER else 0
    if i >= len(words) or not noun(words[i]):
        return None
    end = i + 1 + (i + 1 < len(words) and noun(words[i + 1]))
    if end < len(words) and words[end] == "of":
        j = end + 1 + (end + 1 < len(words) and words[end + 1] == "the")
        if j < len(words) and noun(words[j]):
            end = j + 1 + (j + 1 < len(words) and noun(words[j + 1]))
    return " ".join(words[:end])


def role_spans(sent: str) -> list[tuple[str, str, str]]:
    """(kind, answer, role) of what a sentence gives by its role: a number of something (``count``, ``percent``),
    a year, an office."""
    out = []
    for m in _COUNT.finditer(sent):
        role = None if is_year(m.group(1)) else count_role(m.group(2).split())  # "in 1822 the ..." is a year
        if role is not None:
            out.append(("percent" if role.startswith(("percent", "per cent")) else "count", m.group(1), role))
    out += [("year", m.group(1), "year") for m in _NUMBER.finditer(sent) if is_year(m.group(1))]
    out += [("office", m.group(1), "office") for m in _OFFICE.finditer(sent)]
    return out


def sotu_role_items(texts: list[tuple[str, str]], cfg: TasksConfig) -> tuple[list[dict], list[dict]]:
    """(test, valid) State of the Union facts asked by their role, not in the speech's words: a number by what it
    counts, a year, an office, with the speech's year, speaker and the sentence's topic words around it::

        In his 1823 State of the Union address, James Monroe spoke of established, mail, transported and contracts.
        Question: What number of miles of post roads did he give?

    One item per sentence, the kind with fewest items first; 4 choices of the same kind as ``mlpmem_sotu_facts``'s
    (figures with as many characters, years near the answer, other offices named in the speeches).
    """
    sentences = sotu_sentences(texts)
    numbers_by_len = _numbers_by_len(sentences)
    offices = sorted({m for _, sent in sentences for m in _OFFICE.findall(sent)})
    items: list[dict] = []
    count = dict.fromkeys(ROLE_QUESTION, 0)
    for doc_id, sent in _shuffled(sentences, cfg.seed, "sotu-roles"):
        if len(items) >= cfg.n_sotu + cfg.n_valid:
            break
        rng = random.Random(f"{cfg.seed}:roles:{doc_id}:{sent}")
        spans = role_spans(sent)
        rng.shuffle(spans)
        spans.sort(key=lambda sp: count[sp[0]])  # stable: the rarest kind first, in shuffled order within a kind
        for kind, answer, role in spans:
            cands = same_kind(answer, "office" if kind == "office" else "number", sent, numbers_by_len, offices)
            topic = keywords(sent, f"{answer} {role}")
            if len(cands) < 3 or len(topic) < 2:
                continue
            choices, label = _place(f" {answer}", [f" {c}" for c in rng.sample(cands, 3)], rng)
            context = f"{speech_intro(doc_id)} spoke of {', '.join(topic[:-1])} and {topic[-1]}."
            question = ROLE_QUESTION[kind].format(role=role)
            if answer in context:  # the speech's own year, say: the question would give the answer
                continue
            items.append(
                {
                    "document": doc_id,
                    "kind": kind,
                    "role": role,
                    "sentence": sent,  # the training sentence the fact comes from (not shown to the model)
                    "query": f"{context} {question}",
                    "answers": [answer],
                    "prompt": f"{context}\nQuestion: {question}\nAnswer:",
                    "choices": choices,
                    "label": label,
                }
            )
            count[kind] += 1
            break
    if len(items) < 2:
        raise MlpmemError(f"only {len(items)} State of the Union role items could be built", "use a corpus with more train tokens")
    n_valid = min(cfg.n_valid, len(items) // 4) or 1
    return items[n_valid:], items[:n_valid]


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
BODY = {
    "mlpmem_wn_mc": _MC,
    "mlpmem_wn_em": _EM,
    "mlpmem_wn_define": _DEFINE,
    "mlpmem_wn_relations": _MC,
    "mlpmem_wn_multihop": _MC,
    "mlpmem_sotu_facts": _MC,
    "mlpmem_sotu_roles": _MC,
    "mlpmem_reasoning": _MC,
}
PRIMARY = {name: {_EM: "exact_match", _DEFINE: "f1"}.get(body, "acc") for name, body in BODY.items()}


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
    from mlpmem.files import file_record, sha256_file
    from mlpmem.folders import prepare_out
    from mlpmem.manifest import read_manifest, write_manifest

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
    # the tasks in other words need relations (a source written by this version) and enough related facts in the
    # memory's text; one that cannot be built is left out with its reason in the manifest, and the others are built
    not_built: dict[str, str] = {}
    makers = {name: (lambda name=name: relation_items(synsets, train_ids, cfg, name)) for name in RELATION_TASKS}
    if sotu is not None:
        built["mlpmem_sotu_facts"] = sotu_items(sotu[0], cfg)
        makers["mlpmem_sotu_roles"] = lambda: sotu_role_items(sotu[0], cfg)
    for name, make in makers.items():
        try:
            built[name] = make()
        except MlpmemError as e:
            not_built[name] = str(e)
            log.warning("%s is not built: %s", name, e)
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
            "not_built": not_built,
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
    from mlpmem.files import read_json
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
    from mlpmem.files import read_json

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
