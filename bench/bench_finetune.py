"""Against fine-tuning: the MLP memory of runs/sotu vs fine-tuning the LM itself (not a test).

    python bench/bench_finetune.py --threads 1 --train-tokens 20480 --batch-size 2   # as run: 46 min on 1 shared core
    python bench/bench_finetune.py --threads 1             # all 60k training tokens: ~70 min here
    python bench/bench_finetune.py --threads 1 --quick     # smoke test: ~8 min

SmolLM2-135M is fine-tuned on the training split the memory was trained on
(runs/sotu/corpus, train), in shuffled non-overlapping chunks of 512 tokens,
causal LM loss, AdamW, linear warm-up then cosine decay, one epoch by default:
once with every weight trained (full FT) and once with LoRA adapters (peft,
``pip install 'mlpmem[finetune]'``) on q, k, v, o, gate, up, down. The fine-tuning
is the library's (mlpmem.finetune; the output folders are its stage folders, so a
finished one is reused). bench/results/finetune.json was measured with this bench's
own earlier loop (same model, data, lr, schedule shape; its last batch was partial
where the library's batches run on across the epoch end). Each run trains
in its own spawned process, so its peak RSS is its own. Every model, with and
without the memory (runs/sotu/train/memory, trained on the *base* model's hidden
states), is then scored with the library's online scoring (windows of 512, stride
256) on the in-domain test split and on out-of-domain text (the first 8000 tokens
of the GCIDE dictionary test split, runs/gcide100k/corpus): forgetting shows as a
rise of the OOD perplexity. "+ memory" uses lambda from runs/sotu/report.json
(tuned for the base model on valid) and a lambda refit by EM on the in-domain
valid split for that model. Writes bench/results/finetune.json and finetune.png
(``--quick``: finetune_quick.json / .png, never the full result).
"""

from __future__ import annotations

import argparse
import json
import platform
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from provenance import results_dir, start, write_result

ROOT = Path(__file__).resolve().parents[1]


def train(kind: str, args: dict) -> dict:
    """Fine-tune the base model (kind "full" or "lora") with mlpmem.finetune into args["out"]/kind (model in .../model)."""
    import torch

    from mlpmem.finetune import FinetuneConfig, finetune

    torch.set_num_threads(args["threads"])
    cfg = FinetuneConfig(
        model=args["model"],
        method=kind,
        lora_r=args["lora_r"],
        lora_alpha=args["lora_alpha"],
        lr=args["lr_" + kind],
        weight_decay=args["weight_decay"],
        tokens=args["train_tokens"],
        chunk=args["chunk"],
        batch_size=args["batch_size"],
        warmup=args["warmup"],
        seed=args["seed"],
        device="cpu",
        dtype="float32",
    )
    m = finetune(cfg, args["corpus"], Path(args["out"]) / kind)
    # FLOPs of a token: forward 2N, gradient w.r.t. activations 2N, w.r.t. weights 2N (full only; LoRA's adapters are negligible)
    flops = (6 if kind == "full" else 4) * m["params"] * m["train_tokens"]
    return {
        "kind": kind,
        "lr": m["lr"],
        "steps": m["steps"],
        "warmup_steps": m["warmup_steps"],
        "batch_size": m["batch_size"],
        "chunk": m["chunk"],
        "train_tokens": m["train_tokens"],
        "epochs": m["epochs"],
        "trainable_params": m["trainable_params"],
        "params": m["params"],
        "flops": flops,
        "flops_formula": f"{6 if kind == 'full' else 4} x params x tokens",
        "train_seconds": m["train_seconds"],
        "train_tokens_per_s": m["train_tokens_per_s"],
        "peak_rss_mb": m["peak_rss_mb"],
        "loss_first": m["loss_first"],
        "loss_last": m["loss_last"],
        "loss_mean_last_quarter": m["loss_mean_last_quarter"],
        "model_dir": m["model_dir"],
        **({"lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": 0.0, "targets": cfg.lora_targets}} if kind == "lora" else {}),
    }


def evaluate(model_name: str, memory, layer: int, lam_fixed: float, splits: dict[str, np.ndarray], batch_size: int) -> dict:
    """Perplexities of the model alone and with the memory (fixed lambda, and lambda refit on valid); the memory reads
    ``layer``'s output (the LM's last layer, 29 for SmolLM2-135M)."""
    from mlpmem.evaluate import score_online
    from mlpmem.interpolate import fit_lambda_em, interpolate_logprobs, perplexity
    from mlpmem.models import load_model
    from mlpmem.modeling.read_site import ReadSite

    model, _, _ = load_model(model_name)
    site = ReadSite(layer, "output")
    sc = {
        name: score_online(
            model, toks, 512, 256, site, memory=memory, memory_site=site, batch_size=batch_size, desc=f"{Path(model_name).name} {name}"
        )
        for name, toks in splits.items()
    }
    lam_refit = fit_lambda_em(sc["valid"].lm_logprob, sc["valid"].memory_logprob)
    ppl = lambda s, lam: perplexity(interpolate_logprobs(sc[s].lm_logprob, sc[s].memory_logprob, lam))  # noqa: E731
    return {
        "lambda_refit": lam_refit,
        "alone": {s: perplexity(sc[s].lm_logprob) for s in sc},
        "memory_fixed_lambda": {s: ppl(s, lam_fixed) for s in sc},
        "memory_refit_lambda": {s: ppl(s, lam_refit) for s in sc},
        "scoring_tokens_per_s": {s: sc[s].n / sc[s].seconds["lm"] for s in sc},
    }


def plot(rows: list[tuple[str, float, float]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    for i, (label, col) in enumerate([("in-domain (SOTU test)", 1), ("out-of-domain (GCIDE test)", 2)]):
        vals = [r[col] for r in rows]
        bars = ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [r[0] for r in rows], rotation=20, ha="right", fontsize=8)
    lo = min(min(r[1], r[2]) for r in rows)
    ax.set_ylim(0.9 * lo, 1.1 * max(max(r[1], r[2]) for r in rows))  # headroom for the legend
    ax.set_ylabel(f"perplexity (lower is better; axis from {0.9 * lo:.0f})")
    ax.set_xlabel("system")
    ax.set_title(title)
    ax.legend(loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs/sotu", help="finished experiment: corpus, train/memory, report.json")
    p.add_argument("--ood", type=Path, default=ROOT / "runs/gcide100k/corpus", help="out-of-domain corpus (same tokenizer)")
    p.add_argument("--work", type=Path, default=None, help="where the fine-tuned models go (default runs/bench_finetune[_quick])")
    p.add_argument("--train-tokens", type=int, default=None, help="training tokens (default all 60k; --quick 4096)")
    p.add_argument("--eval-tokens", type=int, default=None, help="tokens per eval split (default valid/test all, OOD 8000; --quick 1000)")
    p.add_argument("--batch-size", type=int, default=4, help="chunks of 512 tokens per optimiser step")
    p.add_argument("--lr-full", type=float, default=5e-5)
    p.add_argument("--lr-lora", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="4k training tokens, 1k eval tokens per split; writes finetune_quick.*")
    a = p.parse_args()
    started = start()

    import torch

    from mlpmem.corpus import Corpus
    from mlpmem.memory import load_memory
    from mlpmem.models import DEFAULT_MODEL, load_tokenizer, tokenizer_hash

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    suffix = "_quick" if a.quick else ""
    work = a.work or ROOT / f"runs/bench_finetune{suffix}"
    train_tokens = a.train_tokens or (4096 if a.quick else None)
    n_eval = a.eval_tokens or (1000 if a.quick else None)
    report = json.loads((a.run / "report.json").read_text())
    lam_fixed = report["lambda"]["mlp_memory"]
    memory, meta = load_memory(a.run / "train/memory")
    assert meta["site"] == "output", meta  # the last layer's output (init lm_copy), the site the FT models are scored at
    th = tokenizer_hash(load_tokenizer(DEFAULT_MODEL))
    corpus, ood = Corpus(a.run / "corpus"), Corpus(a.ood)
    for c in (corpus, ood):
        c.check_tokenizer(th, DEFAULT_MODEL)
    splits = {"valid": corpus.tokens("valid")[:n_eval], "test": corpus.tokens("test")[:n_eval], "ood": ood.tokens("test")[: n_eval or 8000]}

    targs = {
        "model": DEFAULT_MODEL,
        "corpus": str(a.run / "corpus"),
        "train_tokens": train_tokens,
        "chunk": 512,
        "batch_size": a.batch_size,
        "lr_full": a.lr_full,
        "lr_lora": a.lr_lora,
        "lora_r": a.lora_r,
        "lora_alpha": a.lora_alpha,
        "warmup": a.warmup,
        "weight_decay": a.weight_decay,
        "seed": a.seed,
        "threads": threads,
        "out": str(work),
    }
    training = {}
    for kind in ("full", "lora"):
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:  # own process: own peak RSS, memory freed after
            training[kind] = ex.submit(train, kind, targs).result()
        print(json.dumps({k: v for k, v in training[kind].items() if k != "lora"}))

    systems = {"base": DEFAULT_MODEL, "full_ft": training["full"]["model_dir"], "lora_ft": training["lora"]["model_dir"]}
    results = {}
    for name, model_name in systems.items():
        results[name] = evaluate(model_name, memory, int(meta["layer"]), lam_fixed, splits, batch_size=8)
        print(name, json.dumps(results[name]))

    ppl = {}
    for name, r in results.items():
        ppl[name] = {"in_domain": r["alone"]["test"], "ood": r["alone"]["ood"], "valid": r["alone"]["valid"]}
        ppl[f"{name}+memory(lambda={lam_fixed:.3f})"] = {
            "in_domain": r["memory_fixed_lambda"]["test"],
            "ood": r["memory_fixed_lambda"]["ood"],
            "valid": r["memory_fixed_lambda"]["valid"],
            "lambda": lam_fixed,
        }
        ppl[f"{name}+memory(lambda refit={r['lambda_refit']:.3f})"] = {
            "in_domain": r["memory_refit_lambda"]["test"],
            "ood": r["memory_refit_lambda"]["ood"],
            "valid": r["memory_refit_lambda"]["valid"],
            "lambda": r["lambda_refit"],
        }
    n_train = training["full"]["train_tokens"]
    n_lm, n_mem, n_mem_train = report["base_params"], report["memory_params"], report["n_train_tokens"]
    mem_manifest = json.loads((a.run / "train/manifest.json").read_text())
    memory_flops = {"extraction": 2 * n_lm * 2 * n_mem_train, "training": 6 * n_mem * 2 * n_mem_train}
    memory_flops["total"] = sum(memory_flops.values())
    out = {
        "what": "SmolLM2-135M fine-tuned (full, LoRA) on the SOTU training split vs the MLP memory trained on the same split; "
        "perplexity in-domain (SOTU test) and out-of-domain (GCIDE dictionary test, forgetting)",
        "quick": a.quick,
        "model": DEFAULT_MODEL,
        "train_split": f"{a.run / 'corpus'} train",
        "n_eval_tokens": {s: int(len(t)) for s, t in splits.items()},
        "scoring": {"context": 512, "stride": 256, "site": f"layer {meta['layer']} output"},
        "lambda_fixed": lam_fixed,
        "lambda_fixed_source": f"{a.run / 'report.json'} (EM on valid for the base model)",
        "ppl": ppl,
        "lambda_refit_on_valid": {n: r["lambda_refit"] for n, r in results.items()},
        "scoring_tokens_per_s": {n: r["scoring_tokens_per_s"] for n, r in results.items()},
        "training": training,
        "compute": {
            "full_ft_flops": training["full"]["flops"],
            "lora_ft_flops": training["lora"]["flops"],
            "memory_flops": memory_flops,
            "memory_flops_formula": "extraction 2 x LM params x 2 x train tokens (windows 512 stride 256: every token twice) + "
            "training 6 x memory params x 2 epochs x train tokens; kNN search for the targets left out",
            "memory_training_recorded": {
                k: mem_manifest.get(k) for k in ("tokens_per_s", "peak_rss_mb", "torch_threads", "epochs", "steps")
            },
            "note": "attention FLOPs left out on both sides; the FT runs see each training token once (1 epoch), the memory twice",
        },
        "train_tokens": n_train,
        "train_tokens_note": None
        if n_train >= n_mem_train
        else f"the FT runs saw the first {n_train} tokens of the same training split, "
        f"not all {n_mem_train}: at the measured training speed on this shared machine the full split would not fit the time budget",
        "threads": threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": "python bench/bench_finetune.py " + " ".join(__import__("sys").argv[1:]),
    }
    res = results_dir()
    write_result(res / f"finetune{suffix}.json", out, started)
    rows = [(n, v["in_domain"], v["ood"]) for n, v in ppl.items()]
    plot(
        rows,
        res / f"finetune{suffix}.png",
        f"Fine-tuning vs MLP memory, SmolLM2-135M, {n_train} SOTU training tokens" + (" (quick)" if a.quick else ""),
    )
    print(json.dumps(out["ppl"], indent=1))


if __name__ == "__main__":
    main()
