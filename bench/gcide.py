"""GCIDE (Webster 1913 + WordNet) from the Debian package `dict-gcide` as a JSONL corpus.

    python bench/gcide.py [--deb dict-gcide_*.deb] [--out runs/data/gcide.jsonl]

Without --deb the package is fetched with `apt-get download dict-gcide` (the
Debian archive is reachable from this kind of machine; no model hub is
involved). One dictionary entry is one document, so the corpus stage's
split by document never puts half an entry in train and half in test.
Source markers such as "[1913 Webster]" are dropped: they follow almost
every sense, and a perplexity gain from predicting them says nothing about
knowledge. GPL-2+ (the data's licence), so the data stays out of the repo.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import tempfile
from pathlib import Path

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
SOURCE_LINE = re.compile(r"^\s*\[[^\]]*(Webster|WordNet|PJC|Century|Chambers|Solar|RDH|Rees|Tyndall|Johnson)[^\]]*\]\s*$")


def b64_int(s: str) -> int:
    """dictd's index numbers are base-64 digits, most significant first."""
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def clean(entry: str) -> str:
    lines = [ln.strip() for ln in entry.splitlines() if not SOURCE_LINE.match(ln)]
    text = "\n".join(re.sub(r"\s+", " ", ln) for ln in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def entries(index_path: Path, dict_path: Path) -> list[str]:
    data = gzip.open(dict_path).read()  # .dict.dz is gzip-compatible
    seen, out = set(), []
    for line in index_path.read_text(encoding="utf-8").splitlines():
        word, off, size = line.split("\t")[:3]
        if word.startswith("00-database"):
            continue
        off, size = b64_int(off), b64_int(size)
        if off in seen:  # several headwords point at one entry
            continue
        seen.add(off)
        text = clean(data[off : off + size].decode("utf-8", "replace"))
        if text:
            out.append(text)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deb", type=Path, default=None, help="dict-gcide .deb (default: apt-get download it)")
    p.add_argument("--out", type=Path, default=Path("runs/data/gcide.jsonl"))
    args = p.parse_args()
    if args.out.exists():
        print(f"{args.out} exists")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", "dict-gcide"], cwd=tmp, check=True)
            deb = next(tmp.glob("dict-gcide_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        share = tmp / "x" / "usr" / "share" / "dictd"
        docs = entries(share / "gcide.index", share / "gcide.dict.dz")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    part = args.out.with_name(args.out.name + ".partial")
    with open(part, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    part.rename(args.out)
    print(f"{len(docs)} entries -> {args.out}")


if __name__ == "__main__":
    main()
