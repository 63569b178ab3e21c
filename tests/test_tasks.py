"""Knowledge tasks: the WordNet parser on lines in WordNet's data-file format, items from the train split only,
hard distractors, metrics, determinism, and clear errors for a missing package or a task folder of another corpus split."""

from __future__ import annotations

import json
import math

import pytest

from mlpmem import knowledge_tasks as kt
from mlpmem import wordnet
from mlpmem.errors import MlpmemError

# three lines as data.noun writes them (licence header line first), and one adjective with a marker
HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
NOUN = (
    "00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 + 00692347 v 0101 ~ 00023100 n 0000 "
    "~ 00024264 n 0000 ~ 00031264 n 0000 ~ 00031921 n 0000 ~ 00033020 n 0000 ~ 00033615 n 0000 ~ 05810143 n 0000 "
    "~ 07999699 n 0000 | a general concept formed by extracting common features from specific examples  \n"
)
NOUN2 = (
    "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis that has been domesticated "
    'by man since prehistoric times; "the dog barked all night"  \n'
)
ADJ = (
    "00001740 00 a 01 able(p) 0 001 ! 00002098 a 0101 | (usually followed by `to') having the necessary means or skill; "
    '"able to swim"; "she was able to program her computer"  \n'
)


def test_parse_wordnet_lines():
    assert wordnet.parse_line(HEADER) is None
    s = wordnet.parse_line(NOUN)
    assert (s.id, s.pos, s.lexname, s.lemmas) == ("n:00002137", "noun", "noun.Tops", ["abstraction", "abstract entity"])
    assert s.definition == "a general concept formed by extracting common features from specific examples" and s.examples == []
    d = wordnet.parse_line(NOUN2)
    assert d.lexname == "noun.animal" and d.lemmas == ["dog", "domestic dog"]
    assert d.definition.endswith("since prehistoric times") and d.examples == ["the dog barked all night"]
    assert s.pointers == [["hypernym", "n:00001740", 0, 0]]  # derivations (+) and hyponyms (~, the mirror of @) are not kept
    a = wordnet.parse_line(ADJ)
    assert a.pos == "adjective" and a.lemmas == ["able"]  # the (p) marker is not part of the word
    assert a.pointers == [["antonym", "a:00002098", 1, 1]]  # between words: the first of each synset
    assert a.examples == ["able to swim", "she was able to program her computer"] and '"' not in a.definition
    assert d.text() == "dog, domestic dog (noun): a member of the genus Canis that has been domesticated by man since prehistoric times."
    with pytest.raises(ValueError):
        wordnet.parse_line("00002137 03 x 01 thing 0 000 | a gloss\n")  # no such part of speech
    assert wordnet.synset_key("s:00002098") == "a:00002098" == wordnet.synset_key("a:00002098")  # satellites: pointed at as a


def test_bad_data_file_is_a_clear_error(tmp_path):
    f = tmp_path / "data.noun"
    f.write_text(HEADER + "garbage without a gloss bar\n")
    with pytest.raises(MlpmemError, match="WordNet's data-file format"):
        wordnet.parse_data_file(f)


def test_missing_source_package_is_a_clear_error(tmp_path, capsys):
    from helpers import run_cli

    rc, err = run_cli(capsys, "tasks", "source", "--out", tmp_path / "src", "--deb", tmp_path / "nope.deb")
    assert rc == 2 and "does not exist" in err and "apt-get download wordnet-base" in err
    assert not (tmp_path / "src").exists()  # nothing written before the package was found


def test_metrics():
    assert kt.exact_match(" The Cactus.\nmore", ["cactus"]) == 1.0
    assert kt.exact_match(" cacti", ["cactus"]) == 0.0
    assert kt.exact_match(" cactus plant", ["cactus"]) == 0.0  # exact: an answer that merely contains the word is not it
    # the leading article goes: precision 2/2, recall 2/6
    assert kt.token_f1("a succulent plant", "any succulent plant of the family") == pytest.approx(2 * 1 * (2 / 6) / (1 + 2 / 6))
    assert kt.rouge_l("plant succulent", "succulent plant") == pytest.approx(0.5)  # LCS 1 of 2 and 2
    assert kt.rouge_l("x y z", "x y z") == 1.0 and kt.token_f1("", "x") == 0.0
    support = set(kt.content_stems("any succulent plant of arid regions"))
    s = kt.define_scores(" a succulent plant from the moon\n", ["any succulent plant of arid regions"], sorted(support))
    assert s["unsupported"] == pytest.approx(1 / 3)  # succulent, plant supported; moon not
    assert s["right_sense"] == 1.0  # one sense, and the answer shares words with it
    empty = kt.define_scores(" the of\n", ["x y"], [])
    assert empty["empty"] == 1.0 and math.isnan(empty["unsupported"]) and empty["right_sense"] == 0.0  # not "0 unsupported"


def naive_right_sense(prediction: str, glosses: list[str]) -> float:
    """The figure spelt out: per gloss, the F1 of the shared distinct content stems, by loops; right only when strictly best."""
    words = []
    for w in kt.content_stems(prediction):
        if w not in words:
            words.append(w)
    scores = []
    for g in glosses:
        ref = []
        for w in kt.content_stems(g):
            if w not in ref:
                ref.append(w)
        shared = 0
        for w in words:
            if w in ref:
                shared += 1
        scores.append(0.0 if shared == 0 else 2 * (shared / len(words)) * (shared / len(ref)) / (shared / len(words) + shared / len(ref)))
    return 1.0 if all(scores[0] > x for x in scores[1:]) and scores[0] > 0 else 0.0


def test_right_sense_against_a_naive_reference():
    import random

    glosses = ["a domesticated carnivorous mammal", "a dull unattractive unpleasant girl", "metal supports for logs in a fireplace"]
    assert kt.right_sense("a carnivorous mammal kept at home", glosses) == 1.0
    assert kt.right_sense("an unpleasant girl", glosses) == 0.0  # another sense of the word: wrong, however supported
    assert kt.right_sense("a mammal girl", ["a domestic mammal", "a dull girl"]) == 0.0  # a tie is not right
    assert kt.right_sense("", glosses) == 0.0 and kt.right_sense("the of", glosses[:1]) == 0.0  # no content: not right
    assert kt.right_sense("spaceship", glosses[:1]) == 0.0 and kt.right_sense("mammals", glosses[:1]) == 1.0  # one sense
    rng = random.Random(0)
    vocab = "mammal girl metal log fire support dull domestic carnivore home plant ice the of a".split()
    for _ in range(300):
        pred = " ".join(rng.choices(vocab, k=rng.randrange(0, 6)))
        gl = [" ".join(rng.choices(vocab, k=rng.randrange(1, 6))) for _ in range(rng.randrange(1, 4))]
        assert kt.right_sense(pred, gl) == naive_right_sense(pred, gl), (pred, gl)


# ---------------------------------------------------------------- items from a corpus's train split

LEX = ["noun.animal", "noun.plant", "verb.motion"]


def synthetic_synsets(n: int = 60) -> list[dict]:
    words = [
        "alpha",
        "bravo",
        "charlie",
        "delta",
        "echo",
        "foxtrot",
        "golf",
        "hotel",
        "india",
        "juliet",
        "kilo",
        "lima",
        "mike",
        "november",
        "oscar",
        "papa",
        "quebec",
        "romeo",
        "sierra",
        "tango",
        "uniform",
        "victor",
        "whiskey",
        "xray",
        "yankee",
        "zulu",
    ]
    out = []
    for i in range(n):
        lex = LEX[i % 3]
        w = f"{words[i % len(words)]}{'abcdefghij'[i // len(words)]}"
        h = i + 3 if i % 4 == 1 else i + 6
        hyper_word = f"{words[h % len(words)]}{'abcdefghij'[h // len(words)]}"
        pointers = [["hypernym", f"{lex[0]}:{i + 3:08d}", 0, 0]] if i + 3 < n else []
        if lex == "noun.animal" and i + 1 < n:
            pointers.append(["part_of", f"n:{i + 1:08d}", 0, 0])
        if lex == "verb.motion" and i + 6 < n:
            pointers.append(["antonym", f"v:{i + 6:08d}", 1, 1])
        out.append(
            {
                "id": f"{lex[0]}:{i:08d}",
                "pos": "verb" if lex.startswith("verb") else "noun",
                "lexname": lex,
                "lemmas": [w, f"{w} thing", f"{w}ish"],
                # some glosses name the word's hypernym, or its hypernym's, as WordNet's often do ("any succulent plant ...")
                "definition": f"definition number {i} about {lex.split('.')[1]} matters"
                + (f" like {hyper_word}" if i % 2 and i + 6 < n else ""),
                "examples": [f"an example of {w}"],
                "pointers": pointers,
            }
        )
    # a second sense of each of the first 45 words (not in the memory's text), a kind of another word of the same field:
    # that word is right for the question too, so it must never be a distractor
    for i in range(45):
        s = out[i]
        hyper = f"{s['id'][0]}:{(i + 6) % 45:08d}"
        out.append({**s, "id": f"{s['id'][0]}:{100 + i:08d}", "definition": f"sense {i}", "pointers": [["hypernym", hyper, 0, 0]]})
    return out


@pytest.fixture(scope="module")
def wn_run(tiny_llama, tmp_path_factory):
    """A source folder (as `tasks source` writes it, from synthetic synsets) and a corpus built from its wordnet.jsonl."""
    from mlpmem.corpus import CorpusConfig, build_corpus

    root = tmp_path_factory.mktemp("tasks")
    src = root / "source"
    src.mkdir()
    syn = synthetic_synsets()
    (src / "synsets.jsonl").write_text("".join(json.dumps(s) + "\n" for s in syn))
    docs = [{"id": s["id"], "text": wordnet.Synset(**s).text()} for s in syn[:45]]  # 15 synsets stay outside the memory's text
    (src / "wordnet.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    from mlpmem.manifest import write_manifest

    write_manifest(src, "tasks_source", {"source": {"package": "wordnet-base", "version": "test", "licence": "WordNet3.0"}})
    corpus = build_corpus(
        root / "corpus", CorpusConfig(source=str(src / "wordnet.jsonl"), model=str(tiny_llama), valid_fraction=0.2, test_fraction=0.2)
    )
    sotu = root / "sotu.jsonl"
    sotu.write_text("".join(json.dumps({"id": f"{1900 + i}_james_k_polk_d", "text": t}) + "\n" for i, t in enumerate(SOTU_TEXTS)))
    sotu_corpus = build_corpus(root / "sotu", CorpusConfig(source=str(sotu), model=str(tiny_llama)))
    return src, corpus, sotu_corpus


OFFICES = ("Secretary of War", "Secretary of the Navy", "Attorney General", "Postmaster General", "Secretary of the Treasury")
SOTU_TEXTS = [
    f"In {1800 + 7 * i} the Congress of the Union met in Washington again. The treaty with Mexico cost {120 + i} dollars in the end. "
    f"We thank the people of Ohio and Virginia for {i + 3} years of work. Our trade with France and Spain grew by {40 + i} percent this year. "
    f"The report of the {OFFICES[i % 5]} shows that the harbors and forts were repaired. "
    f"The census of {1900 + i if i % 2 else 1790 + i} counted {200 + i} towns in the new states."  # 1900 + i: the speech's year
    for i in range(12)
]


def build(wn_run, out, **kw):
    src, corpus, sotu = wn_run
    return kt.build_tasks(src, corpus, out, sotu_corpus=sotu, **{"n_items": 12, "n_valid": 4, "n_sotu": 20, "n_reasoning": 9, **kw})


def read(folder, name, split="test"):
    return [json.loads(x) for x in (folder / f"{name}.{split}.jsonl").read_text().splitlines()]


def test_wordnet_items_come_from_the_train_split(wn_run, tmp_path):
    src, corpus, _ = wn_run
    out = build(wn_run, tmp_path / "t")
    train = {d["id"] for d in json.loads((corpus / "documents.json").read_text())["train"]}
    syn = {s["id"]: s for s in synthetic_synsets()}
    mc, valid = read(out, "mlpmem_wn_mc"), read(out, "mlpmem_wn_mc", "valid")
    assert mc and valid and not {i["synset"] for i in mc} & {i["synset"] for i in valid}  # disjoint
    train_words = {syn[i]["lemmas"][0] for i in train}
    for it in mc + valid:
        assert it["synset"] in train  # the memory saw this definition
        s = syn[it["synset"]]
        assert it["choices"][it["label"]] == " " + s["lemmas"][0] and len(set(it["choices"])) == 4
        assert f'"{s["definition"]}"' in it["prompt"]
        for j, c in enumerate(it["choices"]):
            if j != it["label"]:  # hard distractors: same part of speech and lexicographer file, also in the training text
                d = next(x for x in syn.values() if x["lemmas"][0] == c.strip())
                assert d["lexname"] == s["lexname"] and c.strip() in train_words
    assert len({it["label"] for it in mc}) > 1
    em = read(out, "mlpmem_wn_em")
    shot = next(s for s in syn.values() if s["definition"] in em[0]["prompt"].split("\n\n")[0])
    assert shot["id"] not in train  # the worked example is not one of the memory's facts
    assert [i["answers"] for i in em] == [i["answers"] for i in mc]
    for it in read(out, "mlpmem_wn_define"):
        assert it["references"][0] == syn[it["synset"]]["definition"] and kt.stem("matters") in it["support"]


def test_tasks_run_in_lm_eval(wn_run, tmp_path):
    """The YAML loads in lm-eval (the !function metrics resolve) and every task has its items."""
    from lm_eval.tasks import TaskManager

    out = build(wn_run, tmp_path / "t")
    tm = TaskManager(include_path=str(out), include_defaults=False)
    objs = tm.load(list(kt.TASKS))
    for name in kt.TASKS:
        task = objs["tasks"][name]
        docs = list(task.test_docs())
        assert len(docs) == json.loads((out / "manifest.json").read_text())["tasks"][name]["n_test"]
        if name == "mlpmem_wn_em":
            assert task.process_results(docs[0], [" " + docs[0]["answers"][0]]) == {"exact_match": 1.0}
            assert task.process_results(docs[0], [" wrong"]) == {"exact_match": 0.0}
        if name == "mlpmem_wn_define":
            got = task.process_results(docs[0], [" " + docs[0]["references"][0]])
            assert got["f1"] == 1.0 and got["right_sense"] == 1.0 and got["unsupported"] == 0.0
            assert math.isnan(task.process_results(docs[0], [" the of"])["unsupported"])
            other = task.process_results(docs[0], [f" {docs[0]['references'][1]} matters"])  # mostly the word's other sense
            assert other["right_sense"] == 0.0 and other["unsupported"] == 0.0  # supported, and still the wrong sense
            assert task.aggregation()["unsupported"]([math.nan, 0.5, 0.0]) == 0.25  # over the answered items: no free zeros


def test_sotu_and_reasoning_items(wn_run, tmp_path):
    out = build(wn_run, tmp_path / "t")
    sotu = read(out, "mlpmem_sotu_facts")
    assert len(sotu) == 20 and {i["kind"] for i in sotu} == {"number", "name"}
    for it in sotu:
        answer = it["answers"][0]
        assert it["choices"][it["label"]] == f" {answer}" and "___" in it["prompt"]
        filled = it["prompt"].split('"')[1].replace("___", answer)
        assert any(filled in t for t in SOTU_TEXTS)  # the blanked fact is a sentence of a training speech
        if it["kind"] == "number":
            assert all(c.strip().replace(",", "").isdigit() for c in it["choices"])
    for it in read(out, "mlpmem_reasoning") + read(out, "mlpmem_reasoning", "valid"):
        a = it["choices"][it["label"]].strip()
        q = it["prompt"]
        if it["kind"] == "arithmetic":
            assert eval(q.split("What is ")[1].split("?")[0]) == int(a)  # noqa: S307 (our own generated text)
        elif it["kind"] == "ordering":
            nums = [int(x) for x in q.split(" of ")[1].split("?")[0].split(", ")]
            assert int(a) == (max(nums) if "largest" in q else min(nums))
        else:
            x, rest = q.split("Is ")[1].split(" ", 1)
            y = int(rest.split("than ")[1].rstrip("?\nAnswer:"))
            assert (a == "yes") == ((int(x) > y) if "greater" in q else (int(x) < y))


def test_deterministic_seeded_and_recorded(wn_run, tmp_path):
    a, b, c = build(wn_run, tmp_path / "a"), build(wn_run, tmp_path / "b"), build(wn_run, tmp_path / "c", seed=1)
    for name in kt.TASKS:
        assert (a / f"{name}.test.jsonl").read_bytes() == (b / f"{name}.test.jsonl").read_bytes()
    assert (a / "mlpmem_wn_mc.test.jsonl").read_bytes() != (c / "mlpmem_wn_mc.test.jsonl").read_bytes()
    m = json.loads((a / "manifest.json").read_text())
    src = wn_run[0]
    from mlpmem.files import sha256_file

    assert m["inputs_sha256"]["wordnet.jsonl"] == sha256_file(src / "wordnet.jsonl")
    assert m["source"]["package"] == "wordnet-base" and m["config"]["seed"] == 0 and m["command"]
    assert m["wordnet_corpus"]["split"] == "train" and m["sotu_corpus"]["split_sha256"]


def test_task_folder_for_another_split_or_corpus_is_refused(wn_run, tiny_llama, tmp_path):
    from mlpmem.corpus import CorpusConfig, build_corpus

    src, corpus, sotu = wn_run
    out = build(wn_run, tmp_path / "t")
    kt.check_tasks(out, corpus)
    kt.check_tasks(out, sotu)  # the State of the Union items came from that one
    other_split = build_corpus(
        tmp_path / "c2",
        CorpusConfig(source=str(src / "wordnet.jsonl"), model=str(tiny_llama), seed=5, valid_fraction=0.2, test_fraction=0.2),
    )
    with pytest.raises(MlpmemError, match="another train split"):
        kt.check_tasks(out, other_split)
    with pytest.raises(MlpmemError, match="tokenizer"):
        kt.check_tasks(out, tokenizer_hash="0000")
    # a corpus of another text cannot be used to build the WordNet tasks either
    with pytest.raises(MlpmemError, match="not from"):
        kt.build_tasks(src, sotu, tmp_path / "bad", n_items=4, n_valid=2, n_sotu=4, n_reasoning=3)


def test_task_folder_for_another_tokenizer_of_the_same_text_is_refused(wn_run, tmp_path):
    """Same documents and split, other tokenizer (as a corpus re-tokenized for another model): refused by the corpus check."""
    src, corpus, _ = wn_run
    out = build(wn_run, tmp_path / "t")
    m = json.loads((out / "manifest.json").read_text())
    m["wordnet_corpus"]["tokenizer_hash"] = "another tokenizer"
    m["wordnet_corpus"]["model_id"] = "another-model"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MlpmemError, match="built for the tokenizer of 'another-model'"):
        kt.check_tasks(out, corpus)


def test_missing_source_folder_or_unbuilt_source_is_a_clear_error(wn_run, tmp_path):
    src, corpus, _ = wn_run
    with pytest.raises(MlpmemError, match="does not exist"):
        kt.build_tasks(tmp_path / "no_source", corpus, tmp_path / "t")
    half = tmp_path / "half"  # wordnet.jsonl there, but `tasks source` never finished
    half.mkdir()
    (half / "wordnet.jsonl").write_text((src / "wordnet.jsonl").read_text())
    with pytest.raises(MlpmemError, match="no finished `tasks_source` stage"):
        kt.build_tasks(half, corpus, tmp_path / "t2")
    assert not (tmp_path / "t").exists() and not (tmp_path / "t2").exists()  # nothing claimed before the inputs were checked


def naive_right_answers(word: str, chain: list[str], synsets: list[dict]) -> set[str]:
    """Every word a chain of relations leads to from any sense of ``word`` (synonym: the words of the same synset)."""
    by_id = {x["id"]: x for x in synsets}
    at = [x for x in synsets if word in x["lemmas"]]
    for relation in chain:
        at = [x for x in at] if relation == "synonym" else [by_id[p[1]] for x in at for p in x["pointers"] if p[0] == relation]
    return {w for x in at for w in x["lemmas"]} - {word}


def test_relation_and_two_hop_items_ask_what_the_memory_read_in_other_words(wn_run, tmp_path):
    import re

    src, corpus, _ = wn_run
    out = build(wn_run, tmp_path / "t", n_items=40)  # every synset of the train split is asked about
    train = {d["id"] for d in json.loads((corpus / "documents.json").read_text())["train"]}
    syn = synthetic_synsets()
    by_id = {s["id"]: s for s in syn}
    docs = {i: set(re.findall(r"[a-z]+", wordnet.Synset(**by_id[i]).text().lower())) for i in train}  # the words of each
    seen = set().union(*docs.values())
    heads = {(by_id[i]["pos"], by_id[i]["lexname"], by_id[i]["lemmas"][0]) for i in train}
    for name in ("mlpmem_wn_relations", "mlpmem_wn_multihop"):
        test, valid = read(out, name), read(out, name, "valid")
        assert test and valid and not {i["synset"] for i in test} & {i["synset"] for i in valid}  # disjoint
        for it in test + valid:
            s, answer = by_id[it["synset"]], it["answers"][0]
            word, chain = s["lemmas"][0], it["relation"].split("+")
            assert it["synset"] in train and answer in seen  # about a fact of the memory's text, answered by a word it read
            assert s["definition"] not in it["prompt"] and answer not in it["prompt"]  # not a lookup of the document
            assert it["choices"][it["label"]] == f" {answer}" and len(set(it["choices"])) == 4
            right = naive_right_answers(word, chain, syn)
            assert answer in right
            if len(chain) == 2:
                assert it["via_synset"] in train  # the second fact is a document of the memory's text too
                assert answer not in docs[it["synset"]]  # one document does not give the answer
                right |= naive_right_answers(word, chain[:1], syn)
                if chain[1] == "synonym":  # "another name for that something": not the name that one hop gives
                    assert answer != by_id[it["via_synset"]]["lemmas"][0]
            target = by_id[it["answer_synset"]]
            for j, c in enumerate(it["choices"]):
                if j != it["label"]:  # wrong for every sense of the word; a headword of the answer's field in the memory's text
                    assert c.strip() not in right | {word} and (target["pos"], target["lexname"], c.strip()) in heads
    kinds = {i["relation"] for i in read(out, "mlpmem_wn_relations") + read(out, "mlpmem_wn_relations", "valid")}
    assert {"synonym", "hypernym", "part_of", "antonym"} <= kinds
    assert {"hypernym+synonym", "hypernym+hypernym"} & {i["relation"] for i in read(out, "mlpmem_wn_multihop")}


def test_a_source_without_relations_builds_the_other_tasks_and_says_why_not_these(wn_run, tmp_path):
    src, corpus, _ = wn_run
    old = tmp_path / "old"  # as `tasks source` wrote it before relations were kept
    old.mkdir()
    for f in ("wordnet.jsonl", "manifest.json"):
        (old / f).write_bytes((src / f).read_bytes())
    (old / "synsets.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in s.items() if k != "pointers"}) + "\n" for s in synthetic_synsets())
    )
    out = build((old, corpus, wn_run[2]), tmp_path / "t")
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["not_built"]) == {"mlpmem_wn_relations", "mlpmem_wn_multihop"} and set(m["tasks"]) == set(kt.TASKS) - set(m["not_built"])
    assert all("holds no WordNet relations" in why and "mlpmem tasks source" in why for why in m["not_built"].values())
    assert not (out / "mlpmem_wn_relations.test.jsonl").exists() and (out / "mlpmem_wn_mc.test.jsonl").exists()


def longest_common_run(a: str, b: str) -> int:
    """The most words in a row (normalised) that two texts share."""
    x, y, best = kt.tokens(a), kt.tokens(b), 0
    for i in range(len(x)):
        for j in range(len(y)):
            n = 0
            while i + n < len(x) and j + n < len(y) and x[i + n] == y[j + n]:
                n += 1
            best = max(best, n)
    return best


def test_sotu_role_items_ask_by_role_not_in_the_speech_s_words(wn_run, tmp_path):
    import re

    out = build(wn_run, tmp_path / "t")
    items = read(out, "mlpmem_sotu_roles") + read(out, "mlpmem_sotu_roles", "valid")
    assert {i["kind"] for i in items} == {"count", "percent", "year", "office"}
    assert not {i["sentence"] for i in read(out, "mlpmem_sotu_roles")} & {i["sentence"] for i in read(out, "mlpmem_sotu_roles", "valid")}
    for it in items:
        answer, prompt = it["answers"][0], it["prompt"]
        text = SOTU_TEXTS[int(it["document"][:4]) - 1900]
        assert it["sentence"] in text and answer in it["sentence"]  # a fact of that training speech
        assert prompt.startswith(f"In his {it['document'][:4]} State of the Union address, James K. Polk spoke of ")
        assert answer not in prompt and it["sentence"] not in prompt
        # the sentence's wording is not the question's: only the role ("years of work") is taken over
        after_intro = prompt.split(" spoke of ", 1)[1]  # the intro's template ("of the Union") is no copy
        assert longest_common_run(after_intro, it["sentence"]) <= max(len(it["role"].split()), 2), prompt
        assert it["choices"][it["label"]] == f" {answer}" and len(set(it["choices"])) == 4
        for c in it["choices"]:
            if it["kind"] == "office":
                assert c.strip() in OFFICES
            else:
                assert c.strip().replace(",", "").isdigit() and len(c.strip()) == len(answer)
                assert c.strip() not in it["sentence"] or c.strip() == answer
    assert all(it["kind"] == "year" for it in items if kt.is_year(it["answers"][0]))  # "1790 counted ..." is a year
    roles = {i["role"] for i in items}
    assert {"dollars", "years of work", "percent", "year", "office"} <= roles and not any(re.search(r"\d", r) for r in roles)
