"""Decode and scoring speed: the LM alone against LM + memory variants, measured interleaved (not a test).

    python bench/bench_generate.py [--model smollm2-135m] [--variants own4 own4q8 shared4 shared2 shared1]
        [--new-tokens 32] [--prompt-tokens 32] [--score-tokens 512] [--repeats 5] [--quick]

Each memory is built from its config with random blocks (speed does not depend on the
weights): width = the LM's hidden size, n residual blocks, reading the last layer's output
(the default recipe's read site). ``ownN``: N blocks and the memory's own head, today's
trained default (a copy of the LM's head that training moves); ``sharedN``: N blocks and the
LM's own head (a memory trained with ``freeze_head``; ``sharedNrR`` with a rank-R correction beside it, ``head_rank``), which the model class runs in the
same matrix product as the LM's; a ``vT`` part (``own4v6647``) prunes the head to T token ids (MLPMemory.prune_head; the demo run's
train text has 6,647 distinct tokens); a ``q8`` suffix (``own4q8``) runs the memory's linear layers in int8
(MLPMemory.use_int8); a ``g`` suffix (``own1v6647q8g``) mixes by a gate (per-token lambda from the two
distributions' features and the novelty of the memory's input against 64 centres, what a run's default ``mixing: auto``
fits) instead of a fixed lambda. Greedy decoding with the KV cache, exactly
``--new-tokens`` new tokens per sequence, at each ``--batches`` size; and one scoring pass
(every position's log-probs) over ``--score-tokens`` tokens. Every repeat runs each memory system
as one of a pair with an LM call beside it (see ``interleaved``), so each ratio to the LM is taken from
neighbouring calls on the same machine state; the JSON gives the median ratio and its range over repeats. Beside it, the
time each decode step spends outside the LM's own call within that same step (``in_step``: the memory, the mixing and the
model class's own work), against the LM call: one clock for both, so the machine's drift between calls leaves it (not
for ``shared`` heads, whose rows run inside the LM's call). Prints one
JSON line and writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import time

import torch
from provenance import results_dir, start, write_result

from mlpmem.transformers_integration import MLPMemoryForCausalLM
from mlpmem.memory import MemoryConfig, MLPMemory, init_from_lm, lm_settings
from mlpmem.gate import GateConfig
from mlpmem.modeling.gating import MixingGate, memory_fingerprint
from mlpmem.modeling.mixing import GATE_INPUTS
from mlpmem.models import load_model, logits_size, num_parameters, tokenizer_hash


def build_memory(lm, blocks: int, shared: bool, rank: int = 0) -> MLPMemory:
    """A memory of ``blocks`` random blocks whose head is a copy of the LM's (lm_copy); ``shared`` keeps it equal;
    ``rank``: a low-rank correction beside the head (head_rank)."""
    d = lm.config.get_text_config().hidden_size
    cfg = dict(d_in=d, vocab_size=logits_size(lm), n_blocks=blocks, init="lm_copy", zero_init_blocks=False, head_rank=rank)
    memory = MLPMemory(MemoryConfig(**cfg, freeze_head=shared, **lm_settings(lm, "lm_copy")))
    init_from_lm(memory, lm)
    if not shared:  # a trained own head: no longer the LM's
        with torch.no_grad():
            memory.head.weight.mul_(1.01)  # still another head in bfloat16, whose step is 0.4%
    return memory.eval().requires_grad_(False)


def timed_both(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): with one thread the second leaves out the time the shared machine
    gave to other tenants, which the wall clock counts against whichever call it fell in."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", nargs="+", default=["own4", "own4q8", "shared4", "shared2", "shared1r64", "shared1"])
    p.add_argument("--score-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lambda", dest="lam", type=float, default=0.25)
    p.add_argument("--dtype", default="float32", help="the LM's and the memories' weights (bfloat16: both in bf16; q8 keeps int8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="default: bench/results/generate.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 new tokens, batch 1, 1 repeat, writes generate_quick.json")
    a = p.parse_args()
    started = start()
    a.out = a.out or str(results_dir() / ("generate.json" if a.dtype == "float32" else f"generate_{a.dtype}.json"))
    if a.quick:
        a.new_tokens, a.batches, a.repeats, a.score_tokens, a.variants = 8, [1], 1, 64, ["own4", "own4q8", "shared1r64", "own1v500q8g"]
        a.out = a.out.removesuffix(".json") + "_quick.json"

    if a.threads:
        # on a loaded machine, multi-threaded tiny decode ops spin-wait on each other
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    lm, tok, model_id = load_model(a.model, a.dtype)
    meta = {"model_id": model_id, "tokenizer_hash": tokenizer_hash(tok), "layer": -1, "site": "output"}
    systems = {"lm": lm}
    memories = {}
    for v in a.variants:
        m = re.fullmatch(r"(own|shared)(\d+)(?:r(\d+))?(?:v(\d+))?(q8)?(g)?", v)
        if not m or (m.group(1) == "shared" and m.group(4)):
            p.error(
                f"unknown variant {v!r}: ownN, sharedN or sharedNrR (N blocks, a rank-R correction beside the head), "
                "+vT (own head pruned to T tokens), +q8 (int8), +g (gated mixing)"
            )
        kind, blocks, rank, tokens, int8 = m.group(1), int(m.group(2)), int(m.group(3) or 0), int(m.group(4) or 0), bool(m.group(5))
        memories[v] = build_memory(lm, blocks, kind == "shared", rank).to(torch.float32 if int8 else lm.dtype)  # int8 from float32
        if tokens:  # speed does not depend on which tokens: the T most frequent ids of a text are mostly small ones
            memories[v] = memories[v].prune_head(torch.randperm(logits_size(lm))[:tokens])
        # a gate's speed does not depend on its weights: the MLP gate a run fits by default (GateConfig), as built
        gcfg = GateConfig()
        built = MixingGate("mlp", GATE_INPUTS, gcfg.hidden, centroids=gcfg.centroids, d=memories[v].config.d_in)
        gate = dict(gate=built, gate_meta={"memory_fingerprint": memory_fingerprint(memories[v])}) if m.group(6) else {}
        systems[v] = MLPMemoryForCausalLM.from_parts(lm, memories[v], meta, tokenizer=tok, lambda_=a.lam, **gate).eval()
        if int8:
            systems[v].use_int8_memories()
        assert systems[v].head_shared("memory") == (kind == "shared" and not int8)

    n_lm = num_parameters(lm)
    result = {
        "model": model_id,
        "device": "cpu",
        "dtype": a.dtype,
        "threads": torch.get_num_threads(),
        "lm_params": n_lm,
        "variants": {
            v: {
                "blocks": m.config.n_blocks,
                "head": "shared" if systems[v].head_shared("memory") else "own",
                "params": m.num_parameters(),
                "head_tokens": m.config.head_tokens or m.config.vocab_size,
                "int8": m._int8 is not None,
                "mixing": systems[v].mixing_mode,
                # parameters read per decoded token beyond the LM's: a shared head is read once for both
                "extra_params_read": m.num_parameters() - (m.head.weight.numel() if systems[v].head_shared("memory") else 0),
            }
            for v, m in memories.items()
        },
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "score_tokens": a.score_tokens,
        "lambda": a.lam,
        "repeats": a.repeats,
        "pairing": "each memory system timed beside its own LM call, order alternating by round",
        "decode": {},
        "score": {},
    }
    vocab = min(len(tok), logits_size(lm))
    with torch.inference_mode():
        for b in a.batches:
            ids = torch.randint(100, vocab, (b, a.prompt_tokens))
            args = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
            result["decode"][str(b)] = interleaved(systems, lambda m: m.generate(ids, **args), b * a.new_tokens, a.repeats)
            for v in memories:
                if systems[v].head_shared("memory"):  # its head rows run inside the LM's own call: not measurable so
                    continue
                result["decode"][str(b)][v]["in_step"] = in_step(systems[v], lm, lambda m: m.generate(ids, **args), a.repeats)
        ids = torch.randint(100, vocab, (1, a.score_tokens))
        result["score"]["1"] = interleaved(systems, lambda m: m(ids), a.score_tokens, a.repeats)
    print(json.dumps(result))
    write_result(a.out, result, started)


def in_step(system, lm, call, repeats: int) -> dict:
    """Per decode step of ``system`` (``repeats`` calls of ``call``, the prompt's step left out): the time the step
    spends outside the LM's own forward, over that forward's time, median and 10-90% range over steps; and the
    tokens/s ratio it implies, 1 / (1 + overhead). Both times come from the same step, so the drift of a shared
    machine's speed between calls, which the paired ratios carry, is left out."""
    inner: list[float] = []
    outer: list[float] = []

    def clocked(fn, into):
        @functools.wraps(fn)  # generate reads the forward's signature
        def run(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            into.append(time.perf_counter() - t)
            return out

        return run

    lm.forward, system.forward = clocked(lm.forward, inner), clocked(system.forward, outer)
    try:
        overheads = []
        for _ in range(repeats):
            inner.clear()
            outer.clear()
            call(system)
            overheads += [(o - i) / i for o, i in zip(outer[1:], inner[1:])]
    finally:
        del lm.forward, system.forward  # the class's own forward again
    q = statistics.quantiles(overheads, n=10)
    return {
        "overhead": {"median": round(statistics.median(overheads), 4), "p10": round(q[0], 4), "p90": round(q[-1], 4)},
        "implied_ratio_to_lm": round(1 / (1 + statistics.median(overheads)), 3),
        "steps": len(overheads),
    }


def interleaved(systems: dict, call, tokens: int, repeats: int) -> dict:
    """One warm-up call of each system, then ``repeats`` rounds: in each, every memory system is timed in a pair with
    its own LM call right beside it (LM first in even rounds, second in odd ones), so each ratio compares two
    neighbouring calls; on a shared machine whose speed drifts over seconds a round's one LM call, timed up to a
    dozen seconds away from the last system's, put that drift into the ratios (medians 0.87-0.91 for a variant whose
    profile gives 0.97). Tokens/s and the median ratio to the LM with its range over rounds."""
    for m in systems.values():
        call(m)
    lm = systems["lm"]
    times: dict[str, list[float]] = {name: [] for name in systems}
    ratios: dict[str, list[float]] = {name: [] for name in systems if name != "lm"}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in ratios}
    for r in range(repeats):
        for name, m in systems.items():
            if name == "lm":
                continue
            if r % 2 == 0:
                t_lm, t = timed_both(lambda: call(lm)), timed_both(lambda: call(m))
            else:
                t, t_lm = timed_both(lambda: call(m)), timed_both(lambda: call(lm))
            times["lm"].append(t_lm[0])
            times[name].append(t[0])
            ratios[name].append(t_lm[0] / t[0])
            cpu_ratios[name].append(t_lm[1] / t[1])
    out = {"lm_tokens_per_s": round(tokens / statistics.median(times["lm"]), 1)}
    for name, rs in ratios.items():
        out[name] = {
            "tokens_per_s": round(tokens / statistics.median(times[name]), 1),
            "ratio_to_lm": spread(rs),
            "cpu_time_ratio_to_lm": spread(cpu_ratios[name]),  # LM CPU seconds / system CPU seconds, per pair
        }
    return out


if __name__ == "__main__":
    main()
