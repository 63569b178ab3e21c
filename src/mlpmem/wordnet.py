"""WordNet 3.0 from the Debian package ``wordnet-base``: parse its data files, write the memory's text.

``wordnet-base`` ships ``/usr/share/wordnet/data.{noun,verb,adj,adv}``, one synset per
line (format in wndb(5WN))::

    00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 ... | a general concept ...; "an example"

offset, lexicographer file number, part of speech (n, v, a, s = satellite adjective,
r), word count (2 hex digits), the words (each followed by a lex id; adjectives may
carry a marker such as ``(p)``), pointer count (3 decimal digits) and pointers, verb
frames, then ``|`` and the gloss: definitions separated by ``;`` followed by quoted
examples. Lines starting with spaces are the licence header.

Licence: the WordNet 3.0 licence (Princeton; permissive, keep the copyright notice);
the package's ``copyright`` file is recorded next to the data.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlpmem.errors import MlpmemError

PACKAGE = "wordnet-base"
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
# lexicographer files, by number (lexnames(5WN)); used to draw distractors from the same semantic field
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person "
    "noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption "
    "verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
    "verb.weather adj.ppl"
).split()
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")
# the pointers kept (wninput(5WN)), by symbol: "X hypernym Y" reads "X is a kind of Y", "X part_of Y" "X is a part of Y".
# Only one direction of each pair is kept (WordNet stores both: ~ hyponym mirrors @, %p part meronym mirrors #p).
RELATIONS = {
    "@": "hypernym",
    "@i": "instance_hypernym",
    "!": "antonym",
    "#m": "member_of",
    "#p": "part_of",
    "#s": "substance_of",
}


@dataclass
class Synset:
    id: str  # "n:00002137"
    pos: str  # noun | verb | adjective | adverb
    lexname: str
    lemmas: list[str]  # spaces, not underscores; adjective markers removed
    definition: str  # the gloss's definitions, examples removed
    examples: list[str] = field(default_factory=list)
    # [relation, target synset id, source word, target word] per kept pointer; the word numbers count from 1 in
    # ``lemmas`` and are 0 for a relation between whole synsets (antonyms are between words)
    pointers: list[list] = field(default_factory=list)

    def text(self) -> str:
        """The document the memory trains on: the fact every task item asks about."""
        return f"{', '.join(self.lemmas)} ({self.pos}): {self.definition}."


def parse_line(line: str) -> Synset | None:
    """One line of a WordNet data file -> Synset (None for the licence header and blank lines)."""
    if not line.strip() or line.startswith(" "):
        return None
    head, sep, gloss = line.partition("|")
    f = head.split()
    if not sep or len(f) < 6:
        raise ValueError(f"not a WordNet data line: {line[:80]!r}")
    offset, lexnum, ss_type, w_cnt = f[0], int(f[1]), f[2], int(f[3], 16)
    if ss_type not in POS_NAME or not offset.isdigit():
        raise ValueError(f"not a WordNet data line: {line[:80]!r}")
    words = [_ADJ_MARKER.sub("", f[4 + 2 * i]).replace("_", " ") for i in range(w_cnt)]
    definition, examples = split_gloss(gloss)
    lexname = LEXNAMES[lexnum] if 0 <= lexnum < len(LEXNAMES) else str(lexnum)
    return Synset(f"{ss_type}:{offset}", POS_NAME[ss_type], lexname, words, definition, examples, parse_pointers(f[4 + 2 * w_cnt :]))


def parse_pointers(fields: list[str]) -> list[list]:
    """The kept pointers of a data line, from its pointer count on: ``["003", "@", "00001740", "n", "0000", ...]``.

    A pointer's target part of speech is ``a`` also for a satellite adjective (ids ``s:...``):
    :func:`synset_key` makes the two meet.
    """
    n = int(fields[0])
    out = []
    for j in range(n):
        symbol, offset, pos, words = fields[1 + 4 * j : 5 + 4 * j]
        if symbol in RELATIONS:
            out.append([RELATIONS[symbol], f"{pos}:{offset}", int(words[:2], 16), int(words[2:], 16)])
    return out


def synset_key(synset_id: str) -> str:
    """The id under which pointers name a synset (satellite adjectives are pointed at as ``a``)."""
    return "a:" + synset_id[2:] if synset_id.startswith("s:") else synset_id


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """``'a concept; "an example"; "another"'`` -> ("a concept", ["an example", "another"])."""
    examples = re.findall(r'"([^"]*)"', gloss)
    definition = re.sub(r'"[^"]*"', "", gloss)
    definition = re.sub(r"\s*;\s*(;\s*)*", "; ", definition).strip().strip(";").strip()
    return definition.rstrip(". "), [e.strip() for e in examples if e.strip()]


def parse_data_file(path: Path) -> list[Synset]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            try:
                s = parse_line(line)
            except (ValueError, IndexError) as e:
                raise MlpmemError(
                    f"{path} line {i + 1} is not in WordNet's data-file format ({e})",
                    f"pass the data files of the Debian package {PACKAGE} (apt-get download {PACKAGE})",
                )
            if s is not None:
                out.append(s)
    return out


def extract_package(deb: Path | None, work: Path) -> tuple[Path, Path, dict]:
    """Unpack ``wordnet-base`` into ``work``; fetch it with ``apt-get download`` when ``deb`` is None.

    Returns (folder holding data.noun etc., the .deb, {"package", "version", "licence"}).
    """
    work.mkdir(parents=True, exist_ok=True)
    if deb is None:
        if shutil.which("apt-get") is None:
            raise MlpmemError(
                f"no .deb of {PACKAGE} was given and apt-get is not available",
                f"download the Debian package {PACKAGE} on another machine and pass it with --deb FILE.deb",
            )
        r = subprocess.run(["apt-get", "download", PACKAGE], cwd=work, capture_output=True, text=True)
        found = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if r.returncode != 0 or not found:
            raise MlpmemError(
                f"`apt-get download {PACKAGE}` failed ({(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no output']})",
                f"run `apt-get update` first, or pass a downloaded {PACKAGE} .deb with --deb",
            )
        deb = found[-1]
    deb = Path(deb)
    if not deb.is_file():
        raise MlpmemError(
            f"the source package {deb} does not exist",
            f"pass the path of a {PACKAGE} .deb (apt-get download {PACKAGE}), or leave --deb out to download it",
        )
    if shutil.which("dpkg-deb") is None:
        raise MlpmemError("dpkg-deb is needed to unpack the .deb and is not installed", "install dpkg (any Debian or Ubuntu system has it)")
    x = Path(tempfile.mkdtemp(dir=work, prefix="x"))
    r = subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], capture_output=True, text=True)
    if r.returncode != 0:
        raise MlpmemError(
            f"{deb} is not a readable Debian package ({r.stderr.strip()[:200]})", f"download {PACKAGE} again (apt-get download {PACKAGE})"
        )
    info = {}
    for key in ("Package", "Version"):
        q = subprocess.run(["dpkg-deb", "-f", str(deb), key], capture_output=True, text=True)
        info[key.lower()] = q.stdout.strip()
    if info.get("package") != PACKAGE:
        raise MlpmemError(f"{deb} is the package {info.get('package')!r}, not {PACKAGE}", f"pass a {PACKAGE} .deb")
    data = x / "usr" / "share" / "wordnet"
    missing = [n for n in DATA_FILES if not (data / n).is_file()]
    if missing:
        raise MlpmemError(f"{deb} holds no {', '.join(missing)} under usr/share/wordnet", f"pass the {PACKAGE} package of WordNet 3.0")
    copyright_file = x / "usr" / "share" / "doc" / PACKAGE / "copyright"
    licence = "WordNet-3.0 (Princeton University; permissive, keep the notice)"
    if copyright_file.is_file():
        m = re.search(r"^License:\s*(\S+)", copyright_file.read_text(errors="replace"), re.M)
        licence = f"{m.group(1) if m else 'WordNet3.0'} (Princeton University; permissive, keep the copyright notice)"
    info["licence"] = licence
    info["copyright_file"] = str(copyright_file) if copyright_file.is_file() else None
    return data, deb, info


_WORD = re.compile(r"[a-z]+")


def good_headword(s: Synset) -> bool:
    """A synset worth asking about: a plain one-word headword (letters only, 3+) that its definition does not give away."""
    w = s.lemmas[0]
    return (
        bool(re.fullmatch(r"[a-z]{3,}", w))
        and len(s.definition.split()) >= 4
        and not any(w in d or d in w for d in _WORD.findall(s.definition.lower()) if len(d) >= 4)
    )
