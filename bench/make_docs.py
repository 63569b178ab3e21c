"""Write the generated parts of the user docs (not a test).

    python bench/make_docs.py          # rewrite both
    python bench/make_docs.py --check  # exit 1 if either is out of date
    python bench/make_docs.py --quick --out DIR  # from the smoke runs' *_quick.json, into DIR (bench/reproduce.py --quick)

- README.md: the results table between ``<!-- results:start -->`` and
  ``<!-- results:end -->``, read from the run summaries in bench/results/*.json
  (``bench/summarize_run.py`` writes them). A summary that is missing is left out;
  no number comes from anywhere else.
- docs/recipe.md: every recipe key, from the stage registry (mlpmem.stages.STAGES):
  each stage config's dataclass fields with their type, default and the comment
  written next to the field (or its paragraph in the class docstring).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from provenance import results_dir  # noqa: E402

RES = results_dir()
SUFFIX = ""  # "_quick": the smoke runs' summaries
README = ROOT / "README.md"
RECIPE_MD = ROOT / "docs" / "recipe.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# run summaries shown in the README, in order: (bench/results/NAME.json, corpus label, the command that made the run)
RUNS = (
    ("demo", "State of the Union", "./dev demo"),
    ("sotu200k", "State of the Union", "mlpmem run bench/recipes/sotu200k.yaml"),
    ("sotu1m", "State of the Union", "mlpmem run bench/recipes/sotu1m.yaml"),
    ("gcide100k", "GCIDE dictionary", "mlpmem run bench/recipes/gcide100k.yaml"),
)


# ---------------------------------------------------------------- README results table


def _load(name: str) -> dict | None:
    p = RES / f"{name}{SUFFIX}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _tokens(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


def _ppl(r: dict, key: str) -> str:
    """Test perplexity and its change against the LM alone, with the 95% paired interval where the run's report has one."""
    base, v = r["ppl"]["base"], r["ppl"].get(key)
    if v is None:
        return "-"
    if key == "base":
        return f"{v:.2f}"
    from mlpmem.interpolate import interval_text

    iv = r.get("vs_base", {}).get(key)
    return f"{v:.2f} ({interval_text(iv, 1) if iv else f'{100 * (v / base - 1):+.1f}%'})"


def _decode(r: dict, gen: dict | None) -> str:
    """The run's memory's decode speed against the LM (``gen``: generate.json; batch 1), where a memory like it was timed."""
    v = r.get("memory_variant")
    got = (gen or {}).get("decode", {}).get("1", {}).get(v) if v else None
    return f"{got['ratio_to_lm']['median']:.2f}x" if got else "-"


def results_table() -> str:
    rows, used = [], []
    gen = _load("generate")
    for name, corpus, cmd in RUNS:
        r = _load(name)
        if r is None:
            continue
        used.append(f"`{name}.json` (`{cmd}`)")
        ix = r.get("index", {})
        index = ix.get("factory", "?") + (" (codes only)" if ix.get("rerank") is False and ix.get("factory") != "Flat" else "")
        rows.append(
            f"| {corpus} | {_tokens(r['n_train_tokens'])} / {_tokens(r['n_test_tokens'])} | {index} | "
            + " | ".join(_ppl(r, k) for k in ("base", "knn_lm", "mlp_memory", "knn_lm+mlp_memory"))
            + f" | {_decode(r, gen)} | {r['tokens_per_s']['mlp_memory'] / r['tokens_per_s']['base']:.2f}x |"
        )
    if not rows:
        return "_No run summaries in bench/results yet: run `./dev demo`, then `python bench/summarize_run.py runs/sotu --out bench/results/demo.json`._\n"
    head = (
        "| corpus | train / test tokens | kNN index | LM alone | + kNN-LM | + MLP memory | + both "
        "| LM + memory decoding vs LM | scoring vs LM |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    note = (
        "\nTest perplexity (lower is better) of SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), one run each on 2 CPU "
        "cores; lambda and the kNN temperature fitted on the valid split. In brackets, where the run's report has it, the 95% "
        "paired bootstrap interval of the change (blocks of 256 test positions); runs summarised before reports had intervals "
        "show none. Decoding: tokens/s of greedy decoding with the KV cache at batch 1, against the LM alone, for a memory "
        "built like the run's (blocks, head, int8, gate: `memory_variant` in its summary), median of paired rounds "
        + (f"(`generate.json`, {gen['threads']} thread); " if gen else "")
        + "- where that memory was not timed. Scoring: the report's tokens/s ratio for scoring the test split in windows "
        "of 512 with a stride of 256, where the LM runs twice per token and the memory once. Generated by "
        "`python bench/make_docs.py` from " + ", ".join(used) + ". All benchmarks: [BENCHMARKS.md](BENCHMARKS.md); "
        "what they mean: [docs/results.md](docs/results.md).\n"
    )
    return head + "\n".join(rows) + "\n" + note


def readme_text(old: str) -> str:
    if START not in old or END not in old:
        sys.exit(f"README.md has no {START} ... {END} block")
    pre, rest = old.split(START, 1)
    _, post = rest.split(END, 1)
    return f"{pre}{START}\n{results_table()}{END}{post}"


# ---------------------------------------------------------------- docs/recipe.md


def _type(tp) -> str:
    s = str(tp).replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"<class '([\w.]+)'>", r"\1", s)


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def _docstring_fields(cls, names: set[str]) -> dict[str, str]:
    """``name: text`` paragraphs of the class docstring (continuation lines until the next field or a blank line)."""
    out: dict[str, str] = {}
    current = None
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        m = re.match(r"(\w+): (.*)", line)
        if m and m.group(1) in names:
            current = m.group(1)
            out[current] = m.group(2)
        elif current and line.strip():
            out[current] += " " + line.strip()
        else:
            current = None
    return out


def _source_comments(cls) -> tuple[dict[str, str], dict[str, str]]:
    """Per field: the comment on its line(s) or in the comment block right above it; and group headings
    (a one-line block of at most four words above a field, such as ``# optimisation``)."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[str, bool]] = {}  # row -> (text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[: tok.start[1]].strip())
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    desc, heads = {}, {}
    for stmt in body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        inline = [comments[r][0] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments and not comments[r][1]]
        above, r = [], stmt.lineno - 1
        while r in comments and comments[r][1]:
            above.insert(0, comments[r][0])
            r -= 1
        if len(above) == 1 and len(above[0].split()) <= 4 and not above[0].endswith(":"):
            heads[name] = above.pop()
        desc[name] = " ".join(above + inline)
    return desc, heads


def _cell(text: str) -> str:
    return text.replace("|", "\\|").strip()


def config_table(cls) -> str:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    doc = _docstring_fields(cls, names)
    desc, heads = _source_comments(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in heads:
            rows.append(f"| *{_cell(heads[f.name])}* | | | |")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = " ".join(t for t in (doc.get(f.name, ""), desc.get(f.name, "")) if t)
        rows.append(f"| `{f.name.rstrip('_')}` | `{_cell(_type(hints[f.name]))}` | `{_cell(_value(default))}` | {_cell(text)} |")
    return "\n".join(rows) + "\n"


def recipe_md() -> str:
    from mlpmem.stages import STAGES

    out = [
        "# Recipe reference\n",
        "Generated by `python bench/make_docs.py` from the stage configs' dataclass fields "
        "(the stage registry, `mlpmem.stages.STAGES`); do not edit by hand. The comments are the ones "
        "written beside each field in the source.\n",
        "A recipe is a YAML file with one section per stage below, plus top-level keys:\n",
        "- `out`: the run folder (`--out` wins);\n"
        "- `model`: the LM, by mlpmem name (`smollm2-135m`, the default), hub name, local folder or `.gguf` file; "
        "it sets `corpus.model` and `datastore.model`;\n"
        "- `device`: where the stages run, `auto | cpu | cuda | cuda:N | mps` (`--device` wins; see [operations.md](operations.md));\n"
        "- `dtype`: the LM's precision, `datastore.dtype` (`--dtype` wins).\n",
        "Any key can be set on the command line as `SECTION.KEY=VALUE` (`mlpmem run sotu train.epochs=3`), "
        "the value read as YAML. A stage verb (`mlpmem VERB`) takes the same keys as flags, `--key-name`, "
        "booleans as `--key` / `--no-key`; `null` (or `none`, `auto` for numbers) means unset. Built-in recipes: "
        "`src/mlpmem/recipes/` (`sotu`, `wikitext103`); more in `bench/recipes/`. Every key is checked (type, range, "
        "consistency between sections) before the first stage runs.\n",
    ]
    for s in STAGES:
        cls = s.config_class()
        verb = f", verb `mlpmem {s.verb}`" if s.verb else ""
        out.append(f"## `{s.name}:` ({cls.__module__}.{cls.__name__}{verb})\n")
        if s.help:
            out.append(f"What it does: {s.help}.\n")
        out.append(config_table(cls))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that README.md and docs/recipe.md are up to date")
    p.add_argument("--quick", action="store_true", help="read the smoke runs' *_quick.json (needs --out)")
    p.add_argument("--out", type=Path, default=None, help="write README.md and recipe.md into this folder instead")
    a = p.parse_args()
    global SUFFIX
    SUFFIX = "_quick" if a.quick else ""
    if a.quick and not a.out:
        sys.exit("--quick renders smoke-run numbers: write them elsewhere (--out)")
    wanted = {README: readme_text(README.read_text()), RECIPE_MD: recipe_md()}
    if a.out:
        wanted = {a.out / path.name: text for path, text in wanted.items()}
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if a.check:
        for path in stale:
            print(f"{path} is out of date: run python bench/make_docs.py")
        sys.exit(1 if stale else 0)
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
