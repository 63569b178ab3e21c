"""Two memories on one LM through the model class (issue 12 item 2; not a test).

    nice python bench/bench_multi_memory.py --threads 2            # ~10-20 min here
    nice python bench/bench_multi_memory.py --threads 2 --tokens 500   # smoke test

MLPMemoryForCausalLM.from_memory([runs/sotu/train/memory, runs/gate/gcide20k/train/memory])
(SmolLM2-135M; the memories bench/bench_mixing.py --router measured in the scoring path,
bench/results/mixing_router.json), a router fitted and attached by mlpmem.transformers_integration.fit_router on the
first --tokens tokens of each domain's valid split, then every system scored on the first --tokens
tokens of each domain's test split through the model class's forward (windows 512 / 256, as the
evaluator): the LM alone (lambda_=0), each memory alone at its own lambda (weights with 0 for the
other memory, which is then not run), both at the EM-fitted fixed weights, both routed. Each is
compared with the scoring path's perplexity in mixing_router.json.

Cost, in a separate timing pass (the same batch of 4 windows through each system, a warm-up call,
then --timing-repeats rounds in rotated order, medians): the router's share of the forward is
(routed - fixed) / routed with the same two memories; the gate's share is measured the same way
on a one-memory model (the SOTU memory with a gate fitted on runs/bench_mixing/valid.npz, the
scores bench_mixing.py cached), gated against fixed.
Writes bench/results/multi_memory.json (--tokens other than 3000: multi_memory_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from provenance import results_dir, start, write_result

ROOT = Path(__file__).resolve().parents[1]


def score_systems(systems: dict, tokens: np.ndarray, context: int = 512, stride: int = 256, batch_size: int = 8) -> dict:
    """Per system (name -> (model, call kwargs)): the log-prob of every token after the first [N] and the forward's seconds.

    The windows and the kept positions are the evaluator's (corpus.windows); each batch of windows runs every system once.
    """
    import torch

    from mlpmem.corpus import window_batches, windows

    W = windows(len(tokens), context, stride)
    tok_t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    n = len(tok_t)
    lps = {k: [] for k in systems}
    secs = dict.fromkeys(systems, 0.0)
    for group in window_batches(W, batch_size):
        ids = torch.stack([tok_t[b:e] for b, e, _ in group])
        stops = np.minimum(group[:, 1], n - 1)
        keep = int((group[:, 1] - group[:, 2]).max())
        for name, (model, kw) in systems.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model(input_ids=ids, use_cache=False, logits_to_keep=keep, **kw).logits
            secs[name] += time.perf_counter() - t0
            for w, (b, e, k) in enumerate(group):
                s, t = k - b, stops[w] - b
                rows = out[w, s - (e - b) + keep : t - (e - b) + keep]
                lps[name].append(rows.gather(-1, tok_t[k + 1 : stops[w] + 1, None])[:, 0].double().numpy())
    return {k: (np.concatenate(v), secs[k]) for k, v in lps.items()}


def time_systems(systems: dict, ids, keep: int, repeats: int) -> dict:
    """Median seconds of one forward per system on the same batch ``ids`` [B, T]: one untimed warm-up call each, then
    ``repeats`` rounds, the order of the systems rotated every round (so a busy machine slows them alike)."""
    import torch

    names = list(systems)
    times = {k: [] for k in names}
    for r in range(-1, repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, kw = systems[name]
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False, logits_to_keep=keep, **kw)
            if r >= 0:
                times[name].append(time.perf_counter() - t0)
    return {k: {"median_s": float(np.median(v)), "all_s": v} for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sotu", type=Path, default=ROOT / "runs/sotu", help="run with corpus/ and train/memory (read only)")
    p.add_argument("--gcide", type=Path, default=ROOT / "runs/gate/gcide20k", help="second run (GCIDE), as bench_mixing.py --router")
    p.add_argument("--reference", type=Path, default=None, help="the scoring path's numbers (default: bench/results/mixing_router.json)")
    p.add_argument("--gate-scores", type=Path, default=ROOT / "runs/bench_mixing/valid.npz", help="SOTU valid scores to fit the gate on")
    p.add_argument("--tokens", type=int, default=3000, help="tokens per split and domain (mixing_router.json used 3000)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tolerance", type=float, default=0.002, help="relative perplexity difference allowed against the reference")
    p.add_argument("--timing-repeats", type=int, default=5, help="rounds of the timing pass (one forward of 4 windows of 512 per system)")
    a = p.parse_args()
    started = start()
    a.reference = a.reference or results_dir() / "mixing_router.json"

    import torch

    from mlpmem.corpus import Corpus
    from mlpmem.gate import GateConfig, MixScores, fit_gate, gate_meta
    from mlpmem.transformers_integration import MLPMemoryForCausalLM, fit_router
    from mlpmem.interpolate import perplexity

    if a.threads:
        torch.set_num_threads(a.threads)
    ref = json.loads(a.reference.read_text())
    n = a.tokens
    t0 = time.perf_counter()
    model = MLPMemoryForCausalLM.from_memory([a.sotu / "train/memory", a.gcide / "train/memory"], names=["sotu", "gcide"])
    load_s = time.perf_counter() - t0
    corpora = {"sotu": Corpus(a.sotu / "corpus"), "gcide": Corpus(a.gcide / "corpus")}
    t0 = time.perf_counter()
    record = fit_router(model, [corpora[d].tokens("valid")[:n] for d in corpora], 512, 256, GateConfig(), batch_size=8)
    router_fit_s = time.perf_counter() - t0
    print(
        f"router fitted in {router_fit_s:.0f} s: held-out NLL {record['held_out_nll']:.4f} (scoring path's fit: "
        f"{ref['router_record']['held_out_nll']:.4f})",
        file=sys.stderr,
    )

    # the one-memory model for the gate's cost: the same LM and SOTU memory, a gate fitted on the cached valid scores
    gcfg = GateConfig()
    gate, grec = fit_gate(MixScores.load(a.gate_scores), gcfg)
    sotu_mem, sotu_meta = model.memory, model.component_meta("sotu")
    lam_report = json.loads((a.sotu / "report.json").read_text())["lambda"]["mlp_memory"]
    one = MLPMemoryForCausalLM.from_parts(
        model.lm,
        sotu_mem,
        sotu_meta,
        tokenizer=model.tokenizer,
        base_model=model.config.base_model,
        lambda_=lam_report,
        gate=gate,
        gate_meta=gate_meta(sotu_mem, gcfg, grec, sotu_meta),
    )

    lam_own, w_fixed = ref["lambda_own"], ref["weights_fixed"]
    systems = {
        "base": (model, {"lambda_": 0.0}),
        "SOTU memory alone (fixed lambda)": (model, {"weights": [1 - lam_own["sotu"], lam_own["sotu"], 0.0]}),
        "GCIDE memory alone (fixed lambda)": (model, {"weights": [1 - lam_own["gcide"], 0.0, lam_own["gcide"]]}),
        "both, fixed weights (EM)": (model, {"weights": w_fixed}),
        "both, router": (model, {"mixing": "routed"}),
        "SOTU memory, fixed lambda (one-memory model)": (one, {"mixing": "fixed"}),
        "SOTU memory, gated (one-memory model)": (one, {"mixing": "gated"}),
    }
    scored = {}
    for d, c in corpora.items():
        t0 = time.perf_counter()
        scored[d] = score_systems(systems, c.tokens("test")[:n])
        print(f"{d} test scored by {len(systems)} systems in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows, checks = {}, {}
    for name in systems:
        r = {d: perplexity(scored[d][name][0]) for d in corpora}
        r["mixed"] = perplexity(np.concatenate([scored[d][name][0] for d in corpora]))
        r["seconds"] = sum(scored[d][name][1] for d in corpora)
        r["tokens_per_second"] = sum(len(scored[d][name][0]) for d in corpora) / r["seconds"]
        rows[name] = r
        if name in ref["ppl"]:
            diff = {d: r[d] / ref["ppl"][name][d] - 1 for d in ("sotu", "gcide", "mixed")}
            checks[name] = {
                "reference": ref["ppl"][name],
                "relative_difference": diff,
                "within_tolerance": bool(all(abs(x) <= a.tolerance for x in diff.values())),
            }
    # the cost: the same batch (4 windows of 512 from the SOTU test split, the last 256 positions kept) through each system
    timed_names = [
        "base",
        "both, fixed weights (EM)",
        "both, router",
        "SOTU memory, fixed lambda (one-memory model)",
        "SOTU memory, gated (one-memory model)",
    ]
    toks = torch.from_numpy(np.asarray(corpora["sotu"].tokens("test")[: 4 * 512], dtype=np.int64)).reshape(-1, 512)
    timing = time_systems({k: systems[k] for k in timed_names}, toks, 256, a.timing_repeats)
    t = {k: v["median_s"] for k, v in timing.items()}
    router_share = (t["both, router"] - t["both, fixed weights (EM)"]) / t["both, router"]
    gate_share = (t["SOTU memory, gated (one-memory model)"] - t["SOTU memory, fixed lambda (one-memory model)"]) / t[
        "SOTU memory, gated (one-memory model)"
    ]
    routed, own = (
        rows["both, router"],
        {"sotu": rows["SOTU memory alone (fixed lambda)"], "gcide": rows["GCIDE memory alone (fixed lambda)"]},
    )
    goal = {d: routed[d] / own[d][d] - 1 for d in corpora}
    notes = [
        "reproduction of the scoring path (mixing_router.json), relative test perplexity differences: "
        + "; ".join(f"{k}: " + ", ".join(f"{d} {100 * x:+.3f}%" for d, x in c["relative_difference"].items()) for k, c in checks.items()),
        f"router (fitted through mlpmem.transformers_integration.fit_router): held-out NLL {record['held_out_nll']:.5f}, the scoring path's fit "
        f"{ref['router_record']['held_out_nll']:.5f} (best step {record['best_step']} vs {ref['router_record']['best_step']})",
        "issue 12 goal, each domain within 1% of its own memory with the router: "
        + ", ".join(f"{d} {100 * x:+.2f}%" for d, x in goal.items())
        + f"; mixed stream: router {routed['mixed']:.3f} vs SOTU memory {own['sotu']['mixed']:.3f}, GCIDE memory {own['gcide']['mixed']:.3f}",
        f"cost (median of {a.timing_repeats} forwards of 4 x 512 tokens, 256 kept, order rotated): the router is {100 * router_share:.1f}% of the "
        f"two-memory model's forward (routed {t['both, router']:.2f} s vs fixed weights {t['both, fixed weights (EM)']:.2f} s, the same memories); "
        f"the gate {100 * gate_share:.1f}% of the one-memory model's (gated {t['SOTU memory, gated (one-memory model)']:.2f} s vs fixed "
        f"{t['SOTU memory, fixed lambda (one-memory model)']:.2f} s; base LM {t['base']:.2f} s); the machine is shared (load average "
        f"{os.getloadavg()[0]:.1f} at the end)",
    ]
    out = {
        "what": "two memories (SOTU, GCIDE) on SmolLM2-135M through MLPMemoryForCausalLM: per-domain test perplexity against the scoring "
        "path (mixing_router.json), and the router's and the gate's share of the model's forward time",
        "memories": {nm: str(p / "train/memory") for nm, p in (("sotu", a.sotu), ("gcide", a.gcide))},
        "n_tokens_per_split_and_domain": n,
        "n_scored": {d: int(len(next(iter(scored[d].values()))[0])) for d in corpora},
        "lambda_own": lam_own,
        "weights_fixed": w_fixed,
        "lambda_fixed_one_memory": lam_report,
        "router_record": record,
        "router_params": sum(x.numel() for x in model.memory_router.state_dict().values()),
        "gate_params": gate.num_parameters(),
        "ppl": rows,
        "reproduction": checks,
        "tolerance": a.tolerance,
        "all_within_tolerance": bool(all(c["within_tolerance"] for c in checks.values())),
        "timing": timing,
        "router_share_of_forward": router_share,
        "gate_share_of_forward": gate_share,
        "goal_within_1pct_of_own_memory": {d: bool(x <= 0.01) for d, x in goal.items()},
        "notes": notes,
        "seconds": {"load": load_s, "router_fit": router_fit_s},
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": "python bench/bench_multi_memory.py " + " ".join(sys.argv[1:]),
    }
    write_result(results_dir() / ("multi_memory.json" if n == 3000 else "multi_memory_quick.json"), out, started, default=float)
    for name, r in rows.items():
        print(f"{name:46s} sotu {r['sotu']:.3f}  gcide {r['gcide']:.3f}  mixed {r['mixed']:.3f}  {r['tokens_per_second']:.0f} tok/s")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
