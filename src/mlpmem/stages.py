"""The stage registry: one entry per stage (name, config class, inputs, build function).

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


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    ``name``: its recipe section. ``verb``: its CLI verb (None: a section of ``mlpmem run``
    only). ``inputs``: the stage folders it reads, in the build function's order (one
    required ``--NAME`` flag each). ``build``: the library function (``build(*inputs, out,
    cfg, overwrite)`` for the verbs the CLI calls directly). ``device``: "" (runs no model),
    "device" (--device) or "device+dtype" (--device and --dtype; a config with its own
    dtype field takes --device only). ``title``: the line ``mlpmem run`` logs for it.
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

    def config_class(self) -> type:
        return _load(self.config)

    def build_fn(self) -> Callable:
        return _load(self.build)


STAGES: tuple[Stage, ...] = (
    Stage(
        "corpus",
        "mlpmem.corpus:CorpusConfig",
        "mlpmem.corpus:build_corpus",
        "split a corpus by document and tokenize it",
        verb="corpus",
        title="corpus",
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
    ),
    Stage(
        "index",
        "mlpmem.index:IndexConfig",
        "mlpmem.index:build_index",
        "build a FAISS index over a datastore's keys",
        verb="index",
        inputs=(("datastore", ""),),
        title="index",
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
    ),
    Stage(
        "targets",
        "mlpmem.targets:TargetsConfig",
        "mlpmem.targets:build_targets",
        "kNN target distributions for every datastore row",
        verb="targets",
        inputs=(("datastore", ""), ("index", "")),
        title="kNN targets",
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
    ),
    Stage("eval", "mlpmem.pipeline:EvalConfig", "mlpmem.pipeline:run_pipeline", title="evaluation: lambda on valid, then the test split"),
    Stage("gate", "mlpmem.gate:GateConfig", "mlpmem.gate:build_gate_stage", title="mixing gate (eval.mixing gated)"),
)


def stage(name: str) -> Stage:
    """The stage of recipe section ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)


def by_verb() -> dict[str, Stage]:
    return {s.verb: s for s in STAGES if s.verb}


def pipeline_stages() -> list[Stage]:
    """The stages ``mlpmem run`` runs in order, each with a title (eval last; the gate is part of it)."""
    return [s for s in STAGES if s.name != "gate"]


def sections() -> dict[str, type]:
    """Recipe section -> config class (every stage, imported now)."""
    return {s.name: s.config_class() for s in STAGES}


def add_stage_arguments(sp, s: Stage) -> None:
    """A stage verb's flags: its inputs (required), --out, --overwrite, the device flags, then its config's fields."""
    from mlpmem.config import add_arguments, add_device_arguments

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

    from mlpmem.config import from_args

    kwargs = {"device": a.device} if s.device else {}
    return s.build_fn()(
        *(Path(getattr(a, name)) for name, _ in s.inputs), Path(a.out), from_args(s.config_class(), a), overwrite=a.overwrite, **kwargs
    )
