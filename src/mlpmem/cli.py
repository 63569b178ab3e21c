"""The `mlpmem` command. Each verb parses flags into a typed config and calls one library function."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
from pathlib import Path

from mlpmem.errors import MlpmemError, report_error
from mlpmem.stages import MIN_VALID_POSITIONS, MIXING_SETTINGS, by_verb, splits_work

log = logging.getLogger("mlpmem")


def _stage_verb(a):
    """corpus, datastore, index: the stage's build function with the verb's flags (stages.run_verb)."""
    from mlpmem.stages import by_verb, run_verb

    run_verb(by_verb()[a.verb], a)


def _targets(a):
    from mlpmem.typed_config import from_args
    from mlpmem.files import read_json
    from mlpmem.targets import TargetsConfig, build_targets

    if a.tuning and a.temperature is not None:
        raise MlpmemError(
            f"--tuning {a.tuning} is read only by --temperature auto, but --temperature is {a.temperature}",
            "drop --tuning, or pass --temperature auto to use the tuned temperature",
        )
    if a.temperature is None:  # "auto": the T that minimised kNN-LM perplexity on valid
        if not a.tuning:
            raise MlpmemError(
                "--temperature auto needs the tuning result of `mlpmem knnlm`",
                "pass --tuning OUT/knnlm.json, or a number such as --temperature 2",
            )
        tuning = read_json(Path(a.tuning))
        t = tuning.get("knn_temperature") if isinstance(tuning, dict) else None
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
            raise MlpmemError(
                f"{a.tuning} holds no positive knn_temperature",
                "pass the knnlm.json written by `mlpmem knnlm`, or a number such as --temperature 2",
            )
        a.temperature = float(t)
    build_targets(
        Path(a.datastore),
        Path(a.index),
        Path(a.out),
        from_args(TargetsConfig, a),
        a.overwrite,
        queries_dir=Path(a.queries) if a.queries else None,
    )


def _knnlm(a):
    from mlpmem.typed_config import from_args
    from mlpmem.evaluate import KnnConfig, run_knnlm

    r = run_knnlm(
        Path(a.corpus),
        Path(a.datastore),
        Path(a.index),
        Path(a.out),
        from_args(KnnConfig, a),
        a.split,
        a.model,
        device=a.device,
        dtype=a.dtype,
    )
    _say(_table(r))


def _say(text: str) -> None:
    """Print a result once: under torchrun every process has it, rank 0 prints it."""
    from mlpmem import dist

    if dist.world().main:
        print(text)


def _train(a):
    from mlpmem.typed_config import from_args
    from mlpmem.models import dtype_name, resolve_device
    from mlpmem.train import TrainConfig, load_datastore_lm, needs_lm, train_memory

    from mlpmem import dist

    cfg = from_args(TrainConfig, a)
    dev, dt = resolve_device(dist.local_device(a.device), a.dtype)  # under torchrun on GPUs: this rank's GPU
    if a.valid_targets and not a.valid:
        raise MlpmemError(
            "--valid-targets needs --valid (the valid datastore those targets belong to)",
            "pass --valid DATASTORE too, or drop --valid-targets",
        )
    # the LM (to copy the head from, recompute inputs, resolve layers): --model, else the datastore's
    lm = load_datastore_lm(Path(a.datastore), dev, dtype_name(dt), a.model) if needs_lm(cfg) else None
    train_memory(
        Path(a.datastore),
        Path(a.targets),
        Path(a.out),
        cfg,
        valid_datastore_dir=Path(a.valid) if a.valid else None,
        valid_targets_dir=Path(a.valid_targets) if a.valid_targets else None,
        init_lm=lm,
        overwrite=a.overwrite,
        device=str(dev),
    )


def _finetune(a):
    from mlpmem.typed_config import from_args
    from mlpmem.finetune import FinetuneConfig, finetune

    m = finetune(from_args(FinetuneConfig, a), Path(a.corpus), Path(a.out), overwrite=a.overwrite)
    _say(f"fine-tuned model: {Path(a.out)} ({m.get('steps', '?')} steps)")


def _run(a):
    from mlpmem.pipeline import run_pipeline

    report = run_pipeline(load_recipe_of(a), a.overwrite)
    _say(_table(report))


def _plan(a):
    from mlpmem.files import write_json
    from mlpmem.plan import check_output_file, plan, read_throughputs, render_plan

    if a.json:  # before the calibration: a path that cannot be written fails at once, and nothing is half-written
        check_output_file(Path(a.json), "--json")
    p = plan(load_recipe_of(a), a.train_tokens, read_throughputs(Path(a.throughputs)) if a.throughputs else None)
    if a.json:
        write_json(Path(a.json), p)
    _say(render_plan(p))


# a setting on the command line: SECTION.KEY=VALUE (or KEY=VALUE for a top-level key), anywhere after the verb
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")
# `mlpmem run` / `plan` flags that set a recipe key: a flag is the same as its dotted override
RECIPE_FLAGS = {"corpus": "corpus.source", "model": "model", "mixing": "eval.mixing"}


def load_recipe_of(a):
    """The recipe of `mlpmem run` / `mlpmem plan`, checked as one: RECIPE (or --corpus alone), its SECTION.KEY=VALUE
    overrides, the flags that set recipe keys (--corpus, --model, --mixing: the same as their overrides) and --out,
    --device, --dtype."""
    from mlpmem.models import DEFAULT_MODEL
    from mlpmem.pipeline import load_recipe, quick_recipe

    words = [w for w in (a.recipe, *a.overrides) if w is not None]
    overrides = [w for w in words if OVERRIDE.match(w)]
    names = [w for w in words if not OVERRIDE.match(w)]
    if len(names) > 1:
        raise MlpmemError(
            f"`mlpmem {a.verb}` takes one recipe, got {len(names)} ({', '.join(names)})",
            "pass one recipe, and settings as SECTION.KEY=VALUE (e.g. train.epochs=3)",
        )
    flags = {key: getattr(a, dest) for dest, key in RECIPE_FLAGS.items() if getattr(a, dest, None) is not None}
    twice = [
        f"--{dest} and {key}=" for dest, key in RECIPE_FLAGS.items() if key in flags and any(o.split("=", 1)[0] == key for o in overrides)
    ]
    if twice:
        raise MlpmemError(f"{', '.join(twice)} set the same setting", "give each setting once")
    overrides += [f"{key}={json.dumps(value)}" for key, value in flags.items()]  # a JSON string is a YAML string: the value as typed
    if names:
        return load_recipe(names[0], out=a.out, device=a.device, dtype=a.dtype, overrides=overrides)
    if not a.corpus:
        raise MlpmemError(
            f"`mlpmem {a.verb}` needs a RECIPE or --corpus",
            f"e.g. `mlpmem {a.verb} sotu` or `mlpmem {a.verb} --corpus data.jsonl --out runs/mine`",
        )
    return quick_recipe(a.corpus, a.model or DEFAULT_MODEL, a.out or "runs/quick", device=a.device, dtype=a.dtype, overrides=overrides)


def _generate(a):
    from mlpmem.typed_config import from_args
    from mlpmem.generation import GenerateConfig, generate_side_by_side, read_prompts

    cfg = from_args(GenerateConfig, a)
    prompts = read_prompts(a.prompts, a.prompts_file)
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise MlpmemError(f"prompt {', '.join(map(str, empty))} is empty", "give every prompt some text to continue")
    rows = generate_side_by_side(str(_memory_folder(a.model, a.verify)), prompts, cfg, a.base_model, device=a.device, dtype=a.dtype)
    for r in rows:
        how = {"gated": "gated lambda per token", "routed": "router's weights per token"}.get(r.get("mixing"), f"lambda={r['lambda']:.3g}")
        print(f"=== {r['prompt']}\n--- base LM:\n{r['base']}\n--- LM + memory ({how}):\n{r['memory']}\n")


def _export(a):
    from mlpmem.transformers_integration import export_hf

    memory = _memory_folder(a.memory, a.verify)
    if a.lambda_ is not None and not 0 <= a.lambda_ <= 1:
        raise MlpmemError(f"--lambda must lie in [0, 1], got {a.lambda_}", "pass e.g. --lambda 0.25 (the weight of the memory)")
    if not 0 < a.memory_temperature < float("inf"):
        raise MlpmemError(f"--memory-temperature must be positive, got {a.memory_temperature}", "pass e.g. --memory-temperature 1")
    if Path(a.out).resolve() == memory.resolve() or memory.resolve() in Path(a.out).resolve().parents:
        raise MlpmemError(f"--out {a.out} lies inside the memory folder it exports", "choose an --out outside it")
    export_hf(
        memory,
        Path(a.out),
        base_model=a.base_model,
        lambda_=a.lambda_,
        memory_temperature=a.memory_temperature,
        full_export=a.full,
        gate=a.gate or "auto",
        mixing=a.mixing,
    )


def _memory_folder(path: str, verify: bool) -> Path:
    """The memory folder a user means: RUN/train/memory, or RUN/train itself; checked against its stage's manifest."""
    from mlpmem.files import MANIFEST
    from mlpmem.folders import marked_kind
    from mlpmem.manifest import verify_stage

    p = Path(path)
    if not p.exists():
        raise MlpmemError(f"{p} does not exist", "pass a trained memory folder (RUN/train/memory) or an exported model folder")
    if not p.is_dir():
        raise MlpmemError(f"{p} is a file, not a folder", "pass a trained memory folder (RUN/train/memory) or an exported model folder")
    if (p / MANIFEST).exists() and (p / "memory").is_dir():
        p = p / "memory"  # the train stage's folder: its memory is inside
    kind = marked_kind(p)
    if kind not in (None, "memory", "export"):
        raise MlpmemError(
            f"{p} holds the `{kind}` stage of a run, not a memory or a saved model",
            "pass a trained memory folder (RUN/train/memory) or a folder written by save_pretrained / mlpmem export",
        )
    if (p.parent / MANIFEST).exists() and p.name == "memory":
        verify_stage(p.parent, "memory", full=verify)  # sizes and sampled hashes; every byte with --verify
    return p


def _probe(a):
    from mlpmem.probe import build_probe

    build_probe(
        Path(a.corpus),
        Path(a.out),
        a.n_items,
        a.seed,
        a.model,
        context_tokens=a.context_tokens,
        continuation_tokens=a.continuation_tokens,
        n_distractors=a.distractors,
        task_name=a.task_name,
        overwrite=a.overwrite,
    )


# `mlpmem tasks` flags of one action, and their defaults (None on the parser, so that a flag given to the other action is seen)
TASKS_FLAGS = {
    "source": {"deb": None, "n_synsets": 2600},
    "build": {
        "source": None,
        "corpus": None,
        "sotu_corpus": None,
        "n_items": 400,
        "n_valid": 60,
        "n_sotu": 1000,
        "n_reasoning": 450,
        "shots": 1,
    },
}


def _tasks(a):
    from mlpmem.knowledge_tasks import build_source, build_tasks

    other = "build" if a.action == "source" else "source"
    ignored = ["--" + k.replace("_", "-") for k in TASKS_FLAGS[other] if getattr(a, k) is not None]
    if ignored:
        raise MlpmemError(
            f"{', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} to `mlpmem tasks {other}`, not `tasks {a.action}`",
            f"drop {', '.join(ignored)}, or run `mlpmem tasks {other}`",
        )
    for k, default in TASKS_FLAGS[a.action].items():
        if getattr(a, k) is None:
            setattr(a, k, default)
    if a.action == "source":
        build_source(Path(a.out), Path(a.deb) if a.deb else None, a.n_synsets, a.seed, overwrite=a.overwrite)
    else:
        if not a.source or not a.corpus:
            raise MlpmemError(
                "`mlpmem tasks build` needs --source (from `mlpmem tasks source`) and --corpus (the memory's RUN/corpus)",
                "e.g. mlpmem tasks build --source runs/knowledge/wordnet --corpus runs/knowledge/wordnet50k/corpus --out runs/knowledge/tasks",
            )
        build_tasks(
            Path(a.source),
            Path(a.corpus),
            Path(a.out),
            sotu_corpus=Path(a.sotu_corpus) if a.sotu_corpus else None,
            n_items=a.n_items,
            n_valid=a.n_valid,
            n_sotu=a.n_sotu,
            n_reasoning=a.n_reasoning,
            shots=a.shots,
            seed=a.seed,
            overwrite=a.overwrite,
        )


def _table(r: dict) -> str:
    """A small text table of perplexities and tokens/s."""
    rows = [("method", "perplexity", "tokens/s")]
    for name, ppl in r["ppl"].items():
        tps = r.get("tokens_per_s", {}).get(name)
        rows.append((name, f"{ppl:.3f}", f"{tps:.0f}" if tps else "-"))
    w = [max(len(x[i]) for x in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows)


def _stage_args(verb: str, extra=None):
    """A stage verb's flags from the stage registry (stages.add_stage_arguments), then the verb's own."""

    def add(sp):
        from mlpmem.stages import add_stage_arguments, by_verb

        add_stage_arguments(sp, by_verb()[verb])
        if extra is not None:
            extra(sp)

    return add


def _extra_targets(sp):
    sp.add_argument("--tuning", help="knnlm.json written by `mlpmem knnlm`, for --temperature auto")
    sp.add_argument("--queries", help="a datastore of another split (e.g. valid) to build targets for, searched in this index")


def _extra_knnlm(sp):
    sp.add_argument("--split", default="test", choices=("train", "valid", "test"))
    sp.add_argument("--model", default=None, help="model to use (default: the datastore's)")


def _extra_train(sp):
    sp.add_argument("--valid", default=None, help="datastore of the valid split (built with --lm-logprob)")
    sp.add_argument("--valid-targets", default=None, help="kNN targets of the valid split (`mlpmem targets --queries`), for valid KL")
    sp.add_argument("--model", default=None, help="the LM (default: the datastore's), for init lm_head/lm_copy")


def _args_finetune(sp):
    from mlpmem.typed_config import add_arguments
    from mlpmem.finetune import FinetuneConfig

    sp.add_argument("--corpus", required=True, help="folder written by `mlpmem corpus`, tokenized for --model")
    sp.add_argument("--out", required=True)
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument(
        "--lambda", dest="lambda_", type=float, default=None, help="the memory's weight in the mixture (default: the lambda its run fitted)"
    )
    add_arguments(sp, FinetuneConfig, skip=("lambda_",))


def _recipe_arguments(sp, verb: str):
    """The arguments `mlpmem run` and `mlpmem plan` share: what the recipe is, and the flags that change it."""
    sp.add_argument("recipe", nargs="?", help="a recipe YAML file or a built-in recipe name (e.g. sotu)")
    sp.add_argument(
        "overrides",
        nargs="*",
        help="settings to change, as SECTION.KEY=VALUE, anywhere on the line (e.g. train.epochs=3 datastore.batch_tokens=65536)",
    )
    sp.add_argument(
        "--corpus",
        default=None,
        help="the corpus (.jsonl with a text field, .txt, .parquet, folder): alone, a quick experiment on it; "
        "with a recipe, the same as corpus.source=",
    )
    sp.add_argument(
        "--model", default=None, help="HF model name or local folder (the same as model=; default: the recipe's, else smollm2-135m)"
    )
    sp.add_argument("--out", default=None, help="the run folder (default: the recipe's)")
    sp.add_argument(
        "--device",
        default=None,
        help=f"where the stages {'run' if verb == 'run' else 'will run'}: auto|cpu|cuda|cuda:N|mps (default: the recipe's `device:`, else auto)",
    )
    sp.add_argument(
        "--dtype", default=None, help="LM precision: auto|float32|bfloat16|float16 (default: the recipe's datastore dtype, float32)"
    )


def _args_run(sp):
    _recipe_arguments(sp, "run")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument(
        "--mixing",
        default=None,
        choices=MIXING_SETTINGS,
        help="the same as eval.mixing=; gated: also fit a per-token mixing gate on valid (+ text sampled from the LM) and report it "
        f"beside the fixed lambda; auto: gated when valid has at least {MIN_VALID_POSITIONS['gated']} positions "
        "(default: the recipe's eval.mixing, auto)",
    )


def _args_plan(sp):
    _recipe_arguments(sp, "plan")
    sp.add_argument(
        "--train-tokens",
        type=int,
        default=None,
        help="the train split's size, when the recipe does not cap it and the corpus is not built yet",
    )
    sp.add_argument("--throughputs", default=None, help="JSON of measured throughputs (a plan's --json) instead of calibrating here")
    sp.add_argument("--json", default=None, help="also write the plan as JSON to this file")


def _args_generate(sp):
    from mlpmem.typed_config import add_arguments, add_device_arguments
    from mlpmem.generation import GenerateConfig

    sp.add_argument("model", help="a trained memory folder (RUN/train/memory) or a folder written by save_pretrained/export")
    sp.add_argument("prompts", nargs="*", help="prompts (or --prompts-file)")
    sp.add_argument("--prompts-file", help="a text file with one prompt per line")
    sp.add_argument("--base-model", default=None, help="base LM (default: the one the memory was trained for)")
    add_device_arguments(sp, dtype=True)
    add_arguments(sp, GenerateConfig)


def _args_export(sp):
    from mlpmem.typed_config import add_deprecated_flag

    sp.add_argument("memory", help="a trained memory folder (RUN/train/memory)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--base-model", default=None, help="base LM reference to record (default: the memory's)")
    sp.add_argument(
        "--lambda", dest="lambda_", type=float, default=None, help="lambda stored in the config (default: the one the memory's run fitted)"
    )
    add_deprecated_flag(sp, "--lam", "--lambda", dest="lambda_", type=float)
    sp.add_argument("--memory-temperature", type=float, default=1.0)
    sp.add_argument("--full", action="store_true", help="also store the base model, for a self-contained folder")
    sp.add_argument("--gate", default=None, help="a mixing gate folder (default: the run's gate/ next to train/memory, if any)")
    sp.add_argument(
        "--mixing", default=None, choices=("fixed", "gated"), help="default mixing of the saved model (default: gated when it has a gate)"
    )


def _args_probe(sp):
    sp.add_argument("corpus", help="a corpus folder written by `mlpmem corpus` (its train split)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--n-items", type=int, default=200)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--model", default=None, help="tokenizer to detokenize with (default: the corpus's)")
    sp.add_argument("--context-tokens", type=int, default=32)
    sp.add_argument("--continuation-tokens", type=int, default=8)
    sp.add_argument("--distractors", type=int, default=3)
    sp.add_argument("--task-name", default="mlpmem_probe")
    sp.add_argument("--overwrite", action="store_true")


def _args_tasks(sp):
    sp.add_argument(
        "action",
        choices=("source", "build"),
        help="source: unpack WordNet (Debian wordnet-base) and write the memory's text; build: the lm-eval tasks from a run's train split",
    )
    sp.add_argument("--out", required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--deb", default=None, help="source: a wordnet-base .deb (default: apt-get download wordnet-base)")
    sp.add_argument("--n-synsets", type=int, default=None, help="source: synsets in the memory's text (~30 tokens each; default: 2600)")
    sp.add_argument("--source", default=None, help="build: the folder written by `mlpmem tasks source`")
    sp.add_argument("--corpus", default=None, help="build: the corpus folder of the run trained on its wordnet.jsonl (RUN/corpus)")
    sp.add_argument("--sotu-corpus", default=None, help="build: a State of the Union corpus folder (RUN/corpus) for the facts task")
    sp.add_argument("--n-items", type=int, default=None, help="build: test items per WordNet task (define: half; default: 400)")
    sp.add_argument("--n-valid", type=int, default=None, help="build: valid items per task (tune RAG on these; default: 60)")
    sp.add_argument("--n-sotu", type=int, default=None, help="build: State of the Union fact items (default: 1000)")
    sp.add_argument("--n-reasoning", type=int, default=None, help="build: reasoning control items (default: 450)")
    sp.add_argument("--shots", type=int, default=None, help="build: worked examples in each WordNet prompt (default: 1)")


_STAGE_HELP = {verb: st.help for verb, st in by_verb().items()}

# verb -> (function, help, flags). Flags are added only for the verb being run, so
# `mlpmem --help` does not import torch and the stage modules.
VERBS = {
    # the stage verbs: flags from the stage registry (mlpmem.stages), which drives `mlpmem run` too
    "corpus": (_stage_verb, _STAGE_HELP["corpus"], _stage_args("corpus")),
    "datastore": (_stage_verb, _STAGE_HELP["datastore"], _stage_args("datastore")),
    "index": (_stage_verb, _STAGE_HELP["index"], _stage_args("index")),
    "targets": (_targets, _STAGE_HELP["targets"], _stage_args("targets", _extra_targets)),
    "knnlm": (_knnlm, _STAGE_HELP["knnlm"], _stage_args("knnlm", _extra_knnlm)),
    "train": (_train, _STAGE_HELP["train"], _stage_args("train", _extra_train)),
    "finetune": (
        _finetune,
        "fine-tune the LM (full or LoRA) on a corpus split, alone or jointly with a memory in the loop",
        _args_finetune,
    ),
    "run": (_run, "run the whole experiment from a recipe (or a corpus) and print the comparison", _args_run),
    "plan": (_plan, "estimate each stage's disk, RAM, GPU memory and time for a recipe, before running it", _args_plan),
    "generate": (_generate, "continue prompts with the base LM and with LM + memory, side by side", _args_generate),
    "export": (_export, "turn a trained memory into a Hugging Face model folder (save_pretrained layout)", _args_export),
    "probe": (_probe, "build the knowledge-probe lm-eval task from a corpus's training text", _args_probe),
    "tasks": (_tasks, "build knowledge tasks (WordNet, State of the Union facts, a reasoning control) for lm-eval", _args_tasks),
}


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors follow the rule of every other error: under torchrun / accelerate
    launch rank 0 alone prints it (every rank exits 2)."""

    def error(self, message: str):
        from mlpmem.errors import launch_rank

        if launch_rank() != 0:
            sys.exit(report_error(message))
        super().error(message)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog="mlpmem", description="Retriever-pretrained MLP memory (and kNN-LM) for Hugging Face causal LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", required=True)
    for name, (fn, help_, add) in VERBS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if verb in (name, None):
            add(sp)
            if name != "corpus":
                sp.add_argument(
                    "--verify", action="store_true", help="hash every byte of the stage folders read (default: sizes and sampled blocks)"
                )
    return p


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, where a verb that takes SECTION.KEY=VALUE overrides (run, plan) takes them anywhere on
    the line, also after its flags (`mlpmem run sotu --out O train.epochs=3`); anything else left over is argparse's error."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        args.overrides += [x for x in extra if OVERRIDE.match(x)]
        extra = [x for x in extra if not OVERRIDE.match(x)]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((x for x in argv if x in VERBS), "")
    args = parse_command_line(build_parser(verb), argv)
    from mlpmem import dist
    from mlpmem.files import set_full_verify
    from mlpmem.folders import release_all_locks

    try:
        rank = dist.world().rank  # under torchrun / accelerate launch: rank 0 speaks for all, the others only warn
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
            format=f"%(asctime)s {f'[rank {rank}] ' if rank else ''}%(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        for noisy in ("faiss.loader", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        set_full_verify(getattr(args, "verify", False))
        try:
            if splits_work(args.verb) or dist.world().size == 1:
                args.fn(args)
            else:  # a verb that does not split its work, started by a launcher: it runs once, on rank 0
                dist.init("cpu")
                dist.on_main(args.fn, args)
            dist.finish()  # a no-op for one process
        finally:
            release_all_locks()  # a stage that stopped half-way can be resumed at once, by anyone
    except MlpmemError as e:
        return report_error(e)
    except KeyboardInterrupt:
        return report_error("interrupted; run the same command again to resume", 130, prefix="mlpmem: ")
    except OSError as e:
        err = os_error(e, argv)
        if err is None:
            raise  # not a user's path or a full disk: a bug, which deserves its traceback
        return report_error(err)
    return 0


def os_error(e: OSError, argv: list[str]) -> MlpmemError | None:
    """The user error behind an OS error (permissions, full or read-only disk, a missing path the
    user gave), or None for anything else."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return MlpmemError(
            f"the disk is full{where}",
            "free some space and run the same command again (finished shards and checkpoints are kept), or choose an --out on a larger disk",
        )
    if e.errno == errno.EROFS:
        return MlpmemError(f"the file system is read-only{where}", "choose an --out on a writable disk")
    if isinstance(e, PermissionError):
        return MlpmemError(f"permission denied{where}", "check the permissions of that path, or choose another --out")
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) and e.filename and _user_path(str(e.filename), argv):
        what = {
            FileNotFoundError: "does not exist",
            NotADirectoryError: "has a file where a folder is expected",
            IsADirectoryError: "is a folder where a file is expected",
        }
        return MlpmemError(f"{e.filename} {what[type(e)]}", "check the paths you passed")
    return None


def _user_path(filename: str, argv: list[str]) -> bool:
    """Is ``filename`` one of the paths on the command line, or inside one?"""
    try:
        f = Path(os.path.abspath(filename))
    except (OSError, ValueError):
        return False
    for token in argv:
        token = token.split("=", 1)[-1]
        if not token or token.startswith("-"):
            continue
        p = Path(os.path.abspath(os.path.expanduser(token)))
        if f == p or p in f.parents:
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
