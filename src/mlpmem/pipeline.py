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

    from mlpmem.targets import TargetsConfig

    return {"corpus": CorpusConfig, "datastore": DatastoreConfig, "index": IndexConfig, "knn": KnnConfig, "targets": TargetsConfig,
            "train": TrainConfig, "eval": EvalConfig}


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
    for key in ("k", "temperature"):
        if key in (data.get("targets") or {}):
            problems.append(f"targets.{key}: set it in the knn section (targets use the kNN-LM's k and tuned temperature)")
    for key in ("model",):
        for sec in ("corpus", "datastore"):
            if key in (data.get(sec) or {}):
                problems.append(f"{sec}.{key}: set the model once, at the top level")
    if problems:
        raise MlpmemError("the recipe has problems:\n  " + "\n  ".join(problems), "fix these keys (see `mlpmem run --help` and the built-in recipes)")
    built = {name: cls(**(data.get(name) or {})) for name, cls in sections.items()}
    model = data.get("model", DEFAULT_MODEL)
    built["corpus"].model = model
    built["datastore"].model = model
    return Recipe(out=data["out"], model=model, sections=built)


def run_pipeline(recipe: Recipe, overwrite: bool = False) -> dict:
    """Run every stage of ``recipe``; returns the report (also OUT/report.json and OUT/report.md)."""
    from mlpmem.corpus import Corpus, build_corpus
    from mlpmem.datastore import build_datastore
    from mlpmem.evaluate import fit_mixture_em, lambda_curve, score_online, score_stored, summarize, tune_lambda
    from mlpmem.index import KnnIndex, build_index
    from mlpmem.memory import load_memory
    from mlpmem.models import Site, load_model, num_parameters
    from mlpmem.store import Datastore
    from mlpmem.targets import build_targets
    from mlpmem.train import train_memory

    s = recipe.sections
    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recipe.json", {"out": recipe.out, "model": recipe.model, **s})
    bundle = load_model(recipe.model, s["datastore"].dtype)
    model = bundle[0]

    log.info("[1/7] corpus")
    build_corpus(out / "corpus", s["corpus"], overwrite)
    ds_cfg, tcfg = s["datastore"], s["train"]
    mem_layer, mem_site = _memory_site(model, ds_cfg, tcfg)
    key_site = Site(_resolve(model, ds_cfg.layer), ds_cfg.site)
    if (mem_layer, mem_site) != (key_site.layer, key_site.site):
        ds_cfg = dataclasses.replace(ds_cfg, extra_sites=sorted(set(ds_cfg.extra_sites) | {f"{mem_layer}:{mem_site}"}))
    tcfg = dataclasses.replace(tcfg, input_layer=mem_layer, input_site=mem_site)
    log.info("[2/7] datastore (train) and scored valid split")
    build_datastore(out / "corpus", out / "datastore", ds_cfg, bundle, overwrite)
    build_datastore(out / "corpus", out / "valid", dataclasses.replace(ds_cfg, split="valid", lm_logprob=True), bundle, overwrite)
    log.info("[3/7] index")
    build_index(out / "datastore", out / "index", s["index"], overwrite)
    ds, valid_ds = Datastore(out / "datastore"), Datastore(out / "valid")
    index = KnnIndex.open(out / "index", ds)
    train_values = ds.values()
    log.info("[4/7] kNN-LM temperature and lambda on valid")
    knn = tune_knn_cached(out / "knn.json", s["knn"], valid_ds, index, train_values)
    log.info("kNN-LM: T=%g lambda=%.3f (valid ppl %s)", knn["temperature"], knn["lambda"], knn.get("valid_ppl"))
    log.info("[5/7] kNN targets")
    tg_cfg = dataclasses.replace(s["targets"], k=s["knn"].k, temperature=knn["temperature"])
    build_targets(out / "datastore", out / "index", out / "targets", tg_cfg, overwrite)
    log.info("[6/7] memory training")
    train_memory(out / "datastore", out / "targets", out / "train", tcfg, valid_datastore_dir=out / "valid", init_lm=model,
                 meta={"model": recipe.model}, overwrite=overwrite)
    memory, meta = load_memory(out / "train" / "memory", expect={"model_id": ds.model_id, "tokenizer_hash": ds.tokenizer_hash})
    memory.eval()

    log.info("[7/7] evaluation: lambda on valid, then the %s split", s["eval"].split)
    valid = score_stored(valid_ds, index, train_values, s["knn"].k, memory, meta)
    valid_knn_lp = valid.knn_logprob(knn["temperature"])
    lam_mem = tune_lambda(valid.lm_logprob, valid.memory_logprob)
    w_both = fit_mixture_em([valid.lm_logprob, valid.memory_logprob, valid_knn_lp])
    curves = {"kNN-LM": lambda_curve(valid.lm_logprob, valid_knn_lp), "MLP memory": lambda_curve(valid.lm_logprob, valid.memory_logprob)}
    corpus = Corpus(out / "corpus")
    test = score_online(model, corpus.tokens(s["eval"].split), ds.manifest["context"], ds.manifest["stride"], key_site, index, train_values,
                        s["knn"].k, memory, Site(mem_layer, mem_site), s["eval"].batch_size, desc=f"scoring {s['eval'].split}")
    res = summarize(test, knn["temperature"], knn["lambda"], lam_mem, w_both)
    report = {
        "model": ds.model_id, "corpus": s["corpus"].source,
        "n_train_tokens": corpus.manifest["splits"]["train"]["n_tokens"], "n_test_tokens": corpus.manifest["splits"][s["eval"].split]["n_tokens"],
        "ppl": res["ppl"], "lambda": {"knn_lm": knn["lambda"], "mlp_memory": lam_mem, "both": w_both},
        "knn_temperature": knn["temperature"], "tokens_per_s": res["tokens_per_s"],
        "memory_params": memory.num_parameters(), "base_params": num_parameters(model),
        "memory_input": {"layer": mem_layer, "site": mem_site}, "k": s["knn"].k, "n_datastore": ds.n_rows,
        "valid_lambda_curves": curves, "train": read_json(out / "train" / "manifest.json").get("final_valid"),
    }
    write_json(out / "report.json", report)
    _plot_curves(curves, out / "lambda_curves.png")
    (out / "report.md").write_text(render_report(report))
    log.info("report: %s", out / "report.md")
    return report


def _resolve(model, layer: int) -> int:
    from mlpmem.models import resolve_layer

    return resolve_layer(model, layer)


def _plot_curves(curves, path: Path) -> None:
    from mlpmem.interpolate import plot_lambda_curves

    plot_lambda_curves(curves, path, "Valid perplexity vs interpolation weight lambda")


def render_report(r: dict) -> str:
    lines = [f"# mlpmem report: {r['model']} on {r['corpus']}", "",
             f"{r['n_train_tokens']:,} training tokens, {r['n_test_tokens']:,} test tokens; kNN-LM k={r['k']}, T={r['knn_temperature']:g}; "
             f"memory {r['memory_params'] / 1e6:.1f}M parameters (LM {r['base_params'] / 1e6:.1f}M), input layer {r['memory_input']['layer']} ({r['memory_input']['site']}).", "",
             "| method | test perplexity | tokens/s | lambda |", "|---|---|---|---|"]
    lam = {"knn_lm": r["lambda"]["knn_lm"], "mlp_memory": r["lambda"]["mlp_memory"]}
    for name, ppl in r["ppl"].items():
        tps = r["tokens_per_s"].get(name)
        lines.append(f"| {name} | {ppl:.3f} | {f'{tps:.0f}' if tps else '-'} | {f'{lam[name]:.3f}' if name in lam else '-'} |")
    lines += ["", "![lambda curves](lambda_curves.png)", "", "![training curve](train/training_curve.png)", ""]
    return "\n".join(lines)


def _memory_site(model, ds_cfg, tcfg) -> tuple[int, str]:
    from mlpmem.models import resolve_layer

    layer = ds_cfg.layer if tcfg.input_layer is None else tcfg.input_layer
    site = tcfg.input_site or ds_cfg.site
    return resolve_layer(model, layer), site


def tune_knn_cached(path: Path, cfg: KnnConfig, valid_ds, index, train_values) -> dict:
    """Tune T and lambda on valid once; reuse the result while its inputs are unchanged."""
    from mlpmem.evaluate import score_stored, tune_knn_for

    key = {"config": to_jsonable(cfg), "valid": valid_ds.manifest["shards"][0]["arrays"]["keys"]["sha256"], "index": index.manifest.get("index_file")}
    if path.exists() and read_json(path).get("key") == key:
        return read_json(path)
    result = tune_knn_for(cfg, score_stored(valid_ds, index, train_values, cfg.k))
    result["key"] = key
    write_json(path, result)
    return result


def quick_recipe(corpus: str, model: str, out: str) -> Recipe:
    """Default settings for a user's own corpus (``mlpmem run --corpus``)."""
    return load_recipe({"out": out, "model": model, "corpus": {"source": corpus}})
