"""A tiny offline world for smoke runs of every benchmark (``bench/reproduce.py --quick``; not a measurement).

    python bench/quick_world.py --out DIR

Writes into DIR, in seconds:

- ``cache/models/smollm2-135m``: a random 2-layer Llama (the test suite's, tests/helpers.py) saved where
  mlpmem keeps the converted default model, so that with ``MLPMEM_CACHE=DIR/cache`` every ``smollm2-135m``
  a bench script or recipe names loads it instead (windows of 512 need more positions than the tests' 256);
- ``models/gemma``: a second tiny Llama whose tokenizer has a <bos>, bench_decoder.py's ``--gguf`` stand-in;
- ``runs/data/gcide.jsonl``: dictionary-like entries standing in for GCIDE (bench/gcide.py needs apt-get);
- ``runs/knowledge/wordnet``: a ``mlpmem tasks source`` folder of synthetic synsets (the real one unpacks
  the Debian package wordnet-base).

Numbers measured in this world say nothing; it exists so that every script runs end to end.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POSITIONS = 4096  # windows of 512 (+ a <bos>) in every bench script
LEX = ("noun.animal", "noun.plant", "verb.motion", "noun.artifact")


def tiny_model(folder: Path, bos: bool = False) -> Path:
    """The test suite's tiny Llama (hidden size 32, 2 layers) in ``folder``, with positions for 512-token windows."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import save_tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    if bos:
        tok.bos_token = tok.eos_token
    save_tiny_model("llama", folder, tok)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = POSITIONS
    if bos:
        cfg["bos_token_id"] = tok.bos_token_id
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def words(rng: random.Random, n: int) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import WORDS

    return " ".join(rng.choice(WORDS) for _ in range(n))


def gcide_jsonl(path: Path, n: int = 400) -> Path:
    rng = random.Random(1)
    entries = [f"Word{i} (n.) {words(rng, 12)}. Syn. -- {words(rng, 3)}.\n\n2. {words(rng, 20)}." for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": e}) + "\n" for e in entries))
    return path


def wordnet_source(folder: Path, n: int = 240) -> Path:
    """A folder as ``mlpmem tasks source`` writes it, from ``n`` synthetic synsets (every fourth outside the memory's text)."""
    from mlpmem import wordnet
    from mlpmem.manifest import write_manifest

    rng = random.Random(2)
    letters = "abcdefghijklmnopqrstuvwxyz"
    synsets = []
    for i in range(n):
        lex = LEX[i % len(LEX)]
        w = "".join(rng.choice(letters) for _ in range(6))
        synsets.append(
            {
                "id": f"{lex[0]}:{i:08d}",
                "pos": "verb" if lex.startswith("verb") else "noun",
                "lexname": lex,
                "lemmas": [w, f"{w} {lex.split('.')[1]}"],
                "definition": f"a {lex.split('.')[1]} that {words(rng, 6)}",
                "examples": [f"the {w} was {words(rng, 3)}"],
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "synsets.jsonl").write_text("".join(json.dumps(s) + "\n" for s in synsets))
    docs = [{"id": s["id"], "text": wordnet.Synset(**s).text()} for i, s in enumerate(synsets) if i % 4]
    (folder / "wordnet.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    write_manifest(folder, "tasks_source", {"source": {"package": "wordnet-base", "version": "synthetic", "licence": "none"}})
    return folder


def build(out: Path) -> None:
    default = out / "cache" / "models" / "smollm2-135m"
    if not (default / "model.safetensors").exists():
        tiny_model(default)
    if not (out / "models" / "gemma" / "model.safetensors").exists():
        tiny_model(out / "models" / "gemma", bos=True)
    if not (out / "runs" / "data" / "gcide.jsonl").exists():
        gcide_jsonl(out / "runs" / "data" / "gcide.jsonl")
    if not (out / "runs" / "knowledge" / "wordnet" / "manifest.json").exists():
        wordnet_source(out / "runs" / "knowledge" / "wordnet")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    build(p.parse_args().out)


if __name__ == "__main__":
    main()
