"""Memories that keep the LM's head (``train.freeze_head``) against today's memory: perplexity with paired intervals (not a test).

    ./dev demo                                        # runs/sotu: 1 block, head pruned to the train text's tokens, int8
    FULL="train.head_vocab=full eval.memory_dtype=float32"
    mlpmem run sotu --out runs/sotu_full $FULL train.n_blocks=4                          # own full head, 4 blocks
    mlpmem run sotu --out runs/sotu_fh4 $FULL train.n_blocks=4 train.freeze_head=true eval.mixing=fixed  # the LM's head
    mlpmem run sotu --out runs/sotu_fh2 $FULL train.n_blocks=2 train.freeze_head=true eval.mixing=fixed
    mlpmem run sotu --out runs/sotu_fh1r64 $FULL train.freeze_head=true train.head_rank=64 eval.mixing=fixed
    # runs/gate/gcide_corpus: the two commands at the top of bench_mixing.py
    python bench/bench_shared_head.py --runs runs/sotu_full runs/sotu_full:int8 runs/sotu runs/sotu_fh4 [--threads 2] [--quick]

A memory whose head stays the LM's output layer is what lets the model class compute both
heads in one matrix product (bench_generate.py measures the speed). This script measures what
it costs in quality. Every memory is scored in the same LM pass per split (mlpmem.gate's
score_memories, windows 512 / 256 as the evaluator): SOTU valid, SOTU test and the first
``--ood-tokens`` of the GCIDE test split (out of domain). Each memory mixes at its lambda fitted on these valid
scores (by EM, as its run's eval fits it). An entry is a run folder or a train-stage folder (``RUN/train``, or
``mlpmem train --out``). Intervals: 95% paired bootstrap over blocks of 256
positions (mlpmem.interpolate.paired_ppl_change), against the LM alone and against the first
run. ``RUN:int8`` scores RUN's memory with its linear layers in int8 (MLPMemory.use_int8); ``RUN:vocab`` with its head
pruned to the tokens of the run's train text (MLPMemory.prune_head); ``RUN:vocab+int8`` both. The selection rule, fixed
before test is read: the memory reading the fewest bytes of weights per token whose valid perplexity is within +0.5%
of the first run's. Writes
bench/results/shared_head.json (``--quick``: 1000 tokens per split, shared_head_quick.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from provenance import results_dir, start, write_result

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--runs",
        nargs="+",
        default=[str(ROOT / f"runs/{r}") for r in ("sotu_full", "sotu_full:int8", "sotu", "sotu_fh4", "sotu_fh2", "sotu_fh1r64")],
    )
    p.add_argument("--ood", type=Path, default=ROOT / "runs/gate/gcide_corpus", help="out-of-domain corpus (same tokenizer)")
    p.add_argument("--ood-tokens", type=int, default=8000)
    p.add_argument("--corpus", type=Path, default=None, help="the memories' corpus (default: the first run's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="1000 tokens per split; writes shared_head_quick.json")
    a = p.parse_args()
    started = start()

    import torch

    import numpy as np

    from mlpmem.corpus import Corpus
    from mlpmem.datastore import Datastore
    from mlpmem.gate import score_memories
    from mlpmem.interpolate import fit_lambda_em, interpolate_logprobs, interval_text, paired_ppl_change, perplexity
    from mlpmem.memory import load_memory
    from mlpmem.models import load_model, tokenizer_hash
    from mlpmem.modeling.read_site import ReadSite

    if a.threads:
        torch.set_num_threads(a.threads)
    cap = 1000 if a.quick else None
    runs = {}
    for entry in a.runs:
        run, _, kind = str(entry).partition(":")  # RUN:int8, RUN:vocab, RUN:vocab+int8 (see the docstring)
        run, kinds = Path(run), set(kind.split("+")) - {""}
        if kinds - {"int8", "vocab"}:
            p.error(f"{entry}: the suffixes are :int8, :vocab and :vocab+int8")
        memory, meta = load_memory(run / "memory" if (run / "memory").is_dir() else run / "train/memory")  # a train folder, or a run
        if "vocab" in kinds:  # the head pruned to the tokens of the run's train text (its datastore's values)
            memory = memory.prune_head(np.unique(Datastore(run / "datastore").values()))
        if "int8" in kinds:
            memory.use_int8()
        runs[run.name + "".join(f"_{k}" for k in sorted(kinds))] = {
            "memory": memory,
            "int8": "int8" in kinds,
            "site": ReadSite(int(meta["layer"]), meta["site"]),
        }
    first = next(iter(runs))
    model, tok, model_id = load_model(str(meta.get("model_id") or "smollm2-135m"))
    lm_head = model.get_output_embeddings()
    corpus, ood = Corpus(a.corpus or Path(str(a.runs[0]).partition(":")[0]) / "corpus"), Corpus(a.ood)
    for c in (corpus, ood):
        c.check_tokenizer(tokenizer_hash(tok), model_id)
    splits = {"valid": corpus.tokens("valid")[:cap], "test": corpus.tokens("test")[:cap], "ood": ood.tokens("test")[: cap or a.ood_tokens]}
    pairs = [(r["memory"], r["site"]) for r in runs.values()]
    scores = {name: score_memories(model, toks, 512, 256, pairs, batch_size=8, desc=f"scoring {name}")[1] for name, toks in splits.items()}

    for i, r in enumerate(runs.values()):  # each memory at the lambda fitted on these valid scores (as its run's eval does)
        r["lambda"] = fit_lambda_em(scores["valid"][:, 0], scores["valid"][:, 1 + i])
    out_runs = {}
    for i, (name, r) in enumerate(runs.items()):
        mem = r["memory"]
        shared = mem.head_is(lm_head)
        read = mem.num_parameters() - (mem.head.weight.numel() if shared else 0)
        row = {
            "blocks": mem.config.n_blocks,
            "freeze_head": mem.config.freeze_head,
            "head_rank": mem.config.head_rank,
            "head_tokens": mem.config.head_tokens or mem.config.vocab_size,
            "head_is_the_lms": shared,
            "params": mem.num_parameters(),
            "int8": r["int8"],
            "weights_read_per_token_beyond_the_lm": read,
            # what decoding at batch 1 pays for: int8 linear weights are a quarter of float32's bytes (norms stay float32)
            "bytes_read_per_token_beyond_the_lm": read * (1 if r["int8"] else 4),
            "lambda": r["lambda"],
        }
        for split, lp in scores.items():
            mixed = interpolate_logprobs(lp[:, 0], lp[:, 1 + i], r["lambda"])
            row[split] = perplexity(mixed)
            row[f"{split}_vs_base"] = paired_ppl_change(mixed, lp[:, 0])
            if name != first:
                row[f"{split}_vs_{first}"] = paired_ppl_change(mixed, interpolate_logprobs(lp[:, 0], lp[:, 1], runs[first]["lambda"]))
        out_runs[name] = row
    base = {split: perplexity(lp[:, 0]) for split, lp in scores.items()}
    ok = [n for n, row in out_runs.items() if row["valid"] <= out_runs[first]["valid"] * 1.005]
    chosen = min(ok, key=lambda n: out_runs[n]["bytes_read_per_token_beyond_the_lm"])
    result = {
        "what": "memories trained with the LM's head kept (freeze_head) against the first run's memory, SmolLM2-135M, State of the Union",
        "model": model_id,
        "n_tokens": {split: int(lp.shape[0]) for split, lp in scores.items()},
        "base": base,
        "runs": out_runs,
        "reference": first,
        "selection": {
            "rule": f"the memory reading the fewest bytes of weights per token whose valid perplexity is within +0.5% of {first}'s "
            "(chosen before test is read)",
            "eligible": ok,
            "chosen": chosen,
        },
        "quick": a.quick,
    }
    write_result(results_dir() / f"shared_head{'_quick' if a.quick else ''}.json", result, started)
    for n, row in out_runs.items():
        vs = row.get(f"test_vs_{first}")
        print(
            f"{n:12s} valid {row['valid']:.3f} test {row['test']:.3f} ood {row['ood']:.3f} ({100 * row['ood_vs_base']['change']:+.2f}%)"
            + (f"  test vs {first} {interval_text(vs)}" if vs else "")
        )
    print(f"base: valid {base['valid']:.3f} test {base['test']:.3f} ood {base['ood']:.3f}; chosen on valid: {chosen}")


if __name__ == "__main__":
    main()
