"""The stage registry: the one description of each stage and of every kind of folder mlpmem writes.

A stage's entry says its name (recipe section), config class, inputs, build function, CLI verb, the
files its folder holds (what ``--overwrite`` may delete and what tells its folder from a stranger's),
the settings added after its first version (so older folders still match), and whether its work
splits over the processes of torchrun / accelerate launch. Folders that are not pipeline stages
(a run, an export, a fine-tune, tasks, a probe) are described by :data:`FOLDERS` the same way.

It drives both entry points: ``mlpmem run`` reads its recipe sections (one per
stage config) and its stage list from here, and the CLI builds each stage verb's
flags from here (one required ``--INPUT`` per input folder, ``--out``, ``--overwrite``,
``--device``/``--dtype`` for stages that run the LM, then one flag per config field).
Classes and functions are named as ``"module:attribute"`` and imported when used,
so that ``mlpmem --help`` imports neither torch nor the stage modules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# eval.mixing: "auto" is "gated" when valid has the positions a gate needs (pipeline.resolve_mixing), else "fixed".
# Here, not in the pipeline, so that `mlpmem run --help` states them without importing the stages.
MIXING_SETTINGS = ("auto", "fixed", "gated")
# the fewest valid positions a setting is fitted on: below these a fitted lambda or T is noise, and a lambda of exactly
# 0 or 1 fitted on a handful of tokens gives an infinite test perplexity; the gate holds out whole blocks of 256
# positions (gate.holdout_mask), so it needs at least two
MIN_VALID_POSITIONS = {"fixed": 32, "gated": 257}


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    ``name``: its recipe section. ``verb``: its CLI verb (None: a section of ``mlpmem run``
    only). ``inputs``: the stage folders it reads, in the build function's order (one
    required ``--NAME`` flag each). ``build``: the library function (``build(*inputs, out,
    cfg, overwrite)`` for the verbs the CLI calls directly). ``device``: "" (runs no model),
    "device" (--device) or "device+dtype" (--device and --dtype; a config with its own
    dtype field takes --device only). ``title``: the line ``mlpmem run`` logs for it (``{split}``: the
    split eval scores). ``step``: what ``mlpmem run`` calls for it, with the state its stages share
    (``mlpmem.pipeline.Run``); a stage without one runs inside another's step (the gate, in eval's).
    """

    name: str
    config: str
    build: str
    help: str = ""
    verb: str | None = None
    inputs: tuple[tuple[str, str], ...] = ()  # (flag name, help)
    device: str = ""
    overwrite: bool = True
    title: str = ""
    kind: str = ""  # the folder kind in its marker and manifest (default: the name)
    files: tuple[str, ...] = ()  # what the folder holds besides config, manifest, marker, lock, progress and *.partial
    # settings added after the stage's first version, with the value a folder written before them used: such a
    # folder matches a new config whose value is that one (dotted paths into the resolved config)
    added_settings: tuple[tuple[str, Any], ...] = ()
    splits: bool = False  # its work splits over the processes of torchrun / accelerate launch (else rank 0 runs it)
    step: str = ""

    @property
    def folder_kind(self) -> str:
        return self.kind or self.name

    def config_class(self) -> type:
        return _load(self.config)

    def build_fn(self) -> Callable:
        return _load(self.build)

    def step_fn(self) -> Callable:
        return _load(self.step)


STAGES: tuple[Stage, ...] = (
    Stage(
        "corpus",
        "mlpmem.corpus:CorpusConfig",
        "mlpmem.corpus:build_corpus",
        "split a corpus by document and tokenize it",
        verb="corpus",
        title="corpus",
        step="mlpmem.pipeline:step_corpus",
        files=("tokens.*.npy", "doc_index.*.npy", "documents.json"),
    ),
    Stage(
        "datastore",
        "mlpmem.datastore:DatastoreConfig",
        "mlpmem.datastore:build_datastore",
        "extract (hidden state -> next token) pairs from a corpus split",
        verb="datastore",
        inputs=(("corpus", "folder written by `mlpmem corpus`"),),
        device="device",
        title="datastore (train) and scored valid split",
        step="mlpmem.pipeline:step_datastore",
        files=("*-[0-9][0-9][0-9][0-9][0-9].npy",),
        # datastores before the bos setting had no prefix; before the modes, every one recomputed
        added_settings=(("config.mode", "recompute"), ("extract_mode", "recompute"), ("config.batch_tokens", None), ("config.bos", False)),
        splits=True,
    ),
    Stage(
        "index",
        "mlpmem.index:IndexConfig",
        "mlpmem.index:build_index",
        "build a FAISS index over a datastore's keys",
        verb="index",
        inputs=(("datastore", ""),),
        title="index",
        step="mlpmem.pipeline:step_index",
        files=("index.faiss",),
        added_settings=(("recall_target", None),),  # folders before it held a fixed scan (nprobe in their manifest)
    ),
    Stage(
        "knn",
        "mlpmem.evaluate:KnnConfig",
        "mlpmem.evaluate:run_knnlm",
        "perplexity of the LM alone and with kNN-LM (T and lambda tuned on valid)",
        verb="knnlm",
        inputs=(("corpus", ""), ("datastore", ""), ("index", "")),
        device="device+dtype",
        overwrite=False,
        title="kNN-LM temperature and lambda on valid",
        step="mlpmem.pipeline:step_knn",
        splits=True,
    ),
    Stage(
        "targets",
        "mlpmem.targets:TargetsConfig",
        "mlpmem.targets:build_targets",
        "kNN target distributions for every datastore row",
        verb="targets",
        inputs=(("datastore", ""), ("index", "")),
        title="kNN targets",
        step="mlpmem.pipeline:step_targets",
        files=("ids-*.npy", "probs-*.npy"),
        splits=True,
    ),
    Stage(
        "train",
        "mlpmem.train:TrainConfig",
        "mlpmem.train:train_memory",
        "train an MLP memory on a datastore and its kNN targets",
        verb="train",
        inputs=(("datastore", ""), ("targets", "")),
        device="device+dtype",
        title="memory training",
        step="mlpmem.pipeline:step_train",
        kind="memory",
        files=("memory", "best", "checkpoints", "metrics.jsonl", "training_curve.png"),
        # folders before keep_best and patience kept the last step's memory; before dropout, none ran
        added_settings=(
            ("config.keep_best", False),
            ("config.patience", 0),
            ("config.dropout", 0.0),
            ("config.head_rank", 0),
            ("config.head_vocab", "full"),
        ),
        splits=True,
    ),
    Stage(
        "eval",
        "mlpmem.pipeline:EvalConfig",
        "mlpmem.pipeline:run_pipeline",
        title="evaluation: lambda on valid, then the {split} split",
        step="mlpmem.pipeline:step_eval",
    ),
    Stage(
        "gate",
        "mlpmem.gate:GateConfig",
        "mlpmem.gate:build_gate_stage",
        title="mixing gate: fit on valid, then the gated figures beside the fixed ones",  # inside eval's step
        files=("model.safetensors", "gate_config.json"),
        added_settings=(("gate.centroids", 0), ("gate.centroid_tokens", 8192)),
    ),
)


@dataclass(frozen=True)
class Folder:
    """A kind of folder mlpmem writes that is not a pipeline stage: its files, as a Stage's, and the file that shows
    a folder of this kind was written by mlpmem before folders had markers (default config.json)."""

    kind: str
    files: tuple[str, ...]
    legacy_sign: str | None = None
    splits: bool = False


FOLDERS: tuple[Folder, ...] = (
    Folder("probe", ("items.jsonl", "probe.yaml")),
    Folder("tasks_source", ("COPYRIGHT.wordnet", "synsets.jsonl", "wordnet.jsonl")),  # mlpmem tasks source
    Folder("tasks", ("utils.py", "*.jsonl", "*.yaml")),  # mlpmem tasks build
    Folder("finetune", ("model", "memory", "metrics.jsonl", "*.partial")),  # mlpmem finetune
    Folder("export", ("memory", "base", "*.json", "*.py", "*.txt", "*.model", "*.jinja", "*.safetensors", "README.md")),
    Folder(
        "run",
        (
            "corpus",
            "datastore",
            "valid",
            "index",
            "targets",
            "valid_targets",
            "train",
            "gate",
            "knn.json",
            "recipe.json",
            "report.json",
            "report.md",
            "lambda_curves.png",
        ),
        legacy_sign="recipe.json",
        splits=True,
    ),
)


def folder_files() -> dict[str, tuple[str, ...]]:
    """Folder kind -> the files it holds (every stage and every other folder kind)."""
    return {**{s.folder_kind: s.files for s in STAGES if s.files}, **{f.kind: f.files for f in FOLDERS}}


def added_settings() -> dict[str, dict[str, Any]]:
    """Folder kind -> {dotted setting: the value folders written before it used}."""
    return {s.folder_kind: dict(s.added_settings) for s in STAGES if s.added_settings}


def legacy_signs() -> dict[str, str]:
    return {f.kind: f.legacy_sign for f in FOLDERS if f.legacy_sign}


def splits_work(verb: str) -> bool:
    """Does ``verb`` split its work over the processes of torchrun / accelerate launch? The others run on rank 0 alone."""
    return any(s.splits for s in STAGES if s.verb == verb) or any(f.splits for f in FOLDERS if f.kind == verb)


def stage(name: str) -> Stage:
    """The stage of recipe section ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)


def by_verb() -> dict[str, Stage]:
    return {s.verb: s for s in STAGES if s.verb}


def pipeline_stages() -> list[Stage]:
    """The stages ``mlpmem run`` runs in order: those with a step (eval last; the gate runs inside it)."""
    return [s for s in STAGES if s.step]


def sections() -> dict[str, type]:
    """Recipe section -> config class (every stage, imported now)."""
    return {s.name: s.config_class() for s in STAGES}


def add_stage_arguments(sp, s: Stage) -> None:
    """A stage verb's flags: its inputs (required), --out, --overwrite, the device flags, then its config's fields."""
    from mlpmem.typed_config import add_arguments, add_device_arguments

    for name, help_ in s.inputs:
        sp.add_argument(f"--{name}", required=True, **({"help": help_} if help_ else {}))
    sp.add_argument("--out", required=True)
    if s.overwrite:
        sp.add_argument("--overwrite", action="store_true")
    if s.device:
        add_device_arguments(sp, dtype=s.device == "device+dtype")
    add_arguments(sp, s.config_class())


def run_verb(s: Stage, a) -> Any:
    """Call a stage's build function with a verb's parsed flags: ``build(*inputs, out, cfg, overwrite=[, device=])``."""
    from pathlib import Path

    from mlpmem.typed_config import from_args

    kwargs = {"device": a.device} if s.device else {}
    return s.build_fn()(
        *(Path(getattr(a, name)) for name, _ in s.inputs), Path(a.out), from_args(s.config_class(), a), overwrite=a.overwrite, **kwargs
    )
