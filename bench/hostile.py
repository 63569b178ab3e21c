"""Hostile inputs and faults against the `mlpmem` CLI, classified automatically.

    python bench/hostile.py            # all cases (a few minutes on 2 cores)
    python bench/hostile.py -k lock    # cases whose name contains "lock"

Every case is a one-line CLI command (run in this process through ``mlpmem.cli.main``,
so that an uncaught exception is a traceback) or a small scripted fault (kill -9,
a full disk, a damaged file, a held lock). Each gets one outcome:

- ``error``: exit 2 with one ``mlpmem: error:`` paragraph naming the problem and the fix;
- ``refusal``: the same, where the right answer is to refuse (never delete, never mix);
- ``correct``: exit 0 and a check of the result passed (resume byte-identical, ...);
- failures: ``traceback``, ``silent wrong result`` (exit 0 where an error was expected,
  or a result that fails its check), ``data loss`` (a file outside the case's output
  folders changed or vanished), ``bad message`` (an expected phrase is missing).

Writes bench/results/hostile.json and RELIABILITY.md (the table). Uses the tiny random
models of the test suite, offline.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["TQDM_DISABLE"] = "1"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))


import provenance  # noqa: E402  (imported here: its start time is the script's)
from mlpmem.cli import main as cli_main  # noqa: E402
from mlpmem.errors import MlpmemError  # noqa: E402

FAILS = ("traceback", "silent wrong result", "data loss", "bad message")


@dataclass
class Case:
    name: str
    item: str  # the issue's item (1-8) or "other"
    expect: str  # "error" | "refusal" | "correct"
    run: Callable[["Env", Path], tuple[list[str], Callable[[], bool] | None]]  # -> (argv, check) ; argv [] = scripted
    contains: tuple[str, ...] = ()
    outs: tuple[str, ...] = ("out",)  # folders under the case dir the command may write
    what: str = ""


@dataclass
class Env:
    root: Path
    model: Path
    base: Path  # finished stages: corpus, datastore, index, targets, train, valid (datastore)
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- set-up


def build_env(root: Path) -> Env:
    import helpers

    tok = helpers.tiny_tokenizer()
    model = helpers.save_tiny_model("llama", root / "model", tok)
    base = root / "base"
    base.mkdir()
    src = root / "inputs" / "corpus.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in helpers.make_texts(12, 120)))
    m = str(model)
    steps = [
        ["corpus", "--source", str(src), "--out", str(base / "corpus"), "--model", m],
        [
            "datastore",
            "--corpus",
            str(base / "corpus"),
            "--out",
            str(base / "datastore"),
            "--model",
            m,
            "--context",
            "32",
            "--stride",
            "16",
            "--windows-per-shard",
            "16",
        ],
        [
            "datastore",
            "--corpus",
            str(base / "corpus"),
            "--out",
            str(base / "valid"),
            "--model",
            m,
            "--context",
            "32",
            "--stride",
            "16",
            "--split",
            "valid",
            "--lm-logprob",
        ],
        ["index", "--datastore", str(base / "datastore"), "--out", str(base / "index")],
        [
            "targets",
            "--datastore",
            str(base / "datastore"),
            "--index",
            str(base / "index"),
            "--out",
            str(base / "targets"),
            "--k",
            "16",
            "--top-m",
            "8",
        ],
        ["train", "--datastore", str(base / "datastore"), "--targets", str(base / "targets"), "--out", str(base / "train")] + TRAIN_FLAGS,
    ]
    for argv in steps:
        rc = cli_main(argv)
        assert rc == 0, argv
    return Env(root, model, base)


# init lm_head: the default lm_copy reads the last layer's output, which these datastores (keys only) do not hold
TRAIN_FLAGS = [
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--n-blocks",
    "1",
    "--ckpt-every",
    "4",
    "--eval-every",
    "0",
    "--keep-last",
    "2",
    "--init",
    "lm_head",
]


def copy_stage(env: Env, name: str, to: Path) -> Path:
    shutil.copytree(env.base / name, to, symlinks=True)
    return to


def snapshot(paths: list[Path], skip: list[Path]) -> dict[str, str]:
    out = {}
    skip = [s.resolve() for s in skip]
    for top in paths:
        for p in sorted(top.rglob("*")) if top.is_dir() else [top]:
            rp = p.resolve() if not p.is_symlink() else p
            if any(rp == s or s in rp.parents for s in skip) or not p.is_file() or p.name == ".mlpmem.lock":
                continue
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------- running one case


def run_cli(argv: list[str]) -> tuple[int | None, str, str | None]:
    """(exit code, stderr, traceback or None) of ``mlpmem ARGV`` in this process."""
    err = io.StringIO()
    tb = None
    rc: int | None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli_main(argv)
        except SystemExit as e:  # argparse: usage errors exit 2 with a message
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # an exception main() let through: what a user sees as a traceback
            tb = traceback.format_exc()
            rc = None
    return rc, err.getvalue(), tb


def classify(case: Case, rc, stderr: str, tb: str | None, check_ok: bool | None, lost: list[str]) -> str:
    if tb is not None or "Traceback (most recent call last)" in stderr:
        return "traceback"
    if lost:
        return "data loss"
    if case.expect == "correct":
        return "correct" if rc == 0 and check_ok is not False else "silent wrong result" if rc == 0 else "bad message"
    if rc == 0:
        return "silent wrong result"
    low = stderr.lower()
    if case.expect == "interrupted":  # Ctrl-C: exit 130 and one line saying how to resume
        return "interrupted" if rc == 130 and all(c.lower() in low for c in case.contains) and check_ok is not False else "bad message"
    if "error:" not in low or any(c.lower() not in low for c in case.contains):
        return "bad message"
    if check_ok is False:
        return "silent wrong result"
    return case.expect


def run_case(env: Env, case: Case) -> dict:
    cdir = env.root / "cases" / case.name
    cdir.mkdir(parents=True)
    t0 = time.perf_counter()
    tb = None
    try:
        argv, check = case.run(env, cdir)
    except Exception:
        return {
            "name": case.name,
            "item": case.item,
            "expect": case.expect,
            "outcome": "setup failed",
            "stderr": traceback.format_exc()[-2000:],
            "seconds": 0,
        }
    outs = [cdir / o for o in case.outs]
    watched = [env.base, env.model, env.root / "inputs", cdir]
    before = snapshot(watched, outs)
    if argv and argv[0] == "@script":  # scripted fault: the callable runs it and returns (rc, stderr)
        try:
            rc, stderr = argv[1]()
        except BaseException:
            rc, stderr, tb = None, "", traceback.format_exc()
    else:
        rc, stderr, tb = run_cli([str(a) for a in argv])
    after = snapshot(watched, outs)
    lost = sorted(k for k in before if before[k] != after.get(k))
    check_ok = None
    if check is not None and tb is None:
        try:
            check_ok = bool(check())
        except Exception:
            check_ok, stderr = False, stderr + "\n[check] " + traceback.format_exc()[-800:]
    outcome = classify(case, rc, stderr, tb, check_ok, lost)
    cmd = case.what or ("mlpmem " + " ".join(_short(a, env) for a in argv) if argv and argv[0] != "@script" else case.what)
    return {
        "name": case.name,
        "item": case.item,
        "expect": case.expect,
        "outcome": outcome,
        "exit": rc,
        "command": cmd,
        "message": _short(_message(stderr), env) if rc != 0 else "(exit 0; result checked)" if check is not None else "(exit 0)",
        "lost": lost[:5],
        "traceback": (tb or "")[-1500:],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _short(a, env: Env) -> str:
    s = str(a)
    for p, name in ((str(env.root / "cases"), "CASE"), (str(env.base), "BASE"), (str(env.model), "MODEL"), (str(env.root), "ROOT")):
        s = s.replace(p, name)
    return s


def _message(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.strip()]
    for i, l in enumerate(lines):
        if "error:" in l:
            return " ".join(lines[i:])[:400]
    return " ".join(lines[-2:])[:400]


# ---------------------------------------------------------------- cases

CASES: list[Case] = []


def case(name: str, item: str, expect: str, contains: tuple[str, ...] = (), outs: tuple[str, ...] = ("out",), what: str = ""):
    def deco(fn):
        CASES.append(Case(name, item, expect, fn, contains, outs, what))
        return fn

    return deco


def cli(name, item, expect, argv_fn, contains=(), outs=("out",), check=None, what=""):
    """A one-line CLI case: ``argv_fn(env, cdir)`` gives the command line."""
    CASES.append(
        Case(name, item, expect, lambda env, d: (argv_fn(env, d), (lambda: check(env, d)) if check else None), contains, outs, what)
    )


def user_folder(d: Path) -> Path:
    (d / "out").mkdir()
    (d / "out" / "thesis.txt").write_text("precious\n")
    return d / "out"


def src(env: Env) -> str:
    return str(env.root / "inputs" / "corpus.jsonl")


def corpus_cmd(env, out, *flags):
    return ["corpus", "--source", src(env), "--out", str(out), "--model", str(env.model), *flags]


def ds_cmd(env, corpus, out, *flags):
    return [
        "datastore",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--model",
        str(env.model),
        "--context",
        "32",
        "--stride",
        "16",
        "--windows-per-shard",
        "16",
        *flags,
    ]


def tg_cmd(env, out, *flags, ds=None, ix=None):
    return [
        "targets",
        "--datastore",
        str(ds or env.base / "datastore"),
        "--index",
        str(ix or env.base / "index"),
        "--out",
        str(out),
        "--k",
        "16",
        "--top-m",
        "8",
        *flags,
    ]


def train_cmd(env, out, *flags, ds=None, tg=None):
    return [
        "train",
        "--datastore",
        str(ds or env.base / "datastore"),
        "--targets",
        str(tg or env.base / "targets"),
        "--out",
        str(out),
        *TRAIN_FLAGS,
        *flags,
    ]


# ---- 1, 2: never delete or overwrite what is not ours

cli(
    "overwrite-user-folder",
    "1",
    "refusal",
    lambda e, d: corpus_cmd(e, user_folder(d), "--overwrite", "--train-tokens", "1000"),
    ("not written by mlpmem", "thesis.txt"),
    outs=(),
    check=lambda e, d: (d / "out" / "thesis.txt").read_text() == "precious\n",
)
cli("write-into-user-folder", "1", "refusal", lambda e, d: corpus_cmd(e, user_folder(d)), ("not written by mlpmem",), outs=())


def _stage_plus_user_file(e, d, stage="corpus"):
    out = copy_stage(e, stage, d / "out")
    (out / "notes.txt").write_text("mine\n")
    return out


cli(
    "overwrite-stage-with-user-file",
    "1",
    "refusal",
    lambda e, d: corpus_cmd(e, _stage_plus_user_file(e, d), "--overwrite"),
    ("did not write", "notes.txt"),
    outs=(),
)
cli(
    "overwrite-train-with-user-subfolder",
    "1",
    "refusal",
    lambda e, d: (
        lambda out: (out.joinpath("mine").mkdir(), out.joinpath("mine", "a.txt").write_text("x"), train_cmd(e, out, "--overwrite"))[-1]
    )(copy_stage(e, "train", d / "out")),
    ("did not write", "mine"),
    outs=(),
)
cli(
    "overwrite-own-stage",
    "1",
    "correct",
    lambda e, d: corpus_cmd(e, copy_stage(e, "corpus", d / "out"), "--overwrite", "--train-tokens", "800"),
    check=lambda e, d: json.loads((d / "out" / "manifest.json").read_text())["splits"]["train"]["n_tokens"] == 800,
)
cli(
    "corpus-into-datastore-folder",
    "1",
    "refusal",
    lambda e, d: corpus_cmd(e, copy_stage(e, "datastore", d / "out"), "--overwrite"),
    ("`datastore` stage",),
    outs=(),
)
cli(
    "index-into-datastore-folder",
    "1",
    "refusal",
    lambda e, d: ["index", "--datastore", str(e.base / "datastore"), "--out", str(copy_stage(e, "datastore", d / "out")), "--overwrite"],
    ("`datastore` stage",),
    outs=(),
)
cli(
    "targets-into-index-folder",
    "1",
    "refusal",
    lambda e, d: tg_cmd(e, copy_stage(e, "index", d / "out"), "--overwrite"),
    ("`index` stage",),
    outs=(),
)
cli(
    "train-into-targets-folder",
    "1",
    "refusal",
    lambda e, d: train_cmd(e, copy_stage(e, "targets", d / "out"), "--overwrite"),
    ("`targets` stage",),
    outs=(),
)
cli(
    "datastore-into-train-folder",
    "1",
    "refusal",
    lambda e, d: ds_cmd(e, e.base / "corpus", copy_stage(e, "train", d / "out"), "--overwrite"),
    ("`memory` stage",),
    outs=(),
)
cli(
    "probe-into-corpus-folder",
    "1",
    "refusal",
    lambda e, d: ["probe", str(e.base / "corpus"), "--out", str(copy_stage(e, "corpus", d / "out")), "--overwrite"],
    ("`corpus` stage",),
    outs=(),
)
cli(
    "run-into-user-folder",
    "1",
    "refusal",
    lambda e, d: [
        "run",
        recipe(d, f"out: {user_folder(d)}\nmodel: {e.model}\ncorpus:\n  source: {src(e)}\ndatastore:\n  context: 32\n  stride: 16\n"),
        "--overwrite",
    ],
    ("not written by mlpmem",),
    outs=(),
)
cli("out-is-a-file", "1", "error", lambda e, d: (d.joinpath("out").write_text("x"), corpus_cmd(e, d / "out"))[1], ("is a file",), outs=())
cli(
    "out-below-a-file",
    "1",
    "error",
    lambda e, d: (d.joinpath("f").write_text("x"), corpus_cmd(e, d / "f" / "out"))[1],
    ("file is in the way",),
    outs=(),
)
cli(
    "export-into-corpus-folder",
    "2",
    "refusal",
    lambda e, d: ["export", str(e.base / "train" / "memory"), "--out", str(copy_stage(e, "corpus", d / "out"))],
    ("`corpus` stage",),
    outs=(),
)
cli(
    "export-into-train-folder",
    "2",
    "refusal",
    lambda e, d: ["export", str(e.base / "train" / "memory"), "--out", str(copy_stage(e, "train", d / "out"))],
    ("`memory` stage",),
    outs=(),
)
cli(
    "export-into-user-folder",
    "2",
    "refusal",
    lambda e, d: ["export", str(e.base / "train" / "memory"), "--out", str(user_folder(d))],
    ("not written by mlpmem",),
    outs=(),
)
cli(
    "export-into-own-memory",
    "2",
    "refusal",
    lambda e, d: ["export", str(copy_stage(e, "train", d / "t") / "memory"), "--out", str(d / "t" / "memory" / "x")],
    ("inside the memory folder",),
    outs=(),
)
cli(
    "export-fresh",
    "2",
    "correct",
    lambda e, d: ["export", str(e.base / "train" / "memory"), "--out", str(d / "out")],
    check=lambda e, d: json.loads((d / "out" / "config.json").read_text())["model_type"] == "mlpmem",
)
cli(
    "export-twice",
    "2",
    "correct",
    lambda e, d: (
        run_cli(["export", str(e.base / "train" / "memory"), "--out", str(d / "out")]),
        ["export", str(e.base / "train" / "memory"), "--out", str(d / "out"), "--lambda", "0.5"],
    )[1],
    check=lambda e, d: abs(json.loads((d / "out" / "config.json").read_text())["lambda_"] - 0.5) < 1e-9,
)
cli(
    "export-train-folder-given",
    "2",
    "correct",
    lambda e, d: ["export", str(e.base / "train"), "--out", str(d / "out")],
    check=lambda e, d: (d / "out" / "config.json").exists(),
    what="mlpmem export BASE/train --out CASE/out (the train folder, not its memory/)",
)


def _legacy(e, d):
    out = copy_stage(e, "corpus", d / "out")
    (out / ".mlpmem").unlink()
    return corpus_cmd(e, out)


cli("legacy-folder-adopted", "1", "correct", _legacy, check=lambda e, d: (d / "out" / ".mlpmem").exists())

# ---- 3: config comparison


def _with_config(e, d, stage, edit):
    out = copy_stage(e, stage, d / "out")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(edit(cfg)))
    return out


cli(
    "empty-config-is-not-up-to-date",
    "3",
    "refusal",
    lambda e, d: corpus_cmd(e, _with_config(e, d, "corpus", lambda c: {})),
    ("different configuration",),
    outs=(),
)
cli(
    "foreign-config-keys",
    "3",
    "refusal",
    lambda e, d: corpus_cmd(e, _with_config(e, d, "corpus", lambda c: {"foo": 1})),
    ("different configuration", "foo"),
    outs=(),
)
cli(
    "config-missing-one-key",
    "3",
    "refusal",
    lambda e, d: corpus_cmd(e, _with_config(e, d, "corpus", lambda c: {k: v for k, v in c.items() if k != "seed"})),
    ("different configuration", "seed"),
    outs=(),
)
cli(
    "config-not-json",
    "3",
    "error",
    lambda e, d: (lambda out: ((out / "config.json").write_text("{oops"), corpus_cmd(e, out))[1])(copy_stage(e, "corpus", d / "out")),
    ("not valid json",),
    outs=(),
)
cli(
    "changed-setting-named",
    "3",
    "refusal",
    lambda e, d: corpus_cmd(e, copy_stage(e, "corpus", d / "out"), "--seed", "3"),
    ("seed: 0 -> 3",),
    outs=(),
)
cli(
    "same-settings-up-to-date",
    "3",
    "correct",
    lambda e, d: (lambda out: (d.joinpath("t").write_text(str((out / "tokens.train.npy").stat().st_mtime_ns)), corpus_cmd(e, out))[1])(
        copy_stage(e, "corpus", d / "out")
    ),
    check=lambda e, d: str((d / "out" / "tokens.train.npy").stat().st_mtime_ns) == (d / "t").read_text(),
)
cli(
    "older-config-without-added-setting",
    "3",
    "correct",
    lambda e, d: ds_cmd(
        e,
        e.base / "corpus",
        _with_config(
            e,
            d,
            "datastore",
            lambda c: {
                **{k: v for k, v in c.items() if k != "extract_mode"},
                "config": {k: v for k, v in c["config"].items() if k != "mode"},
            },
        ),
    ),
    check=lambda e, d: (d / "out" / "manifest.json").exists(),
)

# ---- 5: duplicates


def _dups(e, d):
    import helpers

    texts = helpers.make_texts(12, 120, seed=5)
    rows = [{"id": f"a{i}", "text": t} for i, t in enumerate(texts)] + [{"id": f"dup{j}", "text": texts[0]} for j in range(3)]
    p = d / "dups.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["corpus", "--source", str(p), "--out", str(d / "out"), "--model", str(e.model)]


def _no_text_in_two_splits(e, d):
    docs = json.loads((d / "out" / "documents.json").read_text())
    m = json.loads((d / "out" / "manifest.json").read_text())
    ids = [x["id"] for s in docs.values() for x in s]
    return m["n_duplicates_dropped"] == 3 and not any(i.startswith("dup") for i in ids) and len(ids) == len(set(ids))


cli("duplicate-texts-under-new-ids", "5", "correct", _dups, check=_no_text_in_two_splits)


def _all_dups(e, d):
    p = d / "same.jsonl"
    p.write_text("".join(json.dumps({"id": str(i), "text": "the same text"}) + "\n" for i in range(5)))
    return ["corpus", "--source", str(p), "--out", str(d / "out"), "--model", str(e.model)]


cli("only-duplicates", "5", "error", _all_dups, ("at least 3",))

# ---- 6: the whole recipe is checked before stage 1


def recipe(d: Path, text: str) -> str:
    p = d / "r.yaml"
    p.write_text(text)
    return str(p)


def _recipe_case(name, body, contains, item="6"):
    def argv(e, d):
        head = f"out: {d / 'out'}\nmodel: {e.model}\ncorpus:\n  source: {src(e)}\n"
        return ["run", recipe(d, head + body)]

    cli(name, item, "error", argv, contains, outs=(), check=lambda e, d: not (d / "out").exists())


_recipe_case("recipe-knn-lambda-1.5", "knn:\n  lambda: 1.5\n", ("knn.lambda",))
_recipe_case("recipe-eval-split-bogus", "eval:\n  split: bogus\n", ("eval.split",))
_recipe_case("recipe-train-width-0", "train:\n  width: 0\n", ("train.width",))
_recipe_case("recipe-knn-k-0", "knn:\n  k: 0\n", ("knn.k",))
_recipe_case("recipe-knn-k-over-train-tokens", "  train_tokens: 500\nknn:\n  k: 1024\n", ("knn.k", "499"))
_recipe_case("recipe-knn-temperature-0", "knn:\n  temperature: 0\n", ("knn.temperature",))
_recipe_case("recipe-train-tokens-negative", "  train_tokens: -5\n", ("corpus.train_tokens",))
_recipe_case("recipe-temperatures-empty", "knn:\n  temperatures: []\n", ("knn.temperatures",))
_recipe_case("recipe-lr-negative", "train:\n  lr: -1\n", ("train.lr",))
_recipe_case("recipe-alpha-2", "train:\n  alpha: 2\n", ("train.alpha",))
_recipe_case("recipe-batch-size-0", "train:\n  batch_size: 0\n", ("train.batch_size",))
_recipe_case("recipe-epochs-0", "train:\n  epochs: 0\n", ("train.epochs",))
_recipe_case("recipe-activation-relu", "train:\n  activation: relu\n", ("train.activation",))
_recipe_case("recipe-init-bogus", "train:\n  init: bogus\n", ("train.init",))
_recipe_case("recipe-stride-over-context", "datastore:\n  context: 16\n  stride: 32\n", ("datastore.stride",))
_recipe_case("recipe-datastore-split-test", "datastore:\n  split: test\n", ("datastore.split",))
_recipe_case("recipe-site-bogus", "datastore:\n  site: bogus\n", ("datastore.site",))
_recipe_case("recipe-mode-bogus", "datastore:\n  mode: fast\n", ("datastore.mode",))
_recipe_case("recipe-dtype-int8", "datastore:\n  dtype: int8\n", ("datastore.dtype",))
_recipe_case("recipe-extra-site-garbage", "datastore:\n  extra_sites: ['x:y']\n", ("datastore.extra_sites",))
_recipe_case("recipe-fractions-sum-over-1", "  valid_fraction: 0.9\n  test_fraction: 0.2\n", ("corpus.valid_fraction",))
_recipe_case("recipe-txt-documents-bogus", "  txt_documents: lines\n", ("corpus.txt_documents",))
_recipe_case("recipe-nprobe-0", "index:\n  nprobe: 0\n", ("index.nprobe",))
_recipe_case("recipe-top-m-0", "targets:\n  top_m: 0\n", ("targets.top_m",))
_recipe_case("recipe-k-in-targets", "targets:\n  k: 8\n", ("targets.k",))
_recipe_case("recipe-unknown-section", "trian:\n  epochs: 1\n", ("trian",))
_recipe_case("recipe-unknown-key", "train:\n  epoch: 1\n", ("train.epoch",))
_recipe_case("recipe-wrong-type", "train:\n  lr: fast\n", ("train.lr",))
_recipe_case("recipe-section-scalar", "train: 5\n", ("train",))
_recipe_case("recipe-model-in-corpus", "  model: gpt2\n", ("corpus.model",))
_recipe_case(
    "recipe-several-problems-at-once",
    "train:\n  width: 0\nknn:\n  lambda: 2\neval:\n  split: x\n",
    ("train.width", "knn.lambda", "eval.split"),
)
_recipe_case("recipe-nan", "train:\n  lr: .nan\n", ("train.lr",))
_recipe_case("recipe-inf-epochs", "train:\n  epochs: .inf\n", ("train.epochs",))
_recipe_case("recipe-context-over-model", "datastore:\n  context: 4096\n  stride: 2048\n", ("datastore.context", "256 positions"))
cli("recipe-top-level-list", "other", "error", lambda e, d: ["run", recipe(d, "- a\n- b\n")], ("not a mapping",), outs=())
cli("recipe-is-a-folder", "other", "error", lambda e, d: ["run", str(d)], ("is a folder",), outs=())
cli(
    "recipe-not-utf8",
    "other",
    "error",
    lambda e, d: (d.joinpath("r.yaml").write_bytes(b"out: \xff\xfe\n"), ["run", str(d / "r.yaml")])[1],
    ("utf-8",),
    outs=(),
)
cli("recipe-bad-yaml", "other", "error", lambda e, d: ["run", recipe(d, "out: [\n")], ("not valid yaml",), outs=())
cli("recipe-missing", "other", "error", lambda e, d: ["run", str(d / "nope.yaml")], ("does not exist",), outs=())
cli("recipe-empty", "other", "error", lambda e, d: ["run", recipe(d, "")], ("out: required",), outs=())
cli("recipe-model-number", "other", "error", lambda e, d: ["run", recipe(d, f"out: {d / 'out'}\nmodel: 5\n")], ("model:",), outs=())
cli("run-without-recipe-or-corpus", "other", "error", lambda e, d: ["run"], ("needs a recipe",), outs=())

# ---- 6: the same checks for the verbs

cli(
    "corpus-train-tokens-negative",
    "6",
    "error",
    lambda e, d: corpus_cmd(e, d / "out", "--train-tokens", "-5"),
    ("--train-tokens",),
    outs=(),
)
cli(
    "corpus-valid-fraction-1.5",
    "6",
    "error",
    lambda e, d: corpus_cmd(e, d / "out", "--valid-fraction", "1.5"),
    ("--valid-fraction",),
    outs=(),
)
cli("datastore-context-0", "6", "error", lambda e, d: ds_cmd(e, e.base / "corpus", d / "out", "--context", "0"), ("--context",), outs=())
cli("datastore-stride-0", "6", "error", lambda e, d: ds_cmd(e, e.base / "corpus", d / "out", "--stride", "0"), ("--stride",), outs=())
cli("datastore-split-bogus", "6", "error", lambda e, d: ds_cmd(e, e.base / "corpus", d / "out", "--split", "bogus"), ("--split",), outs=())
cli(
    "datastore-context-over-model",
    "6",
    "error",
    lambda e, d: ds_cmd(e, e.base / "corpus", d / "out", "--context", "100000", "--stride", "50000"),
    ("positions",),
    outs=(),
)
cli(
    "datastore-extra-site-garbage",
    "6",
    "error",
    lambda e, d: ds_cmd(e, e.base / "corpus", d / "out", "--extra-sites", "top"),
    ("--extra-sites",),
    outs=(),
)
cli("targets-k-0", "6", "error", lambda e, d: tg_cmd(e, d / "out", "--k", "0"), ("--k",), outs=())
cli("targets-k-over-datastore", "6", "error", lambda e, d: tg_cmd(e, d / "out", "--k", "100000"), ("k=100000",), outs=())
cli("targets-temperature-0", "6", "error", lambda e, d: tg_cmd(e, d / "out", "--temperature", "0"), ("--temperature",), outs=())
cli("targets-temperature-nan", "6", "error", lambda e, d: tg_cmd(e, d / "out", "--temperature", "nan"), ("--temperature",), outs=())
cli("targets-temperature-auto-no-tuning", "6", "error", lambda e, d: tg_cmd(e, d / "out", "--temperature", "auto"), ("--tuning",), outs=())
cli(
    "targets-tuning-missing",
    "6",
    "error",
    lambda e, d: tg_cmd(e, d / "out", "--temperature", "auto", "--tuning", str(d / "k.json")),
    ("does not exist",),
    outs=(),
)
cli(
    "targets-tuning-without-key",
    "6",
    "error",
    lambda e, d: (d.joinpath("k.json").write_text("{}"), tg_cmd(e, d / "out", "--temperature", "auto", "--tuning", str(d / "k.json")))[1],
    ("knn_temperature",),
    outs=(),
)
cli("train-width-0", "6", "error", lambda e, d: train_cmd(e, d / "out", "--width", "0"), ("width",), outs=())
cli("train-lr-none", "6", "error", lambda e, d: train_cmd(e, d / "out", "--lr", "none"), ("--lr",), outs=())
cli("train-epochs-negative", "6", "error", lambda e, d: train_cmd(e, d / "out", "--epochs", "-1"), ("epochs",), outs=())
cli("train-batch-not-multiple", "6", "error", lambda e, d: train_cmd(e, d / "out", "--grad-accum", "5"), ("grad_accum",), outs=())
cli(
    "train-valid-targets-without-valid",
    "6",
    "error",
    lambda e, d: train_cmd(e, d / "out", "--valid-targets", str(e.base / "targets")),
    ("--valid",),
    outs=(),
)
cli("train-input-site-bogus", "6", "error", lambda e, d: train_cmd(e, d / "out", "--input-site", "middle"), ("--input-site",), outs=())
cli(
    "knnlm-k-0",
    "6",
    "error",
    lambda e, d: [
        "knnlm",
        "--corpus",
        str(e.base / "corpus"),
        "--datastore",
        str(e.base / "datastore"),
        "--index",
        str(e.base / "index"),
        "--out",
        str(d / "out"),
        "--k",
        "0",
    ],
    ("--k",),
    outs=(),
)
cli(
    "knnlm-k-over-datastore",
    "6",
    "error",
    lambda e, d: [
        "knnlm",
        "--corpus",
        str(e.base / "corpus"),
        "--datastore",
        str(e.base / "datastore"),
        "--index",
        str(e.base / "index"),
        "--out",
        str(d / "out"),
        "--k",
        "999999",
    ],
    ("rows",),
    outs=(),
)
cli(
    "knnlm-lam-1.5",
    "6",
    "error",
    lambda e, d: [
        "knnlm",
        "--corpus",
        str(e.base / "corpus"),
        "--datastore",
        str(e.base / "datastore"),
        "--index",
        str(e.base / "index"),
        "--out",
        str(d / "out"),
        "--lambda",
        "1.5",
    ],
    ("--lambda",),
    outs=(),
)
cli(
    "knnlm-split-bogus",
    "6",
    "error",
    lambda e, d: ["knnlm", "--corpus", "c", "--datastore", "d", "--index", "i", "--out", str(d / "out"), "--split", "bogus"],
    ("invalid choice",),
    outs=(),
)
cli(
    "index-nprobe-0",
    "6",
    "error",
    lambda e, d: ["index", "--datastore", str(e.base / "datastore"), "--out", str(d / "out"), "--nprobe", "0"],
    ("--nprobe",),
    outs=(),
)
cli(
    "index-kind-bogus",
    "6",
    "error",
    lambda e, d: ["index", "--datastore", str(e.base / "datastore"), "--out", str(d / "out"), "--kind", "Bogus99"],
    ("factory",),
    outs=(),
)
cli(
    "probe-n-items-0",
    "6",
    "error",
    lambda e, d: ["probe", str(e.base / "corpus"), "--out", str(d / "out"), "--n-items", "0"],
    ("positive",),
    outs=(),
)

# ---- other verbs and flags: generate, export, probe, argument parsing, sources

MEM = lambda e: str(e.base / "train" / "memory")  # noqa: E731
cli("generate-lambda-1.5", "other", "error", lambda e, d: ["generate", MEM(e), "hello", "--lambda", "1.5"], ("--lambda",), outs=())
cli(
    "generate-max-new-tokens-0",
    "other",
    "error",
    lambda e, d: ["generate", MEM(e), "hello", "--max-new-tokens", "0"],
    ("--max-new-tokens",),
    outs=(),
)
cli("generate-top-p-0", "other", "error", lambda e, d: ["generate", MEM(e), "hello", "--top-p", "0"], ("--top-p",), outs=())
cli("generate-num-beams-0", "other", "error", lambda e, d: ["generate", MEM(e), "hello", "--num-beams", "0"], ("--num-beams",), outs=())
cli(
    "generate-temperature-negative",
    "other",
    "error",
    lambda e, d: ["generate", MEM(e), "hello", "--temperature", "-1", "--do-sample"],
    ("--temperature",),
    outs=(),
)
cli("generate-missing-model", "other", "error", lambda e, d: ["generate", str(d / "nope"), "hello"], ("does not exist",), outs=())
cli(
    "generate-model-is-file",
    "other",
    "error",
    lambda e, d: (d.joinpath("f").write_text("x"), ["generate", str(d / "f"), "hello"])[1],
    ("is a file",),
    outs=(),
)
cli("generate-no-prompts", "other", "error", lambda e, d: ["generate", MEM(e)], ("no prompts",), outs=())
cli(
    "generate-prompts-file-missing",
    "other",
    "error",
    lambda e, d: ["generate", MEM(e), "--prompts-file", str(d / "p.txt")],
    ("prompts",),
    outs=(),
)
cli("generate-not-a-memory", "other", "error", lambda e, d: ["generate", str(e.base / "corpus"), "hello"], ("",), outs=())
cli(
    "generate-base-model-missing",
    "other",
    "error",
    lambda e, d: ["generate", MEM(e), "hello", "--base-model", str(d / "nomodel")],
    ("",),
    outs=(),
)
cli("generate-ok", "other", "correct", lambda e, d: ["generate", MEM(e), "hello there", "--max-new-tokens", "3"], outs=())
cli("export-lambda-2", "other", "error", lambda e, d: ["export", MEM(e), "--out", str(d / "out"), "--lambda", "2"], ("--lambda",), outs=())
cli(
    "export-memory-temperature-0",
    "other",
    "error",
    lambda e, d: ["export", MEM(e), "--out", str(d / "out"), "--memory-temperature", "0"],
    ("--memory-temperature",),
    outs=(),
)
cli(
    "export-missing-memory",
    "other",
    "error",
    lambda e, d: ["export", str(d / "nope"), "--out", str(d / "out")],
    ("does not exist",),
    outs=(),
)
cli("export-not-a-memory", "other", "error", lambda e, d: ["export", str(e.base / "corpus"), "--out", str(d / "out")], ("",), outs=("out",))
cli(
    "probe-corpus-is-datastore",
    "other",
    "error",
    lambda e, d: ["probe", str(e.base / "datastore"), "--out", str(d / "out")],
    ("`datastore` stage",),
    outs=(),
)
cli("datastore-corpus-missing", "other", "error", lambda e, d: ds_cmd(e, d / "nope", d / "out"), ("does not exist",), outs=())
cli(
    "datastore-corpus-unfinished",
    "other",
    "error",
    lambda e, d: ds_cmd(e, (lambda c: ((c / "manifest.json").unlink(), c)[1])(copy_stage(e, "corpus", d / "c")), d / "out"),
    ("no finished",),
    outs=(),
)
cli(
    "train-datastore-is-targets",
    "other",
    "error",
    lambda e, d: train_cmd(e, d / "out", ds=e.base / "targets"),
    ("`targets` stage",),
    outs=(),
)
cli(
    "train-targets-of-other-datastore",
    "other",
    "error",
    lambda e, d: train_cmd(e, d / "out", ds=e.base / "valid"),
    ("another datastore",),
    outs=(),
)
cli("unknown-verb", "other", "error", lambda e, d: ["frobnicate"], ("invalid choice",), outs=())
cli("unknown-flag", "other", "error", lambda e, d: corpus_cmd(e, d / "out", "--colour", "red"), ("unrecognized",), outs=())
cli("flag-not-a-number", "other", "error", lambda e, d: train_cmd(e, d / "out", "--epochs", "abc"), ("invalid",), outs=())
cli("missing-required-flag", "other", "error", lambda e, d: ["datastore", "--corpus", "x"], ("--out",), outs=())
cli(
    "source-missing",
    "other",
    "error",
    lambda e, d: ["corpus", "--source", str(d / "x.jsonl"), "--out", str(d / "out"), "--model", str(e.model)],
    ("does not exist",),
    outs=(),
)


def _src_case(name, content: bytes, suffix, contains, *flags):
    def argv(e, d):
        p = d / f"src{suffix}"
        if content is not None:
            p.write_bytes(content)
        else:
            p.mkdir()
        return ["corpus", "--source", str(p), "--out", str(d / "out"), "--model", str(e.model), *flags]

    cli(name, "other", "error", argv, contains, outs=(), check=lambda e, d: not (d / "out").exists())


_src_case("source-empty-file", b"", ".jsonl", ("empty",))
_src_case("source-binary", b"\xff\xfe\x00\x01" * 50, ".txt", ("utf-8",))
_src_case("source-empty-folder", None, "", ("no .txt",))
_src_case("source-csv", b"a,b\n1,2\n", ".csv", ("unsupported extension",))
_src_case("source-wrong-field", b'{"body": "x"}\n', ".jsonl", ("--text-field",))
_src_case("source-json-array-lines", b"[1, 2]\n[3]\n", ".jsonl", ("no string field",))
_src_case("source-text-is-number", b'{"text": 5}\n', ".jsonl", ("no string field",))
_src_case("source-one-document", b"just one document here", ".txt", ("at least 3",))
_src_case("source-bad-json-line", b'{"text": "a"}\n{oops\n', ".jsonl", ("line 2",))
_src_case("source-broken-parquet", b"PAR1garbage", ".parquet", ("parquet",))
_src_case("source-bad-xz", b"not xz at all", ".jsonl.xz", ("cannot read",))
cli(
    "corpus-model-missing",
    "other",
    "error",
    lambda e, d: ["corpus", "--source", src(e), "--out", str(d / "out"), "--model", str(d / "nomodel")],
    ("",),
    outs=(),
)

cli("datastore-layer-99", "other", "error", lambda e, d: ds_cmd(e, e.base / "corpus", d / "out", "--layer", "99"), ("layer",), outs=())
cli(
    "datastore-layer-minus-99",
    "other",
    "error",
    lambda e, d: ds_cmd(e, e.base / "corpus", d / "out", "--layer", "-99"),
    ("layer",),
    outs=(),
)
cli("train-input-layer-99", "other", "error", lambda e, d: train_cmd(e, d / "out", "--input-layer", "99"), ("layer",), outs=())
cli(
    "train-online-mode",
    "other",
    "correct",
    lambda e, d: train_cmd(e, d / "out", "--mode", "online", "--epochs", "0.2"),
    check=lambda e, d: (d / "out" / "memory" / "model.safetensors").exists(),
)
cli("generate-empty-prompt", "other", "error", lambda e, d: ["generate", MEM(e), ""], ("prompt",), outs=())
cli("generate-prompts-file-is-folder", "other", "error", lambda e, d: ["generate", MEM(e), "--prompts-file", str(d)], ("prompts",), outs=())
cli(
    "export-base-model-missing",
    "other",
    "error",
    lambda e, d: ["export", MEM(e), "--out", str(d / "out"), "--base-model", str(d / "nomodel")],
    ("",),
    outs=("out",),
)
cli(
    "export-full",
    "other",
    "correct",
    lambda e, d: ["export", MEM(e), "--out", str(d / "out"), "--full"],
    check=lambda e, d: (d / "out" / "model.safetensors").exists() and (d / "out" / "config.json").exists(),
)
cli(
    "knnlm-temperature-0",
    "other",
    "error",
    lambda e, d: [
        "knnlm",
        "--corpus",
        str(e.base / "corpus"),
        "--datastore",
        str(e.base / "datastore"),
        "--index",
        str(e.base / "index"),
        "--out",
        str(d / "out"),
        "--temperature",
        "0",
    ],
    ("--temperature",),
    outs=(),
)
cli(
    "knnlm-temperatures-empty",
    "other",
    "error",
    lambda e, d: [
        "knnlm",
        "--corpus",
        str(e.base / "corpus"),
        "--datastore",
        str(e.base / "datastore"),
        "--index",
        str(e.base / "index"),
        "--out",
        str(d / "out"),
        "--temperatures",
    ],
    ("--temperatures",),
    outs=(),
)
cli(
    "index-ivf-too-many-lists",
    "other",
    "error",
    lambda e, d: ["index", "--datastore", str(e.base / "datastore"), "--out", str(d / "out"), "--kind", "IVF4096,Flat"],
    ("lists",),
    outs=(),
)
cli(
    "probe-context-too-long",
    "other",
    "error",
    lambda e, d: ["probe", str(e.base / "corpus"), "--out", str(d / "out"), "--context-tokens", "100000"],
    ("no room",),
    outs=("out",),
)
cli(
    "probe-model-missing",
    "other",
    "error",
    lambda e, d: ["probe", str(e.base / "corpus"), "--out", str(d / "out"), "--model", str(d / "nomodel")],
    ("",),
    outs=(),
)
cli(
    "targets-queries-missing",
    "other",
    "error",
    lambda e, d: tg_cmd(e, d / "out", "--queries", str(d / "nope")),
    ("does not exist",),
    outs=(),
)
cli(
    "targets-queries-is-corpus",
    "other",
    "error",
    lambda e, d: tg_cmd(e, d / "out", "--queries", str(e.base / "corpus")),
    ("`corpus` stage",),
    outs=(),
)
cli(
    "source-builtin-unknown",
    "other",
    "error",
    lambda e, d: ["corpus", "--source", "builtin:nope", "--out", str(d / "out"), "--model", str(e.model)],
    ("does not exist",),
    outs=(),
)
cli(
    "source-hf-offline",
    "other",
    "error",
    lambda e, d: ["corpus", "--source", "hf:no/such-dataset", "--out", str(d / "out"), "--model", str(e.model)],
    ("",),
    outs=(),
)
cli(
    "run-corpus-missing",
    "other",
    "error",
    lambda e, d: ["run", "--corpus", str(d / "nope.jsonl"), "--model", str(e.model), "--out", str(d / "out")],
    ("does not exist",),
    outs=("out",),
)
cli("no-arguments", "other", "error", lambda e, d: [], ("required",), outs=())
cli("out-empty-string", "other", "error", lambda e, d: corpus_cmd(e, ""), ("not written by mlpmem",), outs=())


# ---- issue 26: every entry point, overrides anywhere, flags that are overrides, numbers as text, plan's inputs


def _lm_eval_case(name, expect, shown, model_args, contains=(), item=None, backend="mlpmem"):
    """`mlpmem-lm-eval --model BACKEND --model_args SHOWN` in this process, on a one-task folder of the case's own."""

    def run(e, d):
        tasks = d / "tasks"
        tasks.mkdir()
        (tasks / "mc.jsonl").write_text(
            "".join(json.dumps({"context": t[:30], "choices": [" a", " b"], "label": 0}) + "\n" for t in ("one two", "three"))
        )
        (tasks / "mc.yaml").write_text(
            f"task: t_hostile\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'mc.jsonl'}\n"
            'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
            'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
        )
        argv = [
            "--model",
            backend,
            "--model_args",
            model_args(e, d),
            "--tasks",
            "t_hostile",
            "--include_path",
            str(tasks),
            "--batch_size",
            "1",
        ]

        def script():
            from mlpmem.lm_eval_cli import main as lm_eval_main

            err = io.StringIO()
            rc = 0
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    lm_eval_main(argv)
                except SystemExit as ex:
                    rc = ex.code if isinstance(ex.code, int) else 1
            return rc, err.getvalue()

        return ["@script", script], None

    CASES.append(
        Case(
            name,
            item or ("26.1" if expect != "correct" else "26.2"),
            expect,
            run,
            contains,
            outs=(),
            what=f"mlpmem-lm-eval --model {backend} --model_args {shown}",
        )
    )


_lm_eval_case("lm-eval-lambda-not-a-number", "error", "memory=MEM,lambda_=abc", lambda e, d: f"memory={MEM(e)},lambda_=abc", ("lambda_",))
_lm_eval_case(
    "lm-eval-weights-sum-over-1",
    "error",
    "memory=MEM;MEM,weights=0.5;0.5;0.5",
    lambda e, d: f"memory={MEM(e)};{MEM(e)},weights=0.5;0.5;0.5",
    ("sum to 1",),
)
_lm_eval_case("lm-eval-mixing-bogus", "error", "memory=MEM,mixing=bogus", lambda e, d: f"memory={MEM(e)},mixing=bogus", ("mixing",))
_lm_eval_case("lm-eval-no-memory", "error", "base_model=MODEL", lambda e, d: f"base_model={e.model}", ("memory=path",))
_lm_eval_case("lm-eval-memory-missing", "error", "memory=CASE/nope", lambda e, d: f"memory={d / 'nope'}", ("nope",))
_lm_eval_case("lm-eval-device-model-arg", "correct", "memory=MEM,device=cpu", lambda e, d: f"memory={MEM(e)},device=cpu")


def _torchrun_bad_recipe(e, d):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "mlpmem",
        "run",
        str(d / "nope.yaml"),
    ]
    seen = {}

    def script():
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        seen["stderr"] = r.stderr
        # what the ranks printed; torchrun's own report of a failed worker (ChildFailedError, its traceback) is torchrun's
        ours = "\n".join(line for line in r.stderr.splitlines() if line.startswith("mlpmem:"))
        return (2 if "exitcode  : 2" in r.stderr else r.returncode), ours

    return ["@script", script], lambda: seen["stderr"].count("mlpmem: error:") == 1


CASES.append(
    Case(
        "torchrun-user-error-once",
        "26.1",
        "error",
        _torchrun_bad_recipe,
        ("does not exist",),
        outs=(),
        what="torchrun --nproc-per-node 2 -m mlpmem run CASE/nope.yaml: one message (rank 0's), each rank exits 2",
    )
)


def _plan_recipe(e, d, body=""):
    return recipe(
        d,
        f"out: {d / 'out'}\nmodel: {e.model}\ncorpus:\n  source: {src(e)}\n  train_tokens: 2000\n"
        "datastore:\n  context: 32\n  stride: 16\nknn:\n  k: 16\ntargets:\n  top_m: 8\ntrain:\n  epochs: 1\n  batch_size: 64\n  n_blocks: 1\n"
        + body,
    )


def _throughputs(d, **change):
    p = d / "tp.json"
    p.write_text(
        json.dumps(
            {
                "extract_rows_s": 100.0,
                "score_rows_s": 100.0,
                "search_qps": 100.0,
                "search_rows": 50000,
                "train_positions_s": 1000.0,
                **change,
            }
        )
    )
    return str(p)


cli(
    "run-override-after-flags",
    "26.3",
    "error",
    lambda e, d: ["run", _plan_recipe(e, d), "--out", str(d / "out"), "train.lr=abc"],
    ("train.lr",),
    outs=(),
    check=lambda e, d: not (d / "out").exists(),
)
cli(
    "plan-override-after-flags",
    "26.3",
    "correct",
    lambda e, d: ["plan", _plan_recipe(e, d), "--throughputs", _throughputs(d), "train.epochs=2"],
    outs=(),
)
cli(
    "plan-lr-1e-4",
    "26.4",
    "correct",
    lambda e, d: ["plan", _plan_recipe(e, d, "  lr: 1e-4\n"), "--throughputs", _throughputs(d), "train.weight_decay=1e-2"],
    outs=(),
)
cli(
    "run-corpus-flag-with-recipe",
    "26.5",
    "error",
    lambda e, d: ["run", _plan_recipe(e, d), "--corpus", str(d / "missing.jsonl")],
    ("corpus.source",),
    outs=(),
    check=lambda e, d: not (d / "out").exists(),
)
cli(
    "run-model-flag-and-override",
    "26.5",
    "error",
    lambda e, d: ["run", _plan_recipe(e, d), "--model", "gpt2", "model=gpt2-medium"],
    ("same setting",),
    outs=(),
)
cli(
    "tasks-flag-of-other-action",
    "26.5",
    "error",
    lambda e, d: ["tasks", "source", "--out", str(d / "out"), "--corpus", str(e.base / "corpus")],
    ("tasks build",),
    outs=(),
)
cli(
    "targets-tuning-with-number",
    "26.5",
    "error",
    lambda e, d: tg_cmd(e, d / "out", "--temperature", "2", "--tuning", str(d / "k.json")),
    ("--tuning",),
    outs=(),
)
cli(
    "plan-train-tokens-negative",
    "26.6",
    "error",
    lambda e, d: ["plan", _plan_recipe(e, d), "--train-tokens", "-5"],
    ("--train-tokens",),
    outs=(),
)
cli(
    "plan-throughputs-zero",
    "26.6",
    "error",
    lambda e, d: ["plan", _plan_recipe(e, d), "--throughputs", _throughputs(d, search_qps=0)],
    ("search_qps",),
    outs=(),
)
cli(
    "plan-throughputs-text",
    "26.6",
    "error",
    lambda e, d: ["plan", _plan_recipe(e, d), "--throughputs", _throughputs(d, train_positions_s="fast")],
    ("train_positions_s",),
    outs=(),
)
cli(
    "plan-knn-k-over-train-tokens",
    "26.6",
    "error",
    lambda e, d: [
        "plan",
        _plan_recipe(e, d),
        "corpus.train_tokens=null",
        "--train-tokens",
        "500",
        "knn.k=1024",
        "--throughputs",
        _throughputs(d),
    ],
    ("knn.k=1024",),
    outs=(),
)
cli(
    "plan-absurd-batch",
    "26.6",
    "error",
    lambda e, d: ["plan", _plan_recipe(e, d), "datastore.batch_size=100000000", "--throughputs", _throughputs(d)],
    ("datastore.batch_size",),
    outs=(),
)
cli(
    "plan-json-folder-missing",
    "26.6",
    "error",
    lambda e, d: ["plan", _plan_recipe(e, d), "--json", str(d / "no" / "plan.json")],
    ("does not exist",),
    outs=(),
    check=lambda e, d: not list(d.rglob("*.json*")),
)


# ---- 7: integrity


def _damage(path: Path, offset: int = None, truncate: bool = False):
    data = bytearray(path.read_bytes())
    if truncate:
        path.write_bytes(bytes(data[: len(data) // 2]))
        return
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _damaged_ds(e, d, truncate=False, delete=False):
    ds = copy_stage(e, "datastore", d / "ds")
    f = ds / "keys-00000.npy"
    if delete:
        f.unlink()
    else:
        _damage(f, truncate=truncate)
    return ds


cli(
    "keys-bytes-overwritten",
    "7",
    "error",
    lambda e, d: ["index", "--datastore", str(_damaged_ds(e, d)), "--out", str(d / "out")],
    ("corrupted",),
    outs=("out", "ds"),
)
cli(
    "keys-truncated",
    "7",
    "error",
    lambda e, d: ["index", "--datastore", str(_damaged_ds(e, d, truncate=True)), "--out", str(d / "out")],
    ("truncated",),
    outs=("out", "ds"),
)
cli(
    "keys-deleted",
    "7",
    "error",
    lambda e, d: ["index", "--datastore", str(_damaged_ds(e, d, delete=True)), "--out", str(d / "out")],
    ("missing",),
    outs=("out", "ds"),
)
cli(
    "keys-overwritten-train-refuses",
    "7",
    "error",
    lambda e, d: train_cmd(e, d / "out", ds=_damaged_ds(e, d)),
    ("corrupted",),
    outs=("out", "ds"),
)


def _damaged_memory(e, d):
    t = copy_stage(e, "train", d / "t")
    _damage(t / "memory" / "model.safetensors")
    return t / "memory"


cli(
    "memory-bytes-overwritten-generate",
    "7",
    "error",
    lambda e, d: ["generate", str(_damaged_memory(e, d)), "hello"],
    ("corrupted",),
    outs=("t",),
)
cli(
    "memory-bytes-overwritten-export",
    "7",
    "error",
    lambda e, d: ["export", str(_damaged_memory(e, d)), "--out", str(d / "out")],
    ("corrupted",),
    outs=("out", "t"),
)
cli(
    "targets-probs-overwritten",
    "7",
    "error",
    lambda e, d: train_cmd(e, d / "out", tg=(lambda t: (_damage(t / "probs-00000.npy"), t)[1])(copy_stage(e, "targets", d / "tg"))),
    ("corrupted",),
    outs=("out", "tg"),
)
cli(
    "manifest-garbage",
    "7",
    "error",
    lambda e, d: [
        "index",
        "--datastore",
        str((lambda ds: ((ds / "manifest.json").write_text("{x"), ds)[1])(copy_stage(e, "datastore", d / "ds"))),
        "--out",
        str(d / "out"),
    ],
    ("not valid json",),
    outs=("out", "ds"),
)
cli(
    "train-manifest-lists-hashes",
    "7",
    "correct",
    lambda e, d: train_cmd(e, copy_stage(e, "train", d / "out")),
    check=lambda e, d: (
        {r["file"] for r in json.loads((d / "out" / "manifest.json").read_text())["files"]}
        >= {"memory/model.safetensors", "memory/memory_config.json"}
        and all("sha256" in r and "sample_sha256" in r for r in json.loads((d / "out" / "manifest.json").read_text())["files"])
    ),
)


def _big_ds_verify(e, d):
    """A keys file larger than the sampled blocks, changed where no block looks: --verify finds it."""
    import helpers

    p = d / "big.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in helpers.make_texts(60, 200, seed=2)))
    assert run_cli(["corpus", "--source", str(p), "--out", str(d / "c"), "--model", str(e.model)])[0] == 0
    assert run_cli(ds_cmd(e, d / "c", d / "ds", "--windows-per-shard", "100000"))[0] == 0
    f = d / "ds" / "keys-00000.npy"
    assert f.stat().st_size > 5 * (64 << 10)
    _damage(f, offset=f.stat().st_size // 8 + 1000)
    assert run_cli(["index", "--datastore", str(d / "ds"), "--out", str(d / "ix0")])[0] == 0  # sampled check: not seen (documented)
    return ["index", "--datastore", str(d / "ds"), "--out", str(d / "out"), "--verify"]


CASES.append(
    Case(
        "verify-finds-unsampled-damage",
        "7",
        "error",
        lambda e, d: (_big_ds_verify(e, d), None),
        ("corrupted",),
        outs=("out", "ix0", "c", "ds"),
        what="mlpmem index --datastore DS --verify (one byte changed outside the sampled blocks of a 1.3 MB keys file)",
    )
)


def _unfinished_ds_with_deleted_shard(e, d):
    """An interrupted datastore whose finished shard file is deleted: the resume redoes it."""
    from mlpmem import datastore as dsmod

    out = d / "out"
    real, calls = dsmod.save_npy, {"n": 0}

    def crash(path, arr):
        calls["n"] += 1
        if calls["n"] == 4:  # after shard 0's keys + values, during shard 1
            raise KeyboardInterrupt
        return real(path, arr)

    dsmod.save_npy = crash
    try:
        rc = run_cli(ds_cmd(e, e.base / "corpus", out))[0]
    finally:
        dsmod.save_npy = real
    assert rc == 130, rc
    (out / "keys-00000.npy").unlink()
    return ds_cmd(e, e.base / "corpus", out)


def _same_files(a: Path, b: Path, pattern="*.npy") -> bool:
    names = sorted(p.name for p in a.glob(pattern))
    return (
        names == sorted(p.name for p in b.glob(pattern))
        and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
        and bool(names)
    )


CASES.append(
    Case(
        "resume-redoes-deleted-shard",
        "7",
        "correct",
        lambda e, d: (_unfinished_ds_with_deleted_shard(e, d), lambda: _same_files(d / "out", e.base / "datastore")),
        what="datastore interrupted, a finished shard's keys file deleted, then resumed: same bytes as a clean run",
    )
)


def _interrupted_train(e, d, damage: str):
    """Train stopped after 3 checkpoints; the newest damaged; the resume must fall back and end byte-identical."""
    from mlpmem.train import loop as trmod  # the training loop calls save_checkpoint from its own namespace

    out = d / "out"
    real = trmod.save_checkpoint
    count = {"n": 0}

    def stop_after(*a, **k):
        r = real(*a, **k)
        count["n"] += 1
        if count["n"] == 3:
            raise KeyboardInterrupt
        return r

    trmod.save_checkpoint = stop_after
    try:
        rc = run_cli(train_cmd(e, out))[0]
    finally:
        trmod.save_checkpoint = real
    assert rc == 130, rc
    ckpts = sorted((out / "checkpoints").iterdir())
    newest = ckpts[-1]
    if damage == "truncate":
        _damage(newest / "optimizer.safetensors", truncate=True)
    elif damage == "flip":
        _damage(newest / "model.safetensors")
    elif damage == "state":
        (newest / "state.json").write_text("{garbage")
    elif damage == "all":
        for c in ckpts:
            _damage(c / "model.safetensors", truncate=True)
    return train_cmd(e, out)


for dmg in ("truncate", "flip", "state", "all"):
    CASES.append(
        Case(
            f"train-resume-newest-checkpoint-{dmg}",
            "7",
            "correct",
            (
                lambda dmg: (
                    lambda e, d: (
                        _interrupted_train(e, d, dmg),
                        lambda: (
                            (d / "out" / "memory" / "model.safetensors").read_bytes()
                            == (e.base / "train" / "memory" / "model.safetensors").read_bytes()
                        ),
                    )
                )
            )(dmg),
            what=f"train interrupted after 3 checkpoints, newest checkpoint damaged ({dmg}), resumed: same memory bytes as a clean run",
        )
    )


def _kill9(stage: str):
    def run(e, d):
        out = d / "out"
        if stage == "datastore":
            argv = ds_cmd(e, e.base / "corpus", out, "--windows-per-shard", "8")
            ready = lambda: len(list(out.glob("progress-*.json"))) >= 2  # noqa: E731  one record per finished shard
        elif stage == "targets":
            ds = copy_stage(e, "datastore", d / "ds")
            argv = tg_cmd(e, out, "--batch-size", "4", ds=ds)
            ready = lambda: any(out.glob("progress*.json"))  # noqa: E731
        else:
            argv = train_cmd(e, out, "--batch-size", "32", "--ckpt-every", "2")
            ready = lambda: (
                (out / "checkpoints").is_dir() and len([p for p in (out / "checkpoints").iterdir() if not p.name.endswith(".partial")]) >= 2
            )  # noqa: E731
        env = {**os.environ, "TQDM_DISABLE": "1"}
        cmd = [sys.executable, "-m", "mlpmem.cli", *map(str, argv)]

        def script():
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                try:
                    if ready():
                        proc.send_signal(signal.SIGKILL)
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.005)
            proc.wait()
            if proc.returncode != -signal.SIGKILL:
                return 1, "the run finished before it could be killed"
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            return r.returncode, r.stderr

        def check():
            if stage == "datastore":
                ref = d / "ref"
                assert run_cli(ds_cmd(e, e.base / "corpus", ref, "--windows-per-shard", "8"))[0] == 0
                return _same_files(out, ref) and not list(out.glob("*.partial"))
            if stage == "targets":
                ref = d / "ref"
                assert run_cli(tg_cmd(e, ref, "--batch-size", "4", ds=d / "ds"))[0] == 0
                return _same_files(out, ref)
            ref = d / "ref"  # in a process of its own too: the thread count changes float sums
            subprocess.run(
                [sys.executable, "-m", "mlpmem.cli", *map(str, train_cmd(e, ref, "--batch-size", "32", "--ckpt-every", "2"))],
                env=env,
                capture_output=True,
                check=True,
            )
            return (out / "memory" / "model.safetensors").read_bytes() == (ref / "memory" / "model.safetensors").read_bytes()

        return ["@script", script], check

    return run


for st in ("datastore", "targets", "train"):
    CASES.append(
        Case(
            f"kill9-{st}-resume",
            "7",
            "correct",
            _kill9(st),
            outs=("out", "ref", "ds"),
            what=f"mlpmem {st} killed with SIGKILL mid-run, run again: byte-identical to a clean run",
        )
    )

# ---- 8: resources


def _enospc_on(module_attr: tuple[object, str], nth: int, argv_fn, again=True):
    """Make the nth call of ``module.attr`` fail with ENOSPC, run the command, then run it again without the fault."""

    def run(e, d):
        mod, attr = module_attr
        argv = [str(a) for a in argv_fn(e, d)]

        def script():
            real, calls = getattr(mod, attr), {"n": 0}

            def full(*a, **k):
                calls["n"] += 1
                if calls["n"] == nth:
                    raise OSError(errno.ENOSPC, "No space left on device", str(a[0]) if a else None)
                return real(*a, **k)

            setattr(mod, attr, full)
            try:
                rc, err, tb = run_cli(argv)
            finally:
                setattr(mod, attr, real)
            if tb:
                raise RuntimeError(tb)
            e.extra[d.name] = (rc, err)
            return rc, err

        def check():
            out = d / "out"
            partial = [p for p in out.rglob("*.partial")]
            if partial:
                return False
            rc2, _, _ = run_cli(argv) if again else (0, "", None)
            return rc2 == 0 and (out / "manifest.json").exists()

        return ["@script", script], check

    return run


CASES.append(
    Case(
        "enospc-datastore-shard",
        "8",
        "error",
        lambda e, d: _enospc_on((__import__("numpy"), "save"), 3, lambda e, d: ds_cmd(e, e.base / "corpus", d / "out"))(e, d),
        ("disk is full",),
        what="disk full while writing a datastore shard; then the same command with space",
    )
)
CASES.append(
    Case(
        "enospc-train-checkpoint",
        "8",
        "error",
        lambda e, d: _enospc_on((__import__("safetensors.torch", fromlist=["x"]), "save_file"), 3, lambda e, d: train_cmd(e, d / "out"))(
            e, d
        ),
        ("disk is full",),
        what="disk full while writing a training checkpoint; then the same command with space",
    )
)
CASES.append(
    Case(
        "enospc-corpus",
        "8",
        "error",
        lambda e, d: _enospc_on((__import__("numpy"), "save"), 2, lambda e, d: corpus_cmd(e, d / "out"))(e, d),
        ("disk is full",),
        what="disk full while writing the corpus; then the same command with space",
    )
)


def _tiny_disk(argv_fn, free=10 << 20):
    def run(e, d):
        argv = argv_fn(e, d)

        def script():
            import shutil as sh

            real = sh.disk_usage
            sh.disk_usage = lambda p: real(p)._replace(free=free)
            try:
                rc, err, tb = run_cli([str(a) for a in argv])
            finally:
                sh.disk_usage = real
            if tb:
                raise RuntimeError(tb)
            return rc, err

        return ["@script", script], None

    return run


CASES.append(
    Case(
        "datastore-no-space-message",
        "8",
        "error",
        _tiny_disk(lambda e, d: ds_cmd(e, e.base / "corpus", d / "out")),
        ("not enough disk space", "mib", "--train-tokens"),
        outs=("out",),
        what="datastore on a disk with 10 MiB free",
    )
)
CASES.append(
    Case(
        "train-no-space-check",
        "8",
        "error",
        _tiny_disk(lambda e, d: train_cmd(e, d / "out")),
        ("not enough disk space", "checkpoints"),
        outs=("out",),
        what="train on a disk with 10 MiB free",
    )
)
cli("out-not-writable-sys", "8", "error", lambda e, d: corpus_cmd(e, "/sys/mlpmem-hostile"), ("cannot create",), outs=())
cli("out-under-proc", "8", "error", lambda e, d: corpus_cmd(e, "/proc/mlpmem-hostile/x"), ("cannot create",), outs=())


def _locked(e, d, alive: bool, garbage: bool = False):
    out = copy_stage(e, "corpus", d / "out")
    (out / "manifest.json").unlink()  # an unfinished corpus: the next run writes it
    if garbage:
        (out / ".mlpmem.lock").write_text("{half")
        old = time.time() - 60
        os.utime(out / ".mlpmem.lock", (old, old))
        return corpus_cmd(e, out)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) if alive else subprocess.Popen(["true"])
    if not alive:
        proc.wait()
    else:
        e.extra.setdefault("procs", []).append(proc)
    import socket

    (out / ".mlpmem.lock").write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "since": "earlier"}))
    return corpus_cmd(e, out)


cli("lock-held-by-live-process", "8", "refusal", lambda e, d: _locked(e, d, True), ("another mlpmem process", "pid"), outs=())
cli(
    "stale-lock-taken-over",
    "8",
    "correct",
    lambda e, d: _locked(e, d, False),
    check=lambda e, d: (d / "out" / "manifest.json").exists() and not (d / "out" / ".mlpmem.lock").exists(),
)
cli(
    "garbage-lock-taken-over",
    "8",
    "correct",
    lambda e, d: _locked(e, d, False, garbage=True),
    check=lambda e, d: (d / "out" / "manifest.json").exists(),
)


def _two_trains(e, d):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    # long enough (several seconds) to be still running when the second, a fresh process, starts
    cmd = [sys.executable, "-m", "mlpmem.cli", *map(str, train_cmd(e, d / "out", "--epochs", "4", "--batch-size", "16"))]

    def script():
        a = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not (d / "out" / ".mlpmem.lock").exists() and time.time() < deadline and a.poll() is None:
            time.sleep(0.01)
        b = subprocess.run(cmd, env=env, capture_output=True, text=True)
        a_err = a.communicate()[1]
        if a.returncode != 0:
            return a.returncode, a_err
        return b.returncode, b.stderr

    return ["@script", script], lambda: (d / "out" / "manifest.json").exists()


CASES.append(
    Case(
        "two-trains-one-folder",
        "8",
        "refusal",
        _two_trains,
        ("another mlpmem process",),
        what="two `mlpmem train` into one folder at once: the second is refused, the first finishes",
    )
)


def _interrupt(e, d):
    def script():
        import mlpmem.corpus as c

        real = c.tokenize_split
        c.tokenize_split = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
        try:
            rc, err, tb = run_cli(corpus_cmd(e, d / "out"))
        finally:
            c.tokenize_split = real
        if tb:
            raise RuntimeError(tb)
        return rc, err

    return ["@script", script], lambda: run_cli(corpus_cmd(e, d / "out"))[0] == 0


CASES.append(
    Case(
        "ctrl-c-then-rerun",
        "8",
        "interrupted",
        _interrupt,
        ("run the same command again",),
        what="Ctrl-C during the corpus stage (exit 130, one line), then the same command finishes",
    )
)


# ---- issue 26, more: 26.7 one rule for writers, 26.8 integrity of exports, 26.9 mixing settings,
# ---- 26.10 old spellings and split sizes, 26.11 one more bad input for every entry point


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (markers too) and its sha256: equal before and after = byte-identical, nothing added."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def hf_folder(e: Env, d: Path, name: str = "hf") -> Path:
    """A Hugging Face model folder of someone else's: the set-up's tiny model (config.json, model.safetensors, tokenizer files)."""
    return Path(shutil.copytree(e.model, d / name))


def untouched(name, item, argv_fn, folder_fn, contains=(), what=""):
    """A refused CLI case whose target folder ``folder_fn(env, cdir)`` (made by ``argv_fn``) is byte-identical after, nothing added."""

    def run(e, d):
        argv = argv_fn(e, d)
        folder = folder_fn(e, d)
        before = _digest(folder)
        return argv, lambda: _digest(folder) == before

    CASES.append(Case(name, item, "refusal", run, contains, outs=(), what=what))


@contextlib.contextmanager
def _log_to(stream):
    """mlpmem's log warnings into ``stream`` while the block runs, as the command line (and a script's logging) shows them."""
    h = logging.StreamHandler(stream)
    h.setLevel(logging.WARNING)
    logger = logging.getLogger("mlpmem")
    logger.addHandler(h)
    try:
        yield
    finally:
        logger.removeHandler(h)


def lib(name, item, expect, fn, contains=(), outs=("out",), what="", warns=()):
    """A library case: ``fn(env, cdir)`` sets up and returns ``(act, check)``; ``act()`` is the call, in this process.
    An MlpmemError it raises is the one paragraph a user sees (exit 2 here); any other exception is a traceback.
    ``warns``: phrases mlpmem's log must show (its warnings are the case's stderr)."""

    def run(e, d):
        act, check = fn(e, d)
        seen = {"err": ""}

        def script():
            err = io.StringIO()
            with _log_to(err), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    act()
                except MlpmemError as ex:
                    print(f"mlpmem: error: {ex}", file=err)
                    return 2, err.getvalue()
            seen["err"] = err.getvalue()
            return 0, seen["err"]

        if warns:
            inner = check
            check = lambda: all(w.lower() in seen["err"].lower() for w in warns) and (inner is None or inner())  # noqa: E731
        return ["@script", script], check

    CASES.append(Case(name, item, expect, run, contains, outs, what))


def _call(make, check=None):
    """(act, check) for :func:`lib`: act keeps what ``make()`` returns, check tests it."""
    got = {}
    return (lambda: got.setdefault("r", make())), ((lambda: bool(check(got["r"]))) if check else None)


def cli_warned(name, item, argv_fn, warns, check=None, what=""):
    """A CLI case that succeeds with a warning: exit 0, each of ``warns`` on stderr (mlpmem's log), then ``check(env, cdir)``."""

    def run(e, d):
        argv = [str(a) for a in argv_fn(e, d)]
        seen = {"err": ""}

        def script():
            err = io.StringIO()
            with _log_to(err):
                rc, stderr, tb = run_cli(argv)
            if tb:
                raise RuntimeError(tb)
            seen["err"] = stderr + err.getvalue()
            return rc, seen["err"]

        return ["@script", script], lambda: all(w.lower() in seen["err"].lower() for w in warns) and (check is None or check(e, d))

    CASES.append(Case(name, item, "correct", run, outs=("out",), what=what))


def _fixture(e: Env, name: str, build: Callable[[Path], None]) -> Path:
    """A fixture built once per session in ROOT/fixtures/NAME (outside every case): cases read it or copy what they change."""
    if name not in e.extra:
        path = e.root / "fixtures" / name
        path.mkdir(parents=True)
        build(path)
        e.extra[name] = path
    return e.extra[name]


def _run_recipe(e: Env, out: Path, mixing: str = "gated") -> str:
    """A whole-run recipe small enough for a case (about 5 s on one core): 300 valid tokens, enough for the gate's 257."""
    p = out.parent / f"recipe-{mixing}.yaml"
    p.write_text(
        f"out: {out}\nmodel: {e.model}\ncorpus:\n  source: {src(e)}\n  valid_tokens: 300\ndatastore:\n  context: 32\n  stride: 16\n"
        "knn:\n  k: 16\ntargets:\n  top_m: 8\ntrain:\n  epochs: 1\n  batch_size: 64\n  n_blocks: 1\n  eval_every: 0\n  ckpt_every: 0\n"
        f"  init: lm_head\neval:\n  mixing: {mixing}\ngate:\n  steps: 30\n  hidden: 4\n"
    )
    return str(p)


def gated_run(e: Env) -> Path:
    """A finished `mlpmem run` with eval.mixing: gated (RUN/gate, RUN/report.json), built once."""

    def build(p):
        rc, err, tb = run_cli(["run", _run_recipe(e, p / "run")])
        assert rc == 0 and tb is None, err + (tb or "")

    return _fixture(e, "gated", build) / "run"


def _run_copy(e: Env, d: Path, gate: bool = True, stale: bool = False) -> Path:
    """The gated run copied into the case (without its gate, or with the gate's memory fingerprint edited: a stale gate)."""
    run = Path(shutil.copytree(gated_run(e), d / "run", symlinks=True))
    if not gate:
        shutil.rmtree(run / "gate")
    if stale:
        cfg = json.loads((run / "gate" / "gate_config.json").read_text())
        cfg["meta"]["memory_fingerprint"] = "0" * 16
        (run / "gate" / "gate_config.json").write_text(json.dumps(cfg))
    return run


def saves(e: Env) -> Path:
    """Models saved by the model class, built once: two/ (two memories, by reference), full/ (a full export),
    gated/ and gated_full/ (the gated run's memory with its gate)."""

    def build(p):
        import torch

        from mlpmem.transformers_integration import MLPMemoryForCausalLM
        from mlpmem.memory import MLPMemory

        two = MLPMemoryForCausalLM.from_memory(MEM(e), lambda_=0.3)
        torch.manual_seed(7)
        two.add_memory(MLPMemory(two.memory.config), name="b", meta=two.component_meta("memory"))  # its own random weights
        two.save_pretrained(p / "two")
        MLPMemoryForCausalLM.from_memory(MEM(e), lambda_=0.3).save_pretrained(p / "full", full_export=True)
        g = MLPMemoryForCausalLM.from_memory(gated_run(e) / "train" / "memory")
        assert g.mixing_mode == "gated"
        g.save_pretrained(p / "gated")
        g.save_pretrained(p / "gated_full", full_export=True)

    return _fixture(e, "saves", build)


def _saved_copy(e: Env, d: Path, which: str) -> Path:
    return Path(shutil.copytree(saves(e) / which, d / which))


def _hf():
    from mlpmem.transformers_integration import MLPMemoryForCausalLM

    return MLPMemoryForCausalLM


# ---- 26.7 one rule for writers: export and save_pretrained write only into a new or empty folder, or an earlier save

untouched(
    "export-into-hf-model-folder",
    "26.7",
    lambda e, d: ["export", MEM(e), "--out", str(hf_folder(e, d))],
    lambda e, d: d / "hf",
    ("not written by mlpmem",),
    what="mlpmem export MEM --out CASE/hf (a Hugging Face model folder of someone else's): refused, the folder byte-identical",
)
untouched(
    "export-full-into-hf-model-folder",
    "26.7",
    lambda e, d: ["export", MEM(e), "--out", str(hf_folder(e, d)), "--full"],
    lambda e, d: d / "hf",
    ("not written by mlpmem",),
    what="mlpmem export MEM --out CASE/hf --full (someone else's model folder): refused, the folder byte-identical",
)
untouched(
    "export-into-datastore-folder",
    "26.7",
    lambda e, d: ["export", MEM(e), "--out", str(copy_stage(e, "datastore", d / "out"))],
    lambda e, d: d / "out",
    ("`datastore` stage",),
    what="mlpmem export MEM --out CASE/out (a copy of a run's datastore/)",
)
untouched(
    "export-into-index-folder",
    "26.7",
    lambda e, d: ["export", MEM(e), "--out", str(copy_stage(e, "index", d / "out"))],
    lambda e, d: d / "out",
    ("`index` stage",),
    what="mlpmem export MEM --out CASE/out (a copy of a run's index/)",
)
untouched(
    "export-into-run-folder",
    "26.7",
    lambda e, d: ["export", str(_run_copy(e, d) / "train" / "memory"), "--out", str(d / "run")],
    lambda e, d: d / "run",
    ("`run` stage",),
    what="mlpmem export RUN/train/memory --out RUN (the run folder itself)",
)
untouched(
    "export-into-memory-folder-itself",
    "26.7",
    lambda e, d: ["export", str(copy_stage(e, "train", d / "t") / "memory"), "--out", str(d / "t" / "memory")],
    lambda e, d: d / "t",
    ("inside the memory folder",),
    what="mlpmem export CASE/t/memory --out CASE/t/memory",
)
untouched(
    "export-into-base-model-folder",
    "26.7",
    lambda e, d: ["export", MEM(e), "--base-model", str(hf_folder(e, d, "model")), "--out", str(d / "model")],
    lambda e, d: d / "model",
    ("not written by mlpmem",),
    what="mlpmem export MEM --base-model CASE/model --out CASE/model (into the base model's own folder)",
)


def _save_into(e, d, target: Callable[[Env, Path], Path], full: bool = False, memory: Callable[[Env, Path], Path] | None = None):
    """save_pretrained of the memory's model into ``target(env, cdir)``: refused, the folder byte-identical."""
    folder = target(e, d)
    mem = memory(e, d) if memory else Path(MEM(e))
    before = _digest(folder)

    def act():
        _hf().from_memory(mem, lambda_=0.3).save_pretrained(folder, full_export=full)

    return act, lambda: _digest(folder) == before


lib(
    "save-pretrained-into-own-memory-folder",
    "26.7",
    "refusal",
    lambda e, d: _save_into(e, d, lambda e, d: d / "t" / "memory", memory=lambda e, d: copy_stage(e, "train", d / "t") / "memory"),
    ("memory folder of mlpmem's train stage",),
    outs=(),
    what="MLPMemoryForCausalLM.from_memory(RUN/train/memory).save_pretrained(RUN/train/memory)",
)
lib(
    "save-pretrained-into-train-folder",
    "26.7",
    "refusal",
    lambda e, d: _save_into(e, d, lambda e, d: copy_stage(e, "train", d / "t")),
    ("`memory` folder",),
    outs=(),
    what="from_memory(MEM).save_pretrained(RUN/train) (the train stage's folder)",
)
lib(
    "save-pretrained-into-datastore-folder",
    "26.7",
    "refusal",
    lambda e, d: _save_into(e, d, lambda e, d: copy_stage(e, "datastore", d / "ds")),
    ("`datastore` folder",),
    outs=(),
    what="from_memory(MEM).save_pretrained(RUN/datastore)",
)
lib(
    "save-pretrained-into-hf-model-folder",
    "26.7",
    "refusal",
    lambda e, d: _save_into(e, d, hf_folder),
    ("no earlier save", "config.json"),
    outs=(),
    what="from_memory(MEM).save_pretrained(HF_MODEL) (a Hugging Face model folder of someone else's)",
)
lib(
    "save-pretrained-full-into-hf-model-folder",
    "26.7",
    "refusal",
    lambda e, d: _save_into(e, d, hf_folder, full=True),
    ("no earlier save",),
    outs=(),
    what="from_memory(MEM).save_pretrained(HF_MODEL, full_export=True)",
)
lib(
    "save-pretrained-into-user-folder",
    "26.7",
    "refusal",
    lambda e, d: _save_into(e, d, lambda e, d: user_folder(d)),
    ("thesis.txt",),
    outs=(),
    what="from_memory(MEM).save_pretrained(CASE/out) (a folder holding the user's thesis.txt)",
)


def _save_twice(e, d, full_second: bool):
    out = d / "out"

    def act():
        m = _hf().from_memory(MEM(e), lambda_=0.3)
        m.save_pretrained(out)
        m.set_lambda(0.6)
        m.save_pretrained(out, full_export=full_second)

    def check():
        loaded = _hf().from_pretrained(out)
        return (
            abs(loaded.lambda_ - 0.6) < 1e-9
            and (out / "memory").is_dir() != full_second
            and (out / "model.safetensors").exists() == full_second
        )

    return act, check


lib(
    "save-pretrained-twice-into-own-folder",
    "26.7",
    "correct",
    lambda e, d: _save_twice(e, d, False),
    what="save_pretrained(CASE/out), lambda changed, save_pretrained(CASE/out) again: replaced, loads with the new lambda",
)
lib(
    "save-pretrained-then-full-export-same-folder",
    "26.7",
    "correct",
    lambda e, d: _save_twice(e, d, True),
    what="save_pretrained(CASE/out) by reference, then full_export=True into it: memory/ gone, loads as the full export",
)
lib(
    "save-pretrained-into-export-folder",
    "26.7",
    "correct",
    lambda e, d: (
        run_cli(["export", MEM(e), "--out", str(d / "out")]),
        _call(
            lambda: _hf().from_memory(MEM(e), lambda_=0.7).save_pretrained(d / "out"),
            lambda _: abs(_hf().from_pretrained(d / "out").lambda_ - 0.7) < 1e-9,
        ),
    )[1],
    what="mlpmem export MEM --out CASE/out, then save_pretrained(CASE/out): an earlier save of ours, replaced",
)
cli(
    "export-into-save-pretrained-folder",
    "26.7",
    "correct",
    lambda e, d: (
        _hf().from_memory(MEM(e), lambda_=0.7).save_pretrained(d / "out"),
        ["export", MEM(e), "--out", str(d / "out"), "--lambda", "0.2"],
    )[1],
    check=lambda e, d: abs(json.loads((d / "out" / "config.json").read_text())["lambda_"] - 0.2) < 1e-9,
    what="save_pretrained(CASE/out), then mlpmem export MEM --out CASE/out --lambda 0.2: an earlier save of ours, replaced",
)

# ---- 26.8 integrity of exports: a saved model that changed is refused on load, naming the file


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def _load_damaged(which: str, damage: Callable[[Path], None], check=None):
    def fn(e, d):
        s = _saved_copy(e, d, which)
        damage(s)
        return _call(lambda: _hf().from_pretrained(s), check)

    return fn


lib(
    "saved-unchanged-loads",
    "26.8",
    "correct",
    lambda e, d: (lambda s: _call(lambda: _hf().from_pretrained(s), lambda m: m.memory_names == ["memory", "b"]))(_saved_copy(e, d, "two")),
    outs=(),
    what="from_pretrained(SAVED) of a two-memory save by reference, unchanged: loads both memories",
)
lib(
    "full-export-unchanged-loads",
    "26.8",
    "correct",
    lambda e, d: (lambda s: _call(lambda: _hf().from_pretrained(s), lambda m: abs(m.lambda_ - 0.3) < 1e-9))(_saved_copy(e, d, "full")),
    outs=(),
    what="from_pretrained(FULL) of a full export, unchanged: loads, lambda as saved",
)
lib(
    "saved-memory-weights-flipped-byte",
    "26.8",
    "refusal",
    _load_damaged("two", lambda s: _flip(s / "memory" / "model.safetensors")),
    ("memory/model.safetensors", "not the file its save wrote"),
    outs=(),
    what="from_pretrained(SAVED), one byte of memory/model.safetensors flipped",
)
lib(
    "full-export-weights-flipped-byte",
    "26.8",
    "refusal",
    _load_damaged("full", lambda s: _flip(s / "model.safetensors")),
    ("model.safetensors", "not the file its save wrote"),
    outs=(),
    what="from_pretrained(FULL), one byte of model.safetensors flipped",
)
lib(
    "saved-second-memory-config-missing",
    "26.8",
    "refusal",
    _load_damaged("two", lambda s: (s / "memories" / "b" / "memory_config.json").unlink()),
    ("memories/b/memory_config.json", "missing"),
    outs=(),
    what="from_pretrained(SAVED), memories/b/memory_config.json deleted",
)


def _swap(s: Path) -> None:
    a, b = s / "memory" / "model.safetensors", s / "memories" / "b" / "model.safetensors"
    tmp = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(tmp)


lib(
    "saved-memory-folders-swapped",
    "26.8",
    "refusal",
    _load_damaged("two", _swap),
    ("model.safetensors", "not the file its save wrote"),
    outs=(),
    what="from_pretrained(SAVED), the weights of memory/ and memories/b/ swapped",
)
lib(
    "full-export-tokenizer-file-removed",
    "26.8",
    "refusal",
    _load_damaged("full", lambda s: (s / "tokenizer.json").unlink()),
    ("tokenizer.json", "missing"),
    outs=(),
    what="from_pretrained(FULL), tokenizer.json deleted",
)
lib(
    "saved-memory-weights-truncated",
    "26.8",
    "refusal",
    _load_damaged("two", lambda s: _damage(s / "memory" / "model.safetensors", truncate=True)),
    ("memory/model.safetensors",),
    outs=(),
    what="from_pretrained(SAVED), memory/model.safetensors cut in half",
)
lib(
    "saved-gate-config-edited",
    "26.8",
    "refusal",
    _load_damaged("gated", lambda s: (s / "gate" / "gate_config.json").write_text((s / "gate" / "gate_config.json").read_text() + " ")),
    ("gate/gate_config.json",),
    outs=(),
    what="from_pretrained(GATED) of a save with its gate, gate/gate_config.json changed (its integrity record kept)",
)
lib(
    "saved-with-extra-user-file-loads",
    "26.8",
    "correct",
    _load_damaged("two", lambda s: (s / "notes.txt").write_text("mine\n"), lambda m: m.memory_names == ["memory", "b"]),
    outs=(),
    what="from_pretrained(SAVED) with a notes.txt of the user's added: only the files its save wrote are checked, loads",
)
cli(
    "generate-full-export-flipped-byte",
    "26.8",
    "refusal",
    lambda e, d: (lambda s: (_flip(s / "model.safetensors"), ["generate", str(s), "hello"])[1])(_saved_copy(e, d, "full")),
    ("model.safetensors", "not the file its save wrote"),
    outs=(),
    what="mlpmem generate FULL hello (one byte of the full export's model.safetensors flipped)",
)
cli(
    "generate-cli-export-memory-flipped",
    "26.8",
    "refusal",
    lambda e, d: (
        run_cli(["export", MEM(e), "--out", str(d / "x")]),
        _flip(d / "x" / "memory" / "model.safetensors"),
        ["generate", str(d / "x"), "hello"],
    )[2],
    ("memory/model.safetensors",),
    outs=(),
    what="mlpmem export MEM --out X; one byte of X/memory/model.safetensors flipped; mlpmem generate X hello",
)

# ---- 26.9 mixing settings: what a load mixes is what was asked for, and a stale gate never blocks a mixing that does not use it


def _lm_zero_is_base(m) -> bool:
    import torch

    ids = torch.tensor([[3, 7, 11, 5, 9]])
    with torch.no_grad():
        return torch.equal(m(ids).logits, m.lm(ids).logits.float().log_softmax(-1))


def _load_mixture(**kw):
    from mlpmem.lm_eval_backend import load_mixture

    return load_mixture(**kw)[0]


lib(
    "load-mixture-lambda-0-on-gated-run",
    "26.9",
    "correct",
    lambda e, d: (
        lambda run: _call(
            lambda: _load_mixture(memory=str(run / "train" / "memory"), lambda_=0.0),
            lambda m: m.mixing_mode == "fixed" and m.gate is None and m.lambda_ == 0.0 and _lm_zero_is_base(m),
        )
    )(_run_copy(e, d)),
    outs=(),
    what="lm_eval_backend.load_mixture(memory=RUN/train/memory, lambda_=0) on a run with a gate: fixed, lambda 0, the base LM bit for bit",
)


def _backend(args: str):
    from mlpmem.lm_eval_backend import MLPMemoryLM

    return MLPMemoryLM.create_from_arg_string(args, {"device": "cpu", "batch_size": 1})


lib(
    "lm-eval-model-args-lambda-0-on-gated-run",
    "26.9",
    "correct",
    lambda e, d: (
        lambda run: _call(
            lambda: _backend(f"memory={run / 'train' / 'memory'},lambda_=0"),
            lambda lm: lm.mixture["mixing"] == "fixed" and lm.mixture["lambda_"] == 0.0,
        )
    )(_run_copy(e, d)),
    outs=(),
    what="MLPMemoryLM.create_from_arg_string('memory=RUN/train/memory,lambda_=0') (--model_args) on a gated run: the fixed mixture, lambda 0",
)
lib(
    "load-mixture-default-on-gated-run",
    "26.9",
    "correct",
    lambda e, d: (
        lambda run: _call(
            lambda: _load_mixture(memory=str(run / "train" / "memory")), lambda m: m.mixing_mode == "gated" and m.gate is not None
        )
    )(_run_copy(e, d)),
    outs=(),
    what="load_mixture(memory=RUN/train/memory) on a run with a gate: its gate, per token",
)


def _report_lambda(run: Path) -> float:
    return float(json.loads((run / "report.json").read_text())["lambda"]["mlp_memory"])


lib(
    "from-memory-takes-reports-lambda",
    "26.9",
    "correct",
    lambda e, d: (
        lambda run: _call(
            lambda: _hf().from_memory(run / "train" / "memory"),
            lambda m: m.mixing_mode == "fixed" and abs(m.lambda_ - _report_lambda(run)) < 1e-9 and m.lambda_ != 0.25,
        )
    )(_run_copy(e, d, gate=False)),
    outs=(),
    what="from_memory(RUN/train/memory) on a run with report.json (no gate): the lambda the run fitted on valid, not 0.25",
)
lib(
    "from-memory-without-record-warns-0.25",
    "26.9",
    "correct",
    lambda e, d: (lambda t: _call(lambda: _hf().from_memory(t / "memory"), lambda m: m.lambda_ == 0.25))(copy_stage(e, "train", d / "t")),
    outs=(),
    warns=("no lambda fitted on valid",),
    what="from_memory(MEM) of a train stage with no fitted lambda anywhere: 0.25, with a warning",
)
lib(
    "stale-gate-fixed-loads",
    "26.9",
    "correct",
    lambda e, d: (
        lambda run: _call(
            lambda: _hf().from_memory(run / "train" / "memory", mixing="fixed"), lambda m: m.mixing_mode == "fixed" and m.gate is None
        )
    )(_run_copy(e, d, stale=True)),
    outs=(),
    what="from_memory(RUN/train/memory, mixing='fixed') with a stale RUN/gate (fitted for another memory): loads, the gate unread",
)
lib(
    "stale-gate-explicit-lambda-loads",
    "26.9",
    "correct",
    lambda e, d: (
        lambda run: _call(
            lambda: _hf().from_memory(run / "train" / "memory", lambda_=0.4),
            lambda m: m.mixing_mode == "fixed" and abs(m.lambda_ - 0.4) < 1e-9,
        )
    )(_run_copy(e, d, stale=True)),
    outs=(),
    what="from_memory(RUN/train/memory, lambda_=0.4) with a stale RUN/gate: the fixed mixture with 0.4",
)
lib(
    "stale-gate-default-refused",
    "26.9",
    "refusal",
    lambda e, d: (lambda run: _call(lambda: _hf().from_memory(run / "train" / "memory")))(_run_copy(e, d, stale=True)),
    ("another memory",),
    outs=(),
    what="from_memory(RUN/train/memory) with a stale RUN/gate: refused (the gate was fitted for another memory)",
)


def _stale_saved(e, d, full: bool) -> Path:
    """A save with its gate whose gate records another memory's fingerprint (integrity record dropped, as an older save)."""
    s = _saved_copy(e, d, "gated_full" if full else "gated")
    if full:
        cfg = json.loads((s / "config.json").read_text())
        cfg["gate_config"]["meta"]["memory_fingerprint"] = "0" * 16
        (s / "config.json").write_text(json.dumps(cfg))
    else:
        g = json.loads((s / "gate" / "gate_config.json").read_text())
        g["meta"]["memory_fingerprint"] = "0" * 16
        (s / "gate" / "gate_config.json").write_text(json.dumps(g))
        cfg = json.loads((s / "config.json").read_text())
        cfg.pop("integrity", None)
        (s / "config.json").write_text(json.dumps(cfg))
    return s


lib(
    "saved-stale-gate-fixed-loads",
    "26.9",
    "correct",
    lambda e, d: (lambda s: _call(lambda: _hf().from_pretrained(s, mixing="fixed"), lambda m: m.mixing_mode == "fixed" and m.gate is None))(
        _stale_saved(e, d, False)
    ),
    outs=(),
    what="from_pretrained(SAVED, mixing='fixed'), its gate/ fitted for another memory (integrity record dropped): loads",
)
lib(
    "saved-stale-gate-refused",
    "26.9",
    "refusal",
    lambda e, d: (lambda s: _call(lambda: _hf().from_pretrained(s)))(_stale_saved(e, d, False)),
    ("another memory",),
    outs=(),
    what="from_pretrained(SAVED), its gate/ fitted for another memory: refused",
)
lib(
    "full-export-stale-gate-lambda-loads",
    "26.9",
    "correct",
    lambda e, d: (
        lambda s: _call(
            lambda: _hf().from_pretrained(s, lambda_=0.0), lambda m: m.mixing_mode == "fixed" and m.gate is None and _lm_zero_is_base(m)
        )
    )(_stale_saved(e, d, True)),
    outs=(),
    what="from_pretrained(FULL, lambda_=0), its config's gate fitted for another memory: loads, the base LM bit for bit",
)
lib(
    "full-export-stale-gate-refused",
    "26.9",
    "refusal",
    lambda e, d: (lambda s: _call(lambda: _hf().from_pretrained(s)))(_stale_saved(e, d, True)),
    ("another memory",),
    outs=(),
    what="from_pretrained(FULL), its config's gate fitted for another memory: refused",
)
cli(
    "generate-stale-gate-refused",
    "26.9",
    "refusal",
    lambda e, d: ["generate", str(_run_copy(e, d, stale=True) / "train" / "memory"), "hello", "--max-new-tokens", "2"],
    ("another memory",),
    outs=(),
)
cli(
    "generate-stale-gate-with-lambda",
    "26.9",
    "correct",
    lambda e, d: ["generate", str(_run_copy(e, d, stale=True) / "train" / "memory"), "hello", "--max-new-tokens", "2", "--lambda", "0.3"],
    outs=(),
)
cli(
    "export-stale-gate-mixing-fixed",
    "26.9",
    "correct",
    lambda e, d: ["export", str(_run_copy(e, d, stale=True) / "train" / "memory"), "--out", str(d / "out"), "--mixing", "fixed"],
    check=lambda e, d: not (d / "out" / "gate").exists() and _hf().from_pretrained(d / "out").mixing_mode == "fixed",
)
cli(
    "export-mixing-gated-without-gate",
    "26.9",
    "error",
    lambda e, d: ["export", MEM(e), "--out", str(d / "out"), "--mixing", "gated"],
    ("needs a gate",),
    outs=("out",),
)


def _rerun_fixed(e, d):
    run = _run_copy(e, d)
    return ["run", _run_recipe(e, run, "fixed"), "--overwrite"]


def _gate_cleared(e, d) -> bool:
    run = d / "run"
    left = [p.name for p in (run / "gate").iterdir() if p.name != ".mlpmem"] if (run / "gate").exists() else []
    report = json.loads((run / "report.json").read_text())
    return not left and "gate" not in report and _hf().from_memory(run / "train" / "memory").mixing_mode == "fixed"


cli(
    "run-overwrite-fixed-clears-gate",
    "26.9",
    "correct",
    _rerun_fixed,
    outs=("run",),
    check=_gate_cleared,
    what="mlpmem run (eval.mixing: fixed) --overwrite on a gated run: RUN/gate cleared, the new memory loads with its fixed lambda",
)
_lm_eval_case(
    "lm-eval-stale-gate-lambda-0",
    "correct",
    "memory=RUN/train/memory,lambda_=0 (RUN/gate fitted for another memory)",
    lambda e, d: f"memory={_run_copy(e, d, stale=True) / 'train' / 'memory'},lambda_=0",
    item="26.9",
)
_lm_eval_case(
    "lm-eval-stale-gate-refused",
    "refusal",
    "memory=RUN/train/memory (RUN/gate fitted for another memory)",
    lambda e, d: f"memory={_run_copy(e, d, stale=True) / 'train' / 'memory'}",
    ("another memory",),
    item="26.9",
)

# ---- 26.10 old spellings (one release, with a warning) and splits too small to fit on


def _lam_recipe(e, d, knn: str) -> str:
    return recipe(
        d,
        f"out: {d / 'out'}\nmodel: {e.model}\ncorpus:\n  source: {src(e)}\n  train_tokens: 2000\n"
        f"datastore:\n  context: 32\n  stride: 16\nknn:\n  k: 16\n{knn}targets:\n  top_m: 8\ntrain:\n  epochs: 1\n  batch_size: 64\n  n_blocks: 1\n",
    )


def _recipe_lambda(d) -> bool:
    from mlpmem.pipeline import load_recipe

    return abs(load_recipe(str(d / "r.yaml")).sections["knn"].lambda_ - 0.3) < 1e-9


cli_warned(
    "recipe-knn-lam-deprecated",
    "26.10",
    lambda e, d: ["plan", _lam_recipe(e, d, "  lam: 0.3\n"), "--throughputs", _throughputs(d)],
    ("knn.lam is deprecated", "knn.lambda"),
    check=lambda e, d: _recipe_lambda(d),
    what="mlpmem plan R (knn.lam: 0.3, the old spelling): runs, a deprecation warning on stderr, knn.lambda is 0.3",
)
cli_warned(
    "override-knn-lam-deprecated",
    "26.10",
    lambda e, d: ["plan", _lam_recipe(e, d, ""), "knn.lam=0.3", "--throughputs", _throughputs(d)],
    ("knn.lam is deprecated",),
    what="mlpmem plan R knn.lam=0.3 (the old spelling as an override): runs, with a deprecation warning",
)
_recipe_case("recipe-knn-lam-and-lambda", "knn:\n  lam: 0.3\n  lambda: 0.4\n", ("both lam", "lambda"), item="26.10")
cli(
    "override-knn-lam-and-lambda",
    "26.10",
    "error",
    lambda e, d: ["run", _lam_recipe(e, d, "  lambda: 0.4\n"), "knn.lam=0.3"],
    ("both lam", "lambda"),
    outs=(),
    check=lambda e, d: not (d / "out").exists(),
)
cli_warned(
    "export-lam-flag-deprecated",
    "26.10",
    lambda e, d: ["export", MEM(e), "--out", str(d / "out"), "--lam", "0.3"],
    ("--lam is deprecated", "--lambda"),
    check=lambda e, d: abs(json.loads((d / "out" / "config.json").read_text())["lambda_"] - 0.3) < 1e-9,
    what="mlpmem export MEM --out CASE/out --lam 0.3 (the old flag): exported with lambda 0.3, a deprecation warning on stderr",
)
cli(
    "export-lam-and-lambda-flags",
    "26.10",
    "error",
    lambda e, d: ["export", MEM(e), "--out", str(d / "out"), "--lam", "0.3", "--lambda", "0.4"],
    ("--lam", "--lambda"),
    outs=(),
)


def _small_split_run(*overrides):
    return lambda e, d: ["run", _plan_recipe(e, d), *overrides]


def _no_datastore(e, d) -> bool:
    return (d / "out" / "corpus" / "manifest.json").exists() and not (d / "out" / "datastore").exists()


cli(
    "run-valid-3-tokens",
    "26.10",
    "error",
    _small_split_run("corpus.valid_tokens=3"),
    ("at least 32", "corpus.valid_tokens"),
    outs=("out",),
    check=_no_datastore,
)
cli(
    "run-gated-valid-120-tokens",
    "26.10",
    "error",
    _small_split_run("corpus.valid_tokens=120", "eval.mixing=gated"),
    ("257", "gate"),
    outs=("out",),
    check=_no_datastore,
)
cli(
    "run-mixing-flag-gated-valid-120",
    "26.10",
    "error",
    _small_split_run("corpus.valid_tokens=120", "--mixing", "gated"),
    ("257",),
    outs=("out",),
    check=_no_datastore,
)
cli(
    "run-test-1-token",
    "26.10",
    "error",
    _small_split_run("corpus.test_tokens=1"),
    ("corpus.test_tokens", "at least 2"),
    outs=(),
    check=lambda e, d: not (d / "out").exists(),
)

# ---- 26.11 one more bad input for every entry point (a missing or wrong-kind input folder, an out-of-range flag)

cli(
    "corpus-model-is-stage-folder",
    "26.11",
    "error",
    lambda e, d: ["corpus", "--source", src(e), "--out", str(d / "out"), "--model", str(e.base / "corpus")],
    ("is a folder", "not a hugging face model"),
    outs=("out",),
)
cli(
    "datastore-corpus-is-datastore",
    "26.11",
    "error",
    lambda e, d: ds_cmd(e, e.base / "datastore", d / "out"),
    ("`datastore` stage",),
    outs=(),
)
cli(
    "index-datastore-missing",
    "26.11",
    "error",
    lambda e, d: ["index", "--datastore", str(d / "nope"), "--out", str(d / "out")],
    ("does not exist",),
    outs=(),
)
cli(
    "index-datastore-is-corpus",
    "26.11",
    "error",
    lambda e, d: ["index", "--datastore", str(e.base / "corpus"), "--out", str(d / "out")],
    ("`corpus` stage",),
    outs=(),
)
cli(
    "knnlm-index-is-datastore",
    "26.11",
    "error",
    lambda e, d: [
        "knnlm",
        "--corpus",
        str(e.base / "corpus"),
        "--datastore",
        str(e.base / "datastore"),
        "--index",
        str(e.base / "datastore"),
        "--out",
        str(d / "out"),
    ],
    ("`datastore` stage",),
    outs=(),
)
cli(
    "knnlm-corpus-missing",
    "26.11",
    "error",
    lambda e, d: [
        "knnlm",
        "--corpus",
        str(d / "nope"),
        "--datastore",
        str(e.base / "datastore"),
        "--index",
        str(e.base / "index"),
        "--out",
        str(d / "out"),
    ],
    ("does not exist",),
    outs=(),
)
cli("targets-index-missing", "26.11", "error", lambda e, d: tg_cmd(e, d / "out", ix=d / "nope"), ("does not exist",), outs=())
cli("targets-datastore-is-index", "26.11", "error", lambda e, d: tg_cmd(e, d / "out", ds=e.base / "index"), ("`index` stage",), outs=())
cli("train-targets-missing", "26.11", "error", lambda e, d: train_cmd(e, d / "out", tg=d / "nope"), ("does not exist",), outs=())
cli("train-alpha-2", "26.11", "error", lambda e, d: train_cmd(e, d / "out", "--alpha", "2"), ("alpha",), outs=())
cli(
    "run-model-is-stage-folder",
    "26.11",
    "error",
    lambda e, d: ["run", "--corpus", src(e), "--model", str(e.base / "corpus"), "--out", str(d / "out")],
    ("is a folder", "not a hugging face model"),
    outs=("out",),
    check=lambda e, d: not (d / "out" / "datastore").exists(),
)
cli("plan-recipe-missing", "26.11", "error", lambda e, d: ["plan", str(d / "nope.yaml")], ("does not exist",), outs=())
cli(
    "plan-throughputs-missing",
    "26.11",
    "error",
    lambda e, d: ["plan", _plan_recipe(e, d), "--throughputs", str(d / "nope.json")],
    ("nope.json",),
    outs=(),
)
cli(
    "export-memory-is-datastore",
    "26.11",
    "error",
    lambda e, d: ["export", str(e.base / "datastore"), "--out", str(d / "out")],
    ("`datastore` stage", "not a memory"),
    outs=("out",),
)
cli(
    "generate-hf-model-not-a-memory",
    "26.11",
    "error",
    lambda e, d: ["generate", str(e.model), "hello"],
    ("",),
    outs=(),
)
cli(
    "generate-mixing-gated-without-gate",
    "26.11",
    "error",
    lambda e, d: ["generate", MEM(e), "hello", "--mixing", "gated"],
    ("needs a gate",),
    outs=(),
)


def ft_cmd(e, out, *flags, corpus=None):
    return ["finetune", "--corpus", str(corpus or e.base / "corpus"), "--out", str(out), "--model", str(e.model), "--device", "cpu", *flags]


cli("finetune-corpus-missing", "26.11", "error", lambda e, d: ft_cmd(e, d / "out", corpus=d / "nope"), ("does not exist",), outs=())
cli(
    "finetune-corpus-is-datastore",
    "26.11",
    "error",
    lambda e, d: ft_cmd(e, d / "out", corpus=e.base / "datastore"),
    ("`datastore` stage",),
    outs=(),
)
cli("finetune-method-bogus", "26.11", "error", lambda e, d: ft_cmd(e, d / "out", "--method", "bogus"), ("method",), outs=())
cli("finetune-lora-r-0", "26.11", "error", lambda e, d: ft_cmd(e, d / "out", "--lora-r", "0"), ("--lora-r",), outs=())
cli(
    "finetune-memory-is-corpus",
    "26.11",
    "error",
    lambda e, d: ft_cmd(e, d / "out", "--memory", str(e.base / "corpus")),
    ("`corpus` stage", "not a memory"),
    outs=(),
)
cli("tasks-build-without-source", "26.11", "error", lambda e, d: ["tasks", "build", "--out", str(d / "out")], ("--source",), outs=())
cli(
    "tasks-build-source-missing",
    "26.11",
    "error",
    lambda e, d: ["tasks", "build", "--out", str(d / "out"), "--source", str(d / "nope"), "--corpus", str(e.base / "corpus")],
    ("does not exist",),
    outs=(),
)
cli(
    "probe-corpus-missing", "26.11", "error", lambda e, d: ["probe", str(d / "nope"), "--out", str(d / "out")], ("does not exist",), outs=()
)


def _python_m(*args):
    """``python -m mlpmem ARGS`` in a process of its own: what a user types."""

    def run(e, d):
        def script():
            r = subprocess.run(
                [sys.executable, "-m", "mlpmem", *args],
                env={**os.environ, "TQDM_DISABLE": "1"},
                capture_output=True,
                text=True,
                timeout=120,
            )
            return r.returncode, r.stderr

        return ["@script", script], None

    return run


CASES.append(Case("python-m-no-arguments", "26.11", "error", _python_m(), ("required",), outs=(), what="python -m mlpmem (no arguments)"))
CASES.append(
    Case(
        "python-m-unknown-verb", "26.11", "error", _python_m("frobnicate"), ("invalid choice",), outs=(), what="python -m mlpmem frobnicate"
    )
)
_lm_eval_case(
    "lm-eval-rag-k-0",
    "error",
    "(--model mlpmem-rag) corpus=BASE/corpus,memory=MEM,k=0",
    lambda e, d: f"corpus={e.base / 'corpus'},memory={MEM(e)},k=0",
    ("k",),
    item="26.11",
    backend="mlpmem-rag",
)
_lm_eval_case(
    "lm-eval-rag-corpus-is-datastore",
    "error",
    "(--model mlpmem-rag) corpus=BASE/datastore,memory=MEM",
    lambda e, d: f"corpus={e.base / 'datastore'},memory={MEM(e)}",
    ("",),
    item="26.11",
    backend="mlpmem-rag",
)


# ---------------------------------------------------------------- report


def _commit() -> str:
    """The commit the cases ran at (+dirty when the tree had uncommitted changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_reports(results: list[dict], seconds: float, out_json: Path, out_md: Path) -> None:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    out_json.parent.mkdir(parents=True, exist_ok=True)
    commit = _commit()
    provenance.write_result(out_json, {"counts": counts, "seconds": round(seconds, 1), "commit": commit, "cases": results}, indent=1)
    fails = sum(counts.get(f, 0) for f in FAILS + ("setup failed",))
    lines = [
        "# Reliability: hostile inputs and faults",
        "",
        f"Generated by `python bench/hostile.py` at commit {commit} (do not edit by hand; the data is in bench/results/hostile.json).",
        f"The test suite runs its fast subset (`python bench/hostile.py --fast --no-write`: the cases under {FAST_S:g} s).",
        f"{len(results)} cases in {seconds:.0f} s: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"; {fails} failures.",
        "",
        "Outcomes: **error** = exit 2 with one `mlpmem: error:` paragraph naming the problem and its fix; **refusal** = the same where",
        "refusing is the answer (never delete or mix what is not ours); **correct** = exit 0 and the result checked (resumes byte-identical).",
        "A traceback, exit 0 where an error was expected, a failed check, or a changed file outside the case's output folders is a failure.",
        "Items refer to issue 10 (1 overwrite, 2 export, 3 config match, 5 duplicates, 6 validation, 7 integrity, 8 resources) and issue 26",
        "(26.1 every entry point, 26.2 device= for lm-eval, 26.3 overrides anywhere, 26.4 numbers as text, 26.5 flags as overrides, 26.6 plan's inputs,",
        "26.7 one rule for writers, 26.8 integrity of exports, 26.9 mixing settings, 26.10 old spellings and split sizes, 26.11 more entry points).",
        "",
        "## How mlpmem guards against them",
        "",
        "- Stage folders carry a marker (`.mlpmem`, its kind). `--overwrite` deletes only files the stage writes, in a folder marked as",
        "  that stage (or an older mlpmem folder holding nothing else); it refuses folders of another kind and folders with other files.",
        "  `folders.claim_out(folder, kind)` is the same check for any writer (`export` uses it).",
        "- A finished folder is reused only if its config equals the full resolved config; settings added by later versions are listed",
        "  with the value older folders used (`folders.ADDED_SETTINGS`).",
        "- The corpus drops exact duplicate texts before splitting (count in the manifest and the log).",
        "- Recipes and verb flags are checked whole (types, ranges, cross-section constraints) before any stage runs; `knn.k` is checked",
        "  against `corpus.train_tokens` up front and against the built corpus before the datastore.",
        "- Every file record holds size, sha256 and a sha256 of five fixed 64 KiB blocks: reads check size and blocks (so damage outside",
        "  the blocks of a file over 320 KiB is found only by `--verify`, which hashes every byte). The train manifest lists its files;",
        "  checkpoints list theirs in state.json, and a damaged newest checkpoint falls back to the one before.",
        "- Disk space is checked before the datastore, targets and training; a failed write leaves no `.partial`. A stage folder is locked",
        "  (`.mlpmem.lock`, pid and host) while written; a lock whose process is gone is taken over with a log line.",
        "- The CLI prints any `MlpmemError`, permission error, full or read-only disk, or missing user path as one paragraph (exit 2),",
        "  Ctrl-C as one line (exit 130); anything else is a bug and keeps its traceback. `mlpmem-lm-eval` and `python -m mlpmem.rag`",
        "  do the same for their model arguments (`errors.report_error`, shared); under torchrun rank 0 alone prints it.",
        "",
        "Known limits: damage outside the sampled blocks of large files needs `--verify`; a lock held on another host cannot be",
        "checked for liveness (the message says which file to delete); corpus folders built before duplicate removal are refused only",
        "when their source has duplicates.",
        "",
        "| item | cases | outcomes |",
        "|---|---|---|",
        *[
            f"| {item} | {sum(1 for r in results if r['item'] == item)} | "
            + ", ".join(
                f"{n} {o}"
                for o, n in sorted(
                    {
                        o: sum(1 for r in results if r["item"] == item and r["outcome"] == o)
                        for o in {r["outcome"] for r in results if r["item"] == item}
                    }.items()
                )
            )
            + " |"
            for item in sorted({r["item"] for r in results})
        ],
        "",
        "| # | case | item | expected | outcome | command or fault | message (stderr) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        msg = (r.get("message") or "").replace("|", "\\|").replace("\n", " ")
        cmd = (r.get("command") or "").replace("|", "\\|")
        lines.append(f"| {i} | {r['name']} | {r['item']} | {r['expect']} | {r['outcome']} | `{cmd[:160]}` | {msg[:300]} |")
    out_md.write_text("\n".join(lines) + "\n")


FAST_S = 1.0  # a case under this in the last full run is in the fast subset


def slow_cases() -> set[str]:
    """Names of the cases that took FAST_S or more in the last full run (bench/results/hostile.json)."""
    try:
        cases = json.loads((REPO / "bench" / "results" / "hostile.json").read_text())["cases"]
    except (OSError, ValueError, KeyError):
        return set()
    return {c["name"] for c in cases if c.get("seconds", 0) >= FAST_S}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="run only cases whose name contains this")
    ap.add_argument("--item", default="", help="run only the cases of this item (exact: 26.7 is not 26.70)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite RELIABILITY.md and the JSON (for -k runs)")
    ap.add_argument(
        "--fast",
        action="store_true",
        help=f"only the cases that took under {FAST_S:g} s in the last full run (and new ones): the subset the test suite runs",
    )
    a = ap.parse_args()
    slow = slow_cases() if a.fast else set()
    import torch

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="mlpmem-hostile-"))
    logging.basicConfig(level=logging.WARNING, filename=str(root / "log.txt"))
    t0 = time.perf_counter()
    env = build_env(root)
    print(f"set-up {time.perf_counter() - t0:.0f} s in {root}", file=sys.stderr)
    results = []
    for c in CASES:
        if (a.k and a.k not in c.name) or (a.item and c.item != a.item) or c.name in slow:
            continue
        r = run_case(env, c)
        results.append(r)
        mark = "FAIL" if r["outcome"] in FAILS or r["outcome"] == "setup failed" else "ok"
        print(f"{mark:4} {r['outcome']:20} {r['seconds']:6.1f}s {c.name}: {r.get('message', '')[:150]}", file=sys.stderr)
        if mark == "FAIL" and (r.get("traceback") or r.get("stderr")):
            print((r.get("traceback") or r.get("stderr"))[-1500:], file=sys.stderr)
    for p in env.extra.get("procs", []):
        p.kill()
    seconds = time.perf_counter() - t0
    if not a.no_write and not a.k and not a.item and not a.fast:
        write_reports(results, seconds, REPO / "bench" / "results" / "hostile.json", REPO / "RELIABILITY.md")
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(f"{len(results)} cases in {seconds:.0f} s: {counts}", file=sys.stderr)
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(r["outcome"] in FAILS or r["outcome"] == "setup failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
