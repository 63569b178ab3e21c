"""Choosing the gate's settings on valid text only: how much generic text, its weight, and the novelty feature (not a test).

    python bench/bench_gate_select.py [--run runs/sotu] [--gcide runs/gate/gcide_corpus] [--quick]

Scores, once, what every candidate gate is fitted on (the run's valid split in windows of 512 / 256, as the gate
stage scores it, and text sampled from the LM with the gate's seed, 4000 and 8000 tokens) and what it is judged on:
GCIDE's valid split, Python source of standard-library modules other than bench_ood_lmeval.py's test ones, and the
run's own SOTU valid split, each cut into 150-word documents (their first 511 tokens) scored on their own after the EOS token as lm-eval's
``loglikelihood_rolling`` scores them (bench_ood_lmeval.py, whose ``--kinds gcide_valid,sotu_valid`` agree with these
figures to 0.01 points), plus LM samples of the next seed. The memory's input at every position is kept, so each
candidate's novelty column comes from the same k-means centres of the memory's train inputs as the pipeline's
(mlpmem.gate.fit_memory_centroids). Every candidate is then fitted with mlpmem.gate.fit_gate (seconds each).

Change: the mixture's summed log-loss against the LM alone's over the same tokens (= the change in bits per byte).
The rule, fixed before any candidate was scored: among the candidates that keep at least 90% of the fixed lambda's
gain on SOTU valid, the one whose larger out-of-domain change (GCIDE valid, Python valid) is smallest. SOTU valid is
the gates' own training text (a fifth of it held out for early stopping), so its figure flatters every gate alike.
Writes bench/results/gate_select.json (``--quick``: 600 words per kind, 1000 LM tokens, gate_select_quick.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from bench_ood_lmeval import PYTHON_VALID_MODULES, documents, python_texts
from provenance import results_dir, start, write_result

ROOT = Path(__file__).resolve().parents[1]
JUDGED = ("gcide_valid", "python_valid", "sotu_valid", "lm_samples_next_seed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs/sotu")
    p.add_argument("--gcide", type=Path, default=ROOT / "runs/gate/gcide_corpus", help="a GCIDE corpus folder (same tokenizer)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    started = start()

    import torch
    from torch import nn

    from mlpmem.corpus import Corpus
    from mlpmem.gate import GateConfig, MixScores, fit_gate, fit_memory_centroids, gate_lambdas, generic_tokens, score_memories
    from mlpmem.interpolate import fit_lambda_em, interpolate_per_token
    from mlpmem.memory import load_memory
    from mlpmem.models import load_model
    from mlpmem.modeling.mixing import GATE_FEATURES, novelty
    from mlpmem.modeling.read_site import ReadSite
    from mlpmem.rag import split_texts

    words, sizes = (600, (1000,)) if a.quick else (6000, (4000, 8000))
    memory, meta = load_memory(a.run / "train/memory")
    memory.use_int8()  # as the run scored it (eval.memory_dtype: int8 in the demo recipe) and as loaders run it
    site = ReadSite(int(meta["layer"]), meta["site"])
    model, tok, _ = load_model(str(meta.get("model_id") or "smollm2-135m"))
    cfg = GateConfig()

    class Keep(nn.Module):  # the memory, keeping the input it is given: the novelty column for any centres
        def __init__(self, m):
            super().__init__()
            self.m, self.h = m, []

        def forward(self, h):
            self.h.append(h.detach().float().clone())
            return self.m(h)

    keep = Keep(memory)

    def score(streams: list[np.ndarray], desc: str) -> dict[str, np.ndarray]:
        parts = []
        for i, toks in enumerate(streams):
            keep.h = []
            y, lp, f, _ = score_memories(model, np.asarray(toks, dtype=np.int64), 512, 256, [(keep, site)], 8, desc)
            parts.append({"doc": np.full(len(y), i), "lm": lp[:, 0], "mem": lp[:, 1], "f": f[:, 0], "h": torch.cat(keep.h).numpy()})
        return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}

    def as_documents(texts: list[str]) -> list[np.ndarray]:  # lm-eval's rolling windows: EOS, then the document
        return [np.array([tok.eos_token_id] + tok(d, add_special_tokens=False).input_ids[:511]) for d in documents(texts, 150, words)]

    corpus = Corpus(a.run / "corpus")
    data = {
        "gcide_valid": score(as_documents(split_texts(a.gcide, "valid")), "GCIDE valid"),
        "python_valid": score(as_documents(python_texts(PYTHON_VALID_MODULES)), "Python valid"),
        "sotu_valid": score(as_documents(split_texts(a.run / "corpus", "valid")), "SOTU valid"),
        "valid": score([corpus.tokens("valid")], "the gate's valid split"),
        "lm_samples_next_seed": score([generic_tokens("lm", tok, sizes[0], model, cfg.seed + 1)], "LM samples, next seed"),
        **{f"lm_samples_{n}": score([generic_tokens("lm", tok, n, model, cfg.seed)], f"LM samples, {n}") for n in sizes},
    }
    cents = fit_memory_centroids(model, corpus.tokens("train"), site, cfg.centroids, cfg.centroid_tokens, 512, 256, 8, (), cfg.seed)
    for d in data.values():
        d["f_novelty"] = np.concatenate([d["f"], novelty(torch.from_numpy(d["h"]), torch.from_numpy(cents)).numpy()[:, None]], 1)

    lam_fixed = fit_lambda_em(data["valid"]["lm"], data["valid"]["mem"])

    def change(kind: str, lam: np.ndarray) -> float:
        d = data[kind]
        mixed = interpolate_per_token(d["lm"], d["mem"], lam)
        return float(mixed.sum() / d["lm"].sum() - 1.0)  # log-losses are negative sums: the ratio of losses

    def scores(kind: str, novel: bool) -> MixScores:
        d = data[kind]
        return MixScores(np.zeros(len(d["lm"]), np.int32), d["lm"], d["mem"], d["f_novelty"] if novel else d["f"])

    fixed = {k: change(k, np.full(len(data[k]["lm"]), lam_fixed)) for k in JUDGED}
    candidates = {}
    for n in sizes:
        for novel in (True, False):
            for w in (1.0, 2.0, 4.0) if novel else (1.0,):
                c = GateConfig(generic_tokens=n, generic_weight=w, centroids=cfg.centroids if novel else 0)
                gate, rec = fit_gate(scores("valid", novel), c, scores(f"lm_samples_{n}", novel), cents if novel else None)
                col = "f_novelty" if novel else "f"
                ch = {k: change(k, gate_lambdas(gate, data[k][col])) for k in JUDGED}
                name = f"generic_tokens={n} generic_weight={w:g} centroids={c.centroids}"
                candidates[name] = {
                    "generic_tokens": n,
                    "generic_weight": w,
                    "centroids": c.centroids,
                    "change": ch,
                    "share_of_fixed_gain_sotu_valid": ch["sotu_valid"] / fixed["sotu_valid"],
                    "worst_out_of_domain": max(ch["gcide_valid"], ch["python_valid"]),
                    "best_step": rec.get("best_step"),
                }
    eligible = {k: v for k, v in candidates.items() if v["share_of_fixed_gain_sotu_valid"] >= 0.9}
    chosen = min(eligible, key=lambda k: eligible[k]["worst_out_of_domain"]) if eligible else None
    result = {
        "what": __doc__.splitlines()[0],
        "run": str(a.run),
        "positions": {k: int(len(d["lm"])) for k, d in data.items()},
        "documents": {k: int(data[k]["doc"].max() + 1) for k in ("gcide_valid", "python_valid", "sotu_valid")},
        "python_valid_modules": list(PYTHON_VALID_MODULES),
        "lambda_fixed": lam_fixed,
        "fixed": fixed,
        "candidates": candidates,
        "rule": "among candidates keeping >= 90% of the fixed lambda's SOTU-valid gain, the smallest larger change of "
        "GCIDE valid and Python valid",
        "chosen": chosen,
        "features": list(GATE_FEATURES) + ["novelty"],
        "quick": a.quick,
    }
    write_result(results_dir() / f"gate_select{'_quick' if a.quick else ''}.json", result, started)
    print(f"fixed lambda {lam_fixed:.3f}: " + ", ".join(f"{k} {100 * v:+.2f}%" for k, v in fixed.items()))
    for name, c in candidates.items():
        mark = "  <- chosen" if name == chosen else ""
        print(f"{name}: " + ", ".join(f"{k} {100 * v:+.2f}%" for k, v in c["change"].items()) + mark)


if __name__ == "__main__":
    main()
