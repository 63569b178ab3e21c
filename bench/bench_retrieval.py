"""kNN-LM as a model component (mlpmem.retrieval.KNNRetriever) against the evaluator, on a finished run (not a test).

    python bench/bench_retrieval.py --threads 2 --run runs/sotu   # ~10 min here
    .venv/bin/python bench/bench_retrieval.py --threads 2 --quick                                               # first 1000 test tokens

The run (default runs/sotu: SmolLM2-135M, State of the Union, 60k training tokens) is read, never
written. Its test split is scored twice:

1. by the evaluator (evaluate.score_online + summarize: per-target kNN-LM formula), as the run's
   report.json was made, at the run's T and lambdas;
2. by the component path, as the model class mixes: one LM forward per batch of windows (512 / 256,
   as the evaluator) with hooks at the datastore's site (and the memory's), full vocabulary rows
   for every kept position: log_softmax(LM), KNNRetriever(h) [n, V], the MLP memory's
   log_softmax [n, V], mixed by logaddexp. Four methods per batch, each with its own LM forward and
   timed on its own, in rotating order (LM alone, LM + kNN-LM, LM + memory, LM + both), so the
   machine's load falls on all of them alike; each runs --repeats times per batch and its fastest
   run counts (other processes on a shared machine only ever slow a run down).

Perplexity of the component path is compared with report.json and with the evaluator of this
run (tolerance: relative 1e-3). Writes bench/results/retrieval.json (--quick: retrieval_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from provenance import results_dir, start, write_result

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3  # relative, on perplexity: float32 full rows vs the evaluator's float64 per-target formula
METHODS = ("base", "knn_lm", "mlp_memory", "knn_lm+mlp_memory")


def batches(n_tokens: int, context: int, stride: int, batch_size: int):
    """The evaluator's windows, grouped as evaluate/datastore group them: consecutive windows of equal length."""
    from mlpmem.corpus import windows

    W = windows(n_tokens, context, stride)
    i = 0
    while i < len(W):
        j = i + 1
        while j < len(W) and j - i < batch_size and W[j, 1] - W[j, 0] == W[i, 1] - W[i, 0]:
            j += 1
        yield W[i:j]
        i = j


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--run", type=Path, default=ROOT / "runs/sotu", help="finished run: corpus, datastore, index, knn.json, train/memory, report.json"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="windows per LM forward (the run's eval batch size)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each method per batch; its time is the fastest (robust to other load)")
    p.add_argument("--quick", action="store_true", help="first 1000 test tokens; writes retrieval_quick.json")
    a = p.parse_args()
    started = start()

    import torch

    from mlpmem.corpus import Corpus
    from mlpmem.evaluate import score_online, summarize
    from mlpmem.interpolate import interpolate_logprobs, perplexity
    from mlpmem.memory import load_memory
    from mlpmem.modeling.read_site import ReadSite, capture
    from mlpmem.models import load_model
    from mlpmem.retrieval import knn_component

    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    report = json.loads((a.run / "report.json").read_text())
    model, tok, model_id = load_model(report["model_id"], "float32", "cpu")
    knn = knn_component(a.run, model, tok)  # k, T and lambda as the run's evaluation chose them; checked against the LM
    lam_knn = knn.meta["lambda"]
    memory, mmeta = load_memory(
        a.run / "train" / "memory", expect={"model_id": knn.meta["model_id"], "tokenizer_hash": knn.meta["tokenizer_hash"]}
    )
    memory.eval()
    lam_mem, w_both = report["lambda"]["mlp_memory"], report["lambda"]["both"]  # (LM, memory, kNN)
    corpus = Corpus(a.run / "corpus")
    tokens = corpus.tokens("test")
    if a.quick:
        tokens = tokens[:1000]
    ds_m = knn.index.datastore.manifest
    ctx, stride = ds_m["context"], ds_m["stride"]
    key_site, mem_site = (knn.meta["layer"], knn.meta["site"]), (int(mmeta["layer"]), str(mmeta["site"]))

    # 1. the evaluator, as report.json was made
    t0 = time.perf_counter()
    sc = score_online(
        model,
        tokens,
        ctx,
        stride,
        ReadSite(*key_site),
        knn.index,
        knn.values,
        knn.k,
        memory,
        ReadSite(*mem_site),
        a.batch_size,
        desc="evaluator",
    )
    ev = summarize(sc, knn.temperature, lam_knn, lam_mem, w_both)
    ev_seconds = time.perf_counter() - t0

    # 2. the component path: full rows, one LM forward per method per batch
    log_w = torch.log(torch.tensor(w_both, dtype=torch.float32))
    lps: dict[str, list] = {m: [] for m in METHODS}
    secs = {m: 0.0 for m in METHODS}
    parts = {"knn_search_and_rows": 0.0, "memory_rows": 0.0}
    n_tokens = len(tokens)
    tok_t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))

    def run_method(method: str, group: np.ndarray) -> torch.Tensor:
        ids = torch.stack([tok_t[b:e] for b, e, _ in group])
        length = ids.shape[1]
        stops = np.minimum(group[:, 1], n_tokens - 1)
        # kept positions of every window, as (batch row, position) pairs: only those are scored
        rows = np.concatenate([np.full(s - k, i) for i, (k, s) in enumerate(zip(group[:, 2], stops))])
        cols = np.concatenate([np.arange(k - b, s - b) for (b, _, k), s in zip(group, stops)])
        keep = length - int(cols.min())
        r, c = torch.from_numpy(rows), torch.from_numpy(cols - (length - keep))
        labels = torch.cat([tok_t[k + 1 : s + 1] for k, s in zip(group[:, 2], stops)])
        sites = {"base": [], "knn_lm": [key_site], "mlp_memory": [mem_site], "knn_lm+mlp_memory": [key_site, mem_site]}[method]
        with torch.inference_mode():
            with capture(model, [ReadSite(*s) for s in sites]) as store:
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
            lm = logits[r, c].float().log_softmax(-1)  # [n, V]
            h = {s: store[ReadSite(*s)][:, -keep:][r, c] for s in sites}
            if method in ("knn_lm", "knn_lm+mlp_memory"):
                t = time.perf_counter()
                knn_lp = knn(h[key_site])
                parts["knn_search_and_rows"] += time.perf_counter() - t
            if method in ("mlp_memory", "knn_lm+mlp_memory"):
                t = time.perf_counter()
                mem_lp = memory(h[mem_site].float()).float().log_softmax(-1)
                parts["memory_rows"] += time.perf_counter() - t
            if method == "base":
                mixed = lm
            elif method == "knn_lm":
                mixed = interpolate_logprobs(lm, knn_lp, lam_knn)
            elif method == "mlp_memory":
                mixed = interpolate_logprobs(lm, mem_lp, lam_mem)
            else:
                mixed = torch.logsumexp(torch.stack([lm + log_w[0], mem_lp + log_w[1], knn_lp + log_w[2]]), 0)
            return mixed.gather(-1, labels[:, None])[:, 0].double()

    from tqdm.auto import tqdm

    groups = list(batches(n_tokens, ctx, stride, a.batch_size))
    for gi, group in enumerate(tqdm(groups, desc="component path", unit="batch")):
        best = {m: math.inf for m in METHODS}
        for rep in range(a.repeats):
            for j in range(len(METHODS)):
                m = METHODS[(gi + rep + j) % len(METHODS)]
                t = time.perf_counter()
                lp = run_method(m, group)
                best[m] = min(best[m], time.perf_counter() - t)
                if rep == 0:
                    lps[m].append(lp)
        for m in METHODS:
            secs[m] += best[m]
    comp = {m: torch.cat(lps[m]).numpy() for m in METHODS}
    n = len(comp["base"])
    assert n == ev["n_tokens"], (n, ev["n_tokens"])
    ppl = {m: perplexity(comp[m]) for m in METHODS}
    tps = {m: n / secs[m] for m in METHODS}
    ev_ppl = ev["ppl"]
    rep_ppl = report["ppl"] if not a.quick else {}

    def gap(x: float, ref: float | None) -> dict | None:
        return (
            None
            if ref is None
            else {"reference": ref, "abs": x - ref, "rel": (x - ref) / ref, "within_tolerance": abs(x - ref) / ref <= TOLERANCE}
        )

    out = {
        "what": "KNNRetriever (kNN-LM as a model component) on the test split of a finished run: perplexity against report.json and the "
        "evaluator, tokens/s beside the LM alone and LM + MLP memory (each method its own LM forward, same batches, rotating order)",
        "run": str(a.run.relative_to(ROOT) if a.run.is_relative_to(ROOT) else a.run),
        "model_id": model_id,
        "n_tokens": n,
        "context": ctx,
        "stride": stride,
        "batch_size": a.batch_size,
        "repeats": a.repeats,
        "timing": "component: per batch, each method `repeats` times in rotating order, its fastest run counted; "
        "component_parts add up every run (all repeats)",
        "knn": {
            "k": knn.k,
            "temperature": knn.temperature,
            "lambda": lam_knn,
            "index_kind": knn.meta["index_kind"],
            "n_datastore": knn.meta["n_datastore"],
            "settings_from": knn.meta["settings_from"],
        },
        "lambda": {"mlp_memory": lam_mem, "both (LM, memory, kNN)": w_both},
        "tolerance_rel": TOLERANCE,
        "ppl": {"component": ppl, "evaluator_now": ev_ppl, "report": {m: rep_ppl.get(m) for m in METHODS} if rep_ppl else None},
        "gap_component_vs_report": {m: gap(ppl[m], rep_ppl.get(m)) for m in METHODS} if rep_ppl else None,
        "gap_component_vs_evaluator_now": {m: gap(ppl[m], ev_ppl.get(m)) for m in METHODS},
        "max_abs_logprob_diff_vs_evaluator": {
            "base": float(np.max(np.abs(comp["base"] - sc.lm_logprob))),
            "knn_lm": float(
                np.max(np.abs(comp["knn_lm"] - np.asarray(interpolate_logprobs(sc.lm_logprob, sc.knn_logprob(knn.temperature), lam_knn))))
            ),
        },
        "tokens_per_s": {
            "component": tps,
            "evaluator": ev["tokens_per_s"],
            "evaluator_protocol": "one LM forward shared, each method's extra work timed on its own",
        },
        "speed_vs_lm": {
            "component": {m: tps[m] / tps["base"] for m in METHODS},
            "evaluator": {m: v / ev["tokens_per_s"]["base"] for m, v in ev["tokens_per_s"].items()},
        },
        "seconds": {"component": secs, "component_parts": parts, "evaluator_total": ev_seconds, "evaluator": sc.seconds},
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    path = write_result(results_dir() / ("retrieval_quick.json" if a.quick else "retrieval.json"), out, started, default=float)
    print(
        json.dumps(
            {"ppl": out["ppl"], "tokens_per_s": out["tokens_per_s"]["component"], "speed_vs_lm": out["speed_vs_lm"]["component"]},
            indent=1,
            default=float,
        )
    )
    print(f"wrote {path}")
    if not math.isfinite(ppl["knn_lm"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
