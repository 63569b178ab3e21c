"""Datastore extraction speed against a plain forward pass, side by side (not a test).

    python bench/bench_extract.py [--context 512] [--stride 256] [--batch-size 8] [--tokens 16384] [--repeats 3] [--quick]
                                  [--corpus DIR] [--methods plain recompute cache ...] [--check-tokens 4096]

Methods (each may carry ``:bN`` for another batch size, ``:lwN`` for another
``datastore.LANE_WINDOWS`` (cache mode: at most N windows per lane in a block),
``:bf16`` for bfloat16 autocast, ``:tN`` for torch.set_num_threads(N)):

- ``plain``: the full model with logits (``use_cache=False``) over
  non-overlapping windows of C tokens, B at a time: tokens/s.
- ``recompute`` / ``cache``: ``datastore.iter_batches`` run shard by shard
  exactly as ``build_datastore`` runs it (key site = last layer's FFN input,
  early stop, keys converted to float16): new rows/s. Cache mode's lanes each start with a whole
  window (C tokens for S rows), so its cost per row depends on ``--tokens``: the default 16384 tokens
  make one block of 63 windows in 16 lanes (1.23 computed tokens per row, 1.47 at 8192), where
  build_datastore's full shards of 256 windows make 1.06.

Methods run in a different order on every repeat (rotated) and the report gives
medians, plus the median of the per-repeat ratios to ``plain`` (each ratio
compares two runs that were close in time: the machine is shared and noisy).
``--check-tokens`` also scores that many tokens with LM log-probs in both
modes and reports both perplexities and how far the cache-mode keys are from
the recompute keys. Writes bench/results/extract.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from provenance import results_dir, start, write_result

from mlpmem.corpus import Corpus, CorpusConfig, load_documents, windows
from mlpmem.datastore import DatastoreConfig, iter_batches
from mlpmem.models import load_model, separator_id
from mlpmem.modeling.read_site import ReadSite, resolve_layer
import mlpmem.datastore as dsmod


def token_stream(tok, corpus: str | None, n: int) -> np.ndarray:
    if corpus:
        return Corpus(Path(corpus)).tokens("train")[:n].astype(np.int64)
    sep, ids = separator_id(tok), []
    for d in load_documents(CorpusConfig()):
        ids += tok(d.text)["input_ids"] + [sep]
        if len(ids) >= n:
            break
    return np.asarray(ids[:n], dtype=np.int64)


def parse_method(text: str, batch_size: int) -> dict:
    name, *opts = text.split(":")
    m = {"spec": text, "name": name, "batch_size": batch_size, "lane_windows": dsmod.LANE_WINDOWS, "bf16": False, "threads": None}
    for o in opts:
        if o == "bf16":
            m["bf16"] = True
        elif o.startswith("lw"):
            m["lane_windows"] = int(o[2:])
        elif o.startswith("b"):
            m["batch_size"] = int(o[1:])
        elif o.startswith("t"):
            m["threads"] = int(o[1:])
        else:
            raise SystemExit(f"unknown option {o!r} in method {text!r}")
    if name not in ("plain", "recompute", "cache"):
        raise SystemExit(f"unknown method {name!r}")
    return m


def run_method(model, tokens: np.ndarray, m: dict, a) -> float:
    """One timed pass; returns new tokens (rows) per second."""
    threads = torch.get_num_threads()
    if m["threads"]:
        torch.set_num_threads(m["threads"])
    dsmod.LANE_WINDOWS = m["lane_windows"]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if m["bf16"] else contextlib.nullcontext()
    try:
        with amp:
            t0 = time.perf_counter()
            if m["name"] == "plain":
                C, B = a.context, m["batch_size"]
                n_win = len(tokens) // C
                ids = torch.from_numpy(tokens[: n_win * C]).view(n_win, C)
                with torch.inference_mode():
                    for i in range(0, n_win, B):
                        model(input_ids=ids[i : i + B], use_cache=False)
                return n_win * C / (time.perf_counter() - t0)
            sites = {"keys": ReadSite(resolve_layer(model, -1), "ffn_input")}
            W = windows(len(tokens), a.context, a.stride)
            rows = 0
            for lo in range(0, len(W), a.windows_per_shard):  # shard by shard, as build_datastore does
                rng = (lo, min(lo + a.windows_per_shard, len(W)))
                for b in iter_batches(model, tokens, a.context, a.stride, sites, m["batch_size"], False, rng, mode=m["name"]):
                    b.features["keys"].to(torch.float16).numpy()
                    rows += b.row_end - b.row_start
            assert rows == len(tokens) - 1
            return rows / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        dsmod.LANE_WINDOWS = a.lane_windows_default


def check(model, tokens: np.ndarray, a) -> dict:
    """Perplexity and keys of the two modes on the same tokens (one shard, as build_datastore would).

    Batch size 1 gives C // S lanes: with more lanes than windows every lane would be a
    single whole window, the same as recompute, and the check would prove nothing.
    """
    sites = {"keys": ReadSite(resolve_layer(model, -1), "ffn_input")}
    W = windows(len(tokens), a.context, a.stride)
    out = {}
    for mode in ("recompute", "cache"):
        lps, keys = [], []
        for b in iter_batches(model, tokens, a.context, a.stride, sites, 1, True, (0, len(W)), mode=mode):
            lps.append(b.lm_logprob.double().numpy())
            keys.append(b.features["keys"].float().numpy())
        out[mode] = (np.concatenate(lps), np.concatenate(keys))
    (lp_r, k_r), (lp_c, k_c) = out["recompute"], out["cache"]
    first = min(a.context, len(tokens)) - 1  # the stream's first window: the same context in both modes
    sq = ((k_c - k_r) ** 2).sum(-1)
    ppl_r, ppl_c = float(np.exp(-lp_r.mean())), float(np.exp(-lp_c.mean()))
    return {
        "tokens": len(tokens),
        "lanes": a.context // a.stride,
        "ppl_recompute": ppl_r,
        "ppl_cache": ppl_c,
        "ppl_rel_diff": ppl_c / ppl_r - 1,
        "first_window_max_abs_key_diff": float(np.abs(k_c[:first] - k_r[:first]).max()),
        "first_window_max_abs_logprob_diff": float(np.abs(lp_c[:first] - lp_r[:first]).max()),
        "key_sq_l2_cache_vs_recompute": {"median": float(np.median(sq[first:])), "p90": float(np.percentile(sq[first:], 90))},
        "key_sq_norm_median": float(np.median((k_r**2).sum(-1))),
        "note": "squared L2 between the two modes' keys of the same position, after the first window; "
        "SPEC: nearest-neighbour squared L2 between SmolLM2 keys is about 12",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", help="a corpus folder (its train split); default: the built-in documents")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--windows-per-shard", type=int, default=DatastoreConfig.windows_per_shard)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["plain", "recompute", "cache"])
    p.add_argument("--check-tokens", type=int, default=4096, help="0 skips the perplexity/keys check")
    p.add_argument("--out", default=None, help="default: bench/results/extract.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 1024 tokens, 1 repeat, writes extract_quick.json")
    a = p.parse_args()
    started = start()
    a.out = a.out or str(results_dir() / "extract.json")
    if a.quick:
        a.tokens, a.repeats, a.check_tokens = 1024, 1, 1024
        a.out = a.out.replace("extract.json", "extract_quick.json")
    logging.basicConfig(level=logging.WARNING)
    a.lane_windows_default = dsmod.LANE_WINDOWS
    model, tok, model_id = load_model(a.model)
    tokens = token_stream(tok, a.corpus, max(a.tokens, a.check_tokens))
    bench_tokens = tokens[: a.tokens]
    methods = [parse_method(s, a.batch_size) for s in a.methods]
    for m in methods:  # warm-up: first-call allocations and lazy init stay out of the timings
        run_method(model, bench_tokens[: a.context * 2 + 1], m, a)
    speeds = {m["spec"]: [] for m in methods}
    for r in range(a.repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            speeds[m["spec"]].append(run_method(model, bench_tokens, m, a))
            print(f"repeat {r}: {m['spec']:<20} {speeds[m['spec']][-1]:8.1f} tok/s", flush=True)
    med = {k: float(np.median(v)) for k, v in speeds.items()}
    base = methods[0]["spec"] if methods[0]["name"] == "plain" else None
    result = {
        "model": model_id,
        "context": a.context,
        "stride": a.stride,
        "batch_size": a.batch_size,
        "tokens": len(bench_tokens),
        "windows_per_shard": a.windows_per_shard,
        "lane_windows": a.lane_windows_default,
        "sink_tokens": dsmod.SINK_TOKENS,
        "repeats": a.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "tokens_per_s": {k: {"median": med[k], "all": [round(x, 1) for x in v]} for k, v in speeds.items()},
    }
    if base:
        result["ratio_to_plain"] = {
            k: {"of_medians": med[k] / med[base], "median_per_repeat": float(np.median(np.asarray(v) / np.asarray(speeds[base])))}
            for k, v in speeds.items()
            if k != base
        }
    if a.check_tokens:
        result["check"] = check(model, tokens[: a.check_tokens], a)
    write_result(a.out, result, started, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
