"""WikiText-103 as a JSONL corpus with one document per article (for the wikitext103 recipe).

    python bench/wikitext103.py [--config wikitext-103-raw-v1] [--out wikitext103.jsonl]

The Hugging Face copy (`Salesforce/wikitext`) holds one *line* per row. Splitting
rows into train/valid/test would put lines of one article in two splits and leak
the test set into the datastore; this script joins each article's lines (an
article starts at a " = Title = " heading; " = = Section = = " headings stay
inside it), so the corpus stage splits by article. Needs the `datasets` package
and the data in the local HF cache (or a reachable hub).
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Iterable, Iterator

TITLE = re.compile(r"^ = [^=].* = \n?$")


def articles(rows: Iterable[str]) -> Iterator[str]:
    """Join WikiText rows into articles, each from its title line to the next title line."""
    current: list[str] = []
    for row in rows:
        if TITLE.match(row) and any(r.strip() for r in current):
            yield "".join(current).strip()
            current = []
        current.append(row)
    if any(r.strip() for r in current):
        yield "".join(current).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="wikitext-103-raw-v1")
    ap.add_argument("--out", default="wikitext103.jsonl")
    a = ap.parse_args()
    import datasets

    n = 0
    with open(a.out, "w") as f:
        for split in ("train", "validation", "test"):  # the corpus stage makes its own splits, by article
            for text in articles(datasets.load_dataset("Salesforce/wikitext", a.config, split=split)["text"]):
                f.write(json.dumps({"text": text}) + "\n")
                n += 1
    print(f"{n} articles -> {a.out}")


if __name__ == "__main__":
    main()
