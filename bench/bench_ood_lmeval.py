"""Every default, on text the memory never saw: lm-eval's rolling log-likelihood with a run's memory (not a test).

    python bench/bench_ood_lmeval.py [--run runs/sotu] [--gcide runs/gate/gcide_corpus] [--words 6000] [--quick]

What a user gets who loads a memory with no setting (``--model mlpmem --model_args memory=RUN/train/memory``:
the run's gate when it has one, else its valid-fitted lambda) against the base LM (``lambda_=0``, the LM bit for
bit), through lm-eval's ``loglikelihood_rolling`` on four kinds of text: GCIDE dictionary entries (the test split
of the corpus built as in bench_mixing.py's header), licence texts from /usr/share/common-licenses (legal prose),
Python source of a few standard-library modules (code, its lines joined by spaces as every kind's words are), and the
memory's own State of the Union test split (in domain, for contrast). Each text is cut into documents of
``--chunk`` words (lm-eval scores each document on its own); about ``--words`` words per kind. Bits per byte,
and the change against the base with a 95% paired bootstrap interval over documents. Writes
bench/results/ood_lmeval.json (``--quick``: 300 words per kind, ood_lmeval_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from bench_mixing import LICENSES
from provenance import results_dir, start, write_result

ROOT = Path(__file__).resolve().parents[1]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def licence_texts() -> list[str]:
    return [
        (Path("/usr/share/common-licenses") / n).read_text(errors="replace")
        for n in LICENSES
        if (Path("/usr/share/common-licenses") / n).is_file()
    ]


PYTHON_MODULES = ("argparse.py", "textwrap.py", "fractions.py", "csv.py", "calendar.py", "string.py")
PYTHON_VALID_MODULES = ("shutil.py", "tarfile.py", "inspect.py", "gettext.py", "pprint.py", "difflib.py")  # for choosing


def python_texts(modules: tuple[str, ...] = PYTHON_MODULES) -> list[str]:
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / n).read_text(errors="replace") for n in modules if (lib / n).is_file()]


def documents(texts: list[str], chunk: int, words: int) -> list[str]:
    """Documents of ``chunk`` words from ``texts`` in order, about ``words`` words in all."""
    from mlpmem.rag import chunk as split_words

    return split_words(texts, chunk)[: max(1, words // chunk)]


def paired_bpb(ll_a: np.ndarray, ll_b: np.ndarray, iters: int = 1000, seed: int = 0) -> dict:
    """Bits per byte of A relative to B (bpb_A / bpb_B - 1) over documents, with a 95% paired bootstrap interval."""
    idx = np.random.default_rng(seed).integers(0, len(ll_a), (iters, len(ll_a)))
    change = ll_a[idx].sum(1) / ll_b[idx].sum(1) - 1.0  # bpb = -sum ll / (sum bytes * ln 2): the bytes cancel
    lo, hi = np.percentile(change, [2.5, 97.5])
    return {"change": float(ll_a.sum() / ll_b.sum() - 1.0), "low": float(lo), "high": float(hi), "same": bool(lo <= 0.0 <= hi)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs/sotu")
    p.add_argument("--gcide", type=Path, default=ROOT / "runs/gate/gcide_corpus", help="a GCIDE corpus folder (its test split)")
    p.add_argument("--words", type=int, default=6000, help="words of each kind of text")
    p.add_argument("--chunk", type=int, default=150, help="words per document")
    p.add_argument("--work", type=Path, default=None, help="task files (default runs/bench_ood_lmeval[_quick])")
    p.add_argument(
        "--kinds",
        default="gcide,licences,python,sotu_test",
        help="kinds of text, comma-separated: gcide, licences, python, sotu_test, and for choosing gcide_valid, python_valid, sotu_valid "
        "(for choosing a setting without reading test)",
    )
    p.add_argument("--name", default="ood_lmeval", help="result file bench/results/NAME.json")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    started = start()

    import lm_eval
    from lm_eval.tasks import TaskManager

    import mlpmem.lm_eval_backend  # noqa: F401  (registers the mlpmem backend)
    from mlpmem.interpolate import interval_text
    from mlpmem.rag import split_texts

    suffix = "_quick" if a.quick else ""
    words = 300 if a.quick else a.words
    work = a.work or ROOT / f"runs/bench_ood_lmeval{suffix}" / a.name
    work.mkdir(parents=True, exist_ok=True)
    every = {
        "gcide": lambda: split_texts(a.gcide, "test"),
        "gcide_valid": lambda: split_texts(a.gcide, "valid"),
        "licences": licence_texts,
        "python": python_texts,
        "python_valid": lambda: python_texts(PYTHON_VALID_MODULES),
        "sotu_test": lambda: split_texts(a.run / "corpus", "test"),
        "sotu_valid": lambda: split_texts(a.run / "corpus", "valid"),
    }
    unknown = sorted(set(a.kinds.split(",")) - set(every))
    if unknown:
        p.error(f"unknown kinds {unknown} (known: {', '.join(every)})")
    kinds = {k: every[k]() for k in a.kinds.split(",")}
    tasks = []
    for kind, texts in kinds.items():
        docs = documents(texts, a.chunk, words)
        data = work / f"{kind}.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        (work / f"{kind}.yaml").write_text(TASK.format(name=f"ood_{kind}", data=json.dumps(str(data.resolve()))))
        tasks.append(f"ood_{kind}")
    manager = TaskManager(include_path=str(work), include_defaults=False)
    memory = a.run / "train/memory"
    systems = {"base": f"memory={memory},lambda_=0", "memory_defaults": f"memory={memory}"}
    per_doc: dict[str, dict[str, np.ndarray]] = {}
    mixing = None
    for name, args in systems.items():
        out = lm_eval.simple_evaluate(
            model="mlpmem", model_args=args, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0, verbosity="WARNING"
        )
        if name == "memory_defaults":
            mixing = out.get("config", {}).get("model_args")
        for t in tasks:
            samples = sorted(out["samples"][t], key=lambda s: s["doc_id"])
            per_doc.setdefault(t, {})[name] = np.array([s["bits_per_byte"][0] for s in samples], dtype=np.float64)  # (ll, bytes)
            per_doc[t]["bytes"] = np.array([s["bits_per_byte"][1] for s in samples], dtype=np.float64)
    result = {"what": __doc__.splitlines()[0], "run": str(a.run), "systems": systems, "model_args": mixing, "kinds": {}}
    for t in tasks:
        d = per_doc[t]
        bpb = {n: float(-d[n].sum() / (d["bytes"].sum() * math.log(2))) for n in systems}
        result["kinds"][t.removeprefix("ood_")] = {
            "documents": int(len(d["bytes"])),
            "bytes": int(d["bytes"].sum()),
            "bits_per_byte": bpb,
            "memory_vs_base": paired_bpb(d["memory_defaults"], d["base"]),
        }
    gate = (a.run / "gate").is_dir()
    result["mixing_by_default"] = "the run's gate" if gate else "the run's valid-fitted lambda (no gate)"
    write_result(results_dir() / f"{a.name}{suffix}.json", result, started)
    for kind, r in result["kinds"].items():
        iv = r["memory_vs_base"]
        print(
            f"{kind:10s} {r['documents']:3d} docs  base {r['bits_per_byte']['base']:.4f}  memory {r['bits_per_byte']['memory_defaults']:.4f} bpb  "
            + interval_text(iv)
        )


if __name__ == "__main__":
    main()
