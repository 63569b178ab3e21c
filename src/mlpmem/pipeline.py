"""The whole experiment from one recipe: corpus -> datastore -> index -> kNN tuning
-> targets -> memory training -> evaluation. Finished stages are skipped (their
folder's config matches), interrupted ones resume.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlpmem.config import check_dict, from_dict
from mlpmem.errors import MlpmemError
from mlpmem.manifest import read_json, to_jsonable, write_json
from mlpmem.evaluate import KnnConfig
from mlpmem.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

RECIPES = Path(__file__).parent / "recipes"


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = 8
    memory: bool = True  # evaluate the trained memory too


def _sections() -> dict[str, type]:
    from mlpmem.corpus import CorpusConfig
    from mlpmem.datastore import DatastoreConfig
    from mlpmem.index import IndexConfig
    from mlpmem.train import TrainConfig

    return {"corpus": CorpusConfig, "datastore": DatastoreConfig, "index": IndexConfig, "knn": KnnConfig, "train": TrainConfig, "eval": EvalConfig}


@dataclass
class Recipe:
    out: str
    model: str = DEFAULT_MODEL
    sections: dict[str, Any] = field(default_factory=dict)


def load_recipe(source: str | Path | dict, out: str | None = None) -> Recipe:
    """Read and check a recipe (a YAML path, a built-in name, or a dict). All problems are reported at once."""
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.exists() and (RECIPES / f"{source}.yaml").exists():
            path = RECIPES / f"{source}.yaml"
        if not path.exists():
            builtin = ", ".join(p.stem for p in RECIPES.glob("*.yaml"))
            raise MlpmemError(f"recipe {source!r} does not exist", f"pass a YAML file or a built-in recipe ({builtin})")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise MlpmemError(f"recipe {path} is not valid YAML ({e})", "fix the YAML syntax")
    if out is not None:
        data["out"] = out
    sections = _sections()
    problems = []
    for key in data:
        if key not in sections and key not in ("out", "model"):
            problems.append(f"{key}: unknown section (known: out, model, {', '.join(sections)})")
    if not isinstance(data.get("out"), str):
        problems.append("out: required, the output folder (a string)")
    if not isinstance(data.get("model", DEFAULT_MODEL), str):
        problems.append("model: expected a string (hub name or local folder)")
    for name, cls in sections.items():
        problems += check_dict(cls, data.get(name) or {}, name)
    if problems:
        raise MlpmemError("the recipe has problems:\n  " + "\n  ".join(problems), "fix these keys (see `mlpmem run --help` and the built-in recipes)")
    built = {name: cls(**(data.get(name) or {})) for name, cls in sections.items()}
    model = data.get("model", DEFAULT_MODEL)
    built["corpus"].model = model
    built["datastore"].model = model
    return Recipe(out=data["out"], model=model, sections=built)


def run_pipeline(recipe: Recipe, overwrite: bool = False) -> dict:
    """Run every stage of ``recipe``; returns the report dict (also written to OUT/report.json)."""
    import numpy as np

    from mlpmem.corpus import build_corpus
    from mlpmem.datastore import build_datastore
    from mlpmem.evaluate import score_stored
    from mlpmem.index import KnnIndex, build_index
    from mlpmem.models import load_model, num_parameters
    from mlpmem.store import Datastore, feature_name
    from mlpmem.targets import TargetsConfig, build_targets
    from mlpmem.train import train_memory

    s = recipe.sections
    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recipe.json", {"out": recipe.out, "model": recipe.model, **{k: v for k, v in s.items()}})
    bundle = load_model(recipe.model, s["datastore"].dtype)
    model = bundle[0]

    build_corpus(out / "corpus", s["corpus"], overwrite)
    ds_cfg = s["datastore"]
    tcfg = s["train"]
    mem_site = _memory_site(model, ds_cfg, tcfg)
    if mem_site != (ds_cfg.layer, ds_cfg.site):
        ds_cfg = dataclasses.replace(ds_cfg, extra_sites=sorted(set(ds_cfg.extra_sites) | {f"{mem_site[0]}:{mem_site[1]}"}))
    build_datastore(out / "corpus", out / "datastore", ds_cfg, bundle, overwrite)
    build_datastore(out / "corpus", out / "valid", dataclasses.replace(ds_cfg, split="valid", lm_logprob=True), bundle, overwrite)
    build_index(out / "datastore", out / "index", s["index"], overwrite)

    ds = Datastore(out / "datastore")
    index = KnnIndex.open(out / "index", ds)
    train_values = ds.values()
    knn = tune_knn_cached(out / "knn.json", s["knn"], Datastore(out / "valid"), index, train_values)
    ...
    return {}


def _memory_site(model, ds_cfg, tcfg) -> tuple[int, str]:
    from mlpmem.models import resolve_layer

    layer = ds_cfg.layer if tcfg.input_layer is None else tcfg.input_layer
    site = tcfg.input_site or ds_cfg.site
    return resolve_layer(model, layer), site


def tune_knn_cached(path: Path, cfg: KnnConfig, valid_ds, index, train_values) -> dict:
    """Tune T and lambda on valid once; reuse the result while the inputs are unchanged."""
    from mlpmem.evaluate import score_stored, tune_knn

    key = {"config": to_jsonable(cfg), "valid": valid_ds.manifest.get("shards")[0]["arrays"]["keys"]["sha256"], "index": index.manifest.get("index_file", {}).get("sha256") if hasattr(index, "manifest") else None}
    if path.exists():
        old = read_json(path)
        if old.get("key") == key:
            return old
    valid = score_stored(valid_ds, index, train_values, cfg.k)
    if cfg.temperature is None:
        result = tune_knn(valid, cfg.temperatures)
    else:
        from mlpmem.evaluate import tune_lambda

        result = {"temperature": cfg.temperature, "lambda": tune_lambda(valid.lm_logprob, valid.knn_logprob(cfg.temperature))}
    if cfg.lam is not None:
        result["lambda"] = cfg.lam
    result["key"] = key
    write_json(path, result)
    return result
