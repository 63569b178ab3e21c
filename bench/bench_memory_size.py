"""More training, more memory: valid quality of the MLP memory against epochs and size (not a test).

    python bench/bench_memory_size.py --threads 1                 # full: ~50 min on 1 core
    python bench/bench_memory_size.py --threads 1 --quick         # minutes, smoke test
    python bench/bench_memory_size.py --threads 1 --epochs 4      # a shorter epoch curve
    python bench/bench_memory_size.py --replot [--quick]          # redraw the PNG from the JSON

Data: the finished ``runs/sotu`` experiment (SmolLM2-135M, State of the Union,
60k train tokens): its datastore (with the layer-29 "output" memory input), kNN
targets, valid datastore (with the LM's log-probs) and valid targets. Nothing
there is written to. Every memory is trained by the library's own
``mlpmem.train.train_memory`` with the TrainConfig of ``runs/sotu/train``
(init lm_copy, 4 blocks of width 576, alpha 0.5, lr 1e-3, cosine) except for what
is varied:

1. epochs: the default-size memory trained for ``--epochs`` (cosine over all of
   them) with a valid evaluation about every half epoch (the trainer's own
   ``metrics.jsonl`` records: valid KL / CE / memory-alone ppl / interpolated ppl at
   the EM-fitted lambda). For the overfitting check the same memory is also scored,
   at the same steps and in eval mode, on a fixed random subset of the *training*
   rows (``--train-eval-rows``), so train and valid CE / KL are comparable; the
   running train loss of the trainer's records is kept too.
2. size: ``--sizes`` memories trained ``--size-epochs`` (2, as runs/sotu/train) epochs.
   The 4-block 2-epoch point is ``runs/sotu/train`` itself (read, not retrained).
   At d=576 the 49,152-way head is 28.3M parameters, so non-head parameters are
   reported as well. Cost per size: parameters, FLOPs per token (2 x parameters),
   training tokens/s measured here side by side at ``--threads`` (a few optimizer
   steps on real batches, same code path as the trainer) and memory-alone scoring
   tokens/s (forward over valid rows, batch 1024); the trainer's own tokens/s of each
   run is also kept (runs/sotu/train's was measured at 2 threads).

LM alone and kNN-LM valid perplexities come from ``runs/sotu/report.json``
(``valid_lambda_curves``, whose lambda 0 is the LM alone) and ``runs/sotu/knn.json``
(EM-fitted lambda at the tuned temperature).

Training runs go to ``runs/bench_memory/<name>/`` (``runs/bench_memory_quick/`` with
``--quick``); a finished run folder is reused, an interrupted one resumes from its
last checkpoint (train_memory's own resume). Writes
``bench/results/memory_size.json`` and ``memory_size.png`` (``*_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from provenance import results_dir, start, write_result

from mlpmem.losses import sparse_kd_loss
from mlpmem.memory import load_memory
from mlpmem.train import METRICS, TrainConfig, TrainData, build_memory, build_optimizer, evaluate, read_metrics, train_memory

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_memory_size")


# ----------------------------------------------------------------------------- helpers


class Subset:
    """Rows ``rows`` of a TrainData, looking like a TrainData to ``mlpmem.train.evaluate``."""

    def __init__(self, data: TrainData, rows: np.ndarray) -> None:
        self.inner, self.rows = data, np.sort(rows)
        self.n, self.targets, self.ds = len(self.rows), data.targets, data.ds

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        return self.inner.batch(self.rows[idx])


def param_counts(memory) -> dict[str, int]:
    total = sum(p.numel() for p in memory.parameters())
    head = sum(p.numel() for p in memory.head.parameters())
    return {"params": total, "head_params": head, "non_head_params": total - head, "flops_per_token": 2 * total}


def lm_and_knn_valid(sotu: Path) -> dict[str, float]:
    report = json.loads((sotu / "report.json").read_text())
    knn = json.loads((sotu / "knn.json").read_text())
    curves = report["valid_lambda_curves"]
    lm0 = dict(curves["kNN-LM"])[0.0]
    best_knn_curve = min(curves["kNN-LM"], key=lambda p: p[1])
    return {
        "ppl_lm": lm0,
        "ppl_knn_lm": knn["valid_ppl"],
        "lambda_knn_lm": knn["lambda"],
        "knn_temperature": knn["temperature"],
        "ppl_knn_lm_best_on_lambda_grid": best_knn_curve[1],
        "lambda_knn_lm_best_on_lambda_grid": best_knn_curve[0],
        "source": "runs/sotu/report.json valid_lambda_curves (lambda 0 = LM alone), runs/sotu/knn.json (EM lambda at the tuned T)",
    }


def train_speed(cfg: TrainConfig, data: TrainData, lm, steps: int, seed: int = 0) -> float:
    """Training tokens/s of a fresh memory of ``cfg``: ``steps`` optimizer steps on real
    batches (after one warm-up step), the same forward / loss / backward / AdamW as the trainer."""
    memory = build_memory(cfg, data.d_in, data.ds.vocab_size, lm)
    opt = build_optimizer(memory, cfg)
    memory.train()
    rng = np.random.default_rng(seed)
    params = [p for p in memory.parameters() if p.requires_grad]
    secs = 0.0
    for i in range(steps + 1):
        b = data.batch(rng.choice(data.n, cfg.batch_size, replace=False))
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = sparse_kd_loss(memory(b["h"]), b["ids"], b["probs"], b["labels"], cfg.alpha)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        for g in opt.param_groups:
            g["lr"] = 1e-6
        opt.step()
        if i:
            secs += time.perf_counter() - t
    return steps * cfg.batch_size / secs


@torch.no_grad()
def score_speed(memory, valid: TrainData, rows: int, batch: int = 1024) -> float:
    """Memory-alone scoring tokens/s: forward + log-softmax over ``rows`` valid rows."""
    memory.eval()
    hs = [valid.batch(np.arange(s, min(s + batch, rows)))["h"] for s in range(0, rows, batch)]
    torch.log_softmax(memory(hs[0]).float(), -1)  # warm-up
    t = time.perf_counter()
    for h in hs:
        torch.log_softmax(memory(h).float(), -1)
    return rows / (time.perf_counter() - t)


# ----------------------------------------------------------------------------- runs


def run_training(name, out_dir: Path, cfg: TrainConfig, sotu: Path, lm, train_sub: Subset | None) -> dict:
    """train_memory into ``out_dir`` (reused if finished, resumed if not); with ``train_sub``,
    the memory is also scored on those training rows at every valid evaluation."""
    side = out_dir.parent / f"{out_dir.name}.train_eval.jsonl"  # outside the stage folder: its manifest stays the trainer's
    evals = {r["step"]: r for r in read_metrics(side)} if side.exists() else {}
    on_step = None
    if train_sub is not None:
        n_steps = max(1, math.ceil(cfg.epochs * train_sub.inner.n / cfg.batch_size))

        def on_step(step, rec, memory):
            if step in evals or not ((cfg.eval_every and step % cfg.eval_every == 0) or step == n_steps):
                return
            t = time.perf_counter()
            r = evaluate(memory, train_sub, cfg.alpha, next(memory.parameters()).device, False, cfg.batch_size)
            evals[step] = {"step": step, "split": "train_subset", **r, "seconds": time.perf_counter() - t}
            with open(side, "a") as f:
                f.write(json.dumps(evals[step]) + "\n")

    t0 = time.perf_counter()
    train_memory(
        sotu / "datastore",
        sotu / "targets",
        out_dir,
        cfg,
        valid_datastore_dir=sotu / "valid",
        valid_targets_dir=sotu / "valid_targets",
        init_lm=lm,
        meta={"model": "smollm2-135m", "bench": name},
        on_step=on_step,
    )
    wall = time.perf_counter() - t0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return {
        "metrics": read_metrics(out_dir / METRICS),
        "train_subset": [evals[k] for k in sorted(evals)],
        "manifest": manifest,
        "wall_seconds_this_call": wall,
    }


def epoch_curve(run: dict, n_rows: int, batch: int, eval_every: int) -> list[dict]:
    """One row per valid evaluation: epoch, valid metrics, running train loss, train-subset metrics."""
    ep = lambda s: s * batch / n_rows  # noqa: E731
    train = [r for r in run["metrics"] if r["split"] == "train"]
    sub = {r["step"]: r for r in run["train_subset"]}
    rows = []
    for v in (r for r in run["metrics"] if r["split"] == "valid"):
        s = v["step"]
        recent = [r for r in train if s - eval_every < r["step"] <= s]  # the trainer's records since the previous evaluation
        row = {
            "step": s,
            "epoch": round(ep(s), 4),
            "valid_ppl_memory": v["ppl_memory"],
            "valid_ppl_interp": v.get("ppl_interp"),
            "lambda": v.get("lambda"),
            "valid_ce": v["ce"],
            "valid_kl": v.get("kl"),
            "valid_loss": v.get("loss"),
            "train_loss_running": float(np.mean([r["loss"] for r in recent])) if recent else None,
            "train_ce_running": float(np.mean([r["ce"] for r in recent])) if recent else None,
            "train_kl_running": float(np.mean([r["kl"] for r in recent])) if recent else None,
        }
        if s in sub:
            t = sub[s]
            row.update(
                train_subset_ce=t["ce"],
                train_subset_kl=t.get("kl"),
                train_subset_loss=t.get("loss"),
                train_subset_ppl_memory=t["ppl_memory"],
                gap_loss_valid_minus_train=v.get("loss", float("nan")) - t.get("loss", float("nan")),
                gap_ce_valid_minus_train=v["ce"] - t["ce"],
            )
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- plot


def plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ref = res["reference_valid"]
    fig = Figure(figsize=(16, 4.8))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    curve = res["epochs"]["curve"]
    x = [r["epoch"] for r in curve]
    ax1.plot(x, [r["valid_ppl_memory"] for r in curve], "o-", color="tab:orange", ms=4, label="MLP memory alone")
    ax1.plot(x, [r["valid_ppl_interp"] for r in curve], "o-", color="tab:green", ms=4, label="LM + MLP memory (EM lambda)")
    ax1.axhline(ref["ppl_lm"], color="tab:gray", ls="--", label=f"LM alone ({ref['ppl_lm']:.2f})")
    ax1.axhline(ref["ppl_knn_lm"], color="tab:purple", ls=":", label=f"LM + kNN-LM ({ref['ppl_knn_lm']:.2f})")
    if res.get("sizes"):
        p2 = [s for s in res["sizes"] if s["name"] == res["epochs"]["size_reference"]]
        if p2:
            ax1.plot(
                [p2[0]["epochs"]],
                [p2[0]["valid_ppl_interp"]],
                "s",
                color="black",
                ms=6,
                label=f"{p2[0]['epochs']:.0f}-epoch schedule (runs/sotu/train)",
            )
    ax1.set_xlabel("training epochs (passes over the 60k-token datastore)")
    ax1.set_ylabel("valid perplexity (per token)")
    ax1.set_title(f"Valid perplexity vs epochs ({res['epochs']['name']}, cosine over {res['epochs']['epochs']:g} epochs)", fontsize=9)
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    # train vs valid: overfitting check
    ax3.plot(x, [r.get("valid_loss") for r in curve], "o-", color="tab:red", ms=4, label="valid loss (eval mode)")
    if any("train_subset_loss" in r for r in curve):
        xs = [r["epoch"] for r in curve if "train_subset_loss" in r]
        ax3.plot(
            xs,
            [r["train_subset_loss"] for r in curve if "train_subset_loss" in r],
            "o-",
            color="tab:blue",
            ms=4,
            label=f"train loss, {res['train_eval_rows']} train rows (eval mode)",
        )
    xr = [(r["epoch"], r["train_loss_running"]) for r in curve if r.get("train_loss_running") is not None]
    ax3.plot(*zip(*xr), ".--", color="tab:cyan", label="train loss, running (trainer's batches)")
    ax3.set_xlabel("training epochs")
    ax3.set_ylabel("loss = 0.5 KL(p_kNN || q) + 0.5 CE (nats)")
    ax3.set_title("Overfitting check: train vs valid loss", fontsize=9)
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=7)
    # sizes
    sizes = res.get("sizes") or []
    if sizes:
        px = [s["params"] / 1e6 for s in sizes]
        ax2.plot(
            px,
            [s["valid_ppl_interp"] for s in sizes],
            "o",
            color="tab:green",
            label=f"LM + MLP memory ({res['size_epochs']:g} epochs, EM lambda)",
        )
        for s, xx in zip(sizes, px):
            ax2.annotate(
                f"{s['label']}, {s['epochs']:.2g} ep\nlambda {s['lambda']:.2f}, alone {s['valid_ppl_memory']:.1f}",
                (xx, s["valid_ppl_interp"]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax2.axhline(ref["ppl_lm"], color="tab:gray", ls="--", label=f"LM alone ({ref['ppl_lm']:.2f})")
        ax2.axhline(ref["ppl_knn_lm"], color="tab:purple", ls=":", label=f"LM + kNN-LM ({ref['ppl_knn_lm']:.2f})")
        ax2.set_xscale("log")
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax2.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax2.xaxis.set_minor_formatter(NullFormatter())
        ax2.set_xticks(sorted({round(v, 1) for v in px}))
        ax2.set_xlim(min(px) / 1.05, max(px) * 1.12)
        ax2.set_xlabel("memory parameters (millions, log scale; head = 28.3M of each)")
        ax2.set_ylabel("valid perplexity, LM + memory")
        ax2.set_title("Valid interpolated perplexity vs memory size", fontsize=9)
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=7)
    fig.suptitle(f"MLP memory on SmolLM2-135M, State of the Union (60k train tokens){' [QUICK]' if res['quick'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- main


def parse_sizes(spec: str) -> list[dict]:
    """'b0,b1,b2,b4,b4x8' -> blocks (and FFN expansion after x)."""
    out = []
    for item in spec.split(","):
        item = item.strip().lstrip("b")
        blocks, _, exp = item.partition("x")
        out.append({"n_blocks": int(blocks), "expansion": int(exp) if exp else 4})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sotu", default=str(ROOT / "runs/sotu"), help="the finished experiment to read (datastore, targets, valid, train/config.json)"
    )
    p.add_argument(
        "--out-root", default=None, help="where training runs go (default runs/bench_memory, runs/bench_memory_quick with --quick)"
    )
    p.add_argument("--epochs", type=float, default=None, help="epoch run length (default 6; quick 0.5)")
    p.add_argument("--evals-per-epoch", type=float, default=None, help="valid evaluations per epoch (default 2; quick 8)")
    p.add_argument("--sizes", default=None, help="comma list: b<blocks>[x<expansion>] (default b0,b1,b2,b4; quick b0,b1)")
    p.add_argument("--size-epochs", type=float, default=None, help="epochs of each size run (default 2; quick 0.25)")
    p.add_argument(
        "--train-eval-rows", type=int, default=None, help="training rows scored at each valid evaluation (default 3000; quick 1000)"
    )
    p.add_argument(
        "--speed-steps", type=int, default=None, help="optimizer steps timed per size for training tokens/s (default 3; quick 1)"
    )
    p.add_argument("--skip-epochs", action="store_true")
    p.add_argument("--skip-sizes", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (the full run: 1)")
    p.add_argument("--quick", action="store_true", help="minutes: 0.5 epoch curve, 0.25-epoch b0/b1 sizes")
    p.add_argument("--out", default=None)
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the output JSON")
    a = p.parse_args()
    started = start()
    if a.replot:
        out_json = Path(a.out or results_dir() / ("memory_size_quick.json" if a.quick else "memory_size.json"))
        plot(json.loads(out_json.read_text()), out_json.with_suffix(".png"))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    q = a.quick
    epochs = a.epochs or (0.5 if q else 6.0)
    evals_per_epoch = a.evals_per_epoch or (8.0 if q else 2.0)
    sizes = parse_sizes(a.sizes or ("b0,b1" if q else "b0,b1,b2,b4"))
    size_epochs = a.size_epochs or (0.25 if q else 2.0)
    train_eval_rows = a.train_eval_rows or (1000 if q else 3000)
    speed_steps = a.speed_steps or (1 if q else 3)
    out_root = Path(a.out_root or ROOT / ("runs/bench_memory_quick" if q else "runs/bench_memory"))
    out_json = Path(a.out or results_dir() / ("memory_size_quick.json" if q else "memory_size.json"))
    sotu = Path(a.sotu)
    out_root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    from mlpmem.models import load_model

    base_cfg_json = json.loads((sotu / "train/config.json").read_text())
    base = TrainConfig(**base_cfg_json["config"])
    lm = load_model("smollm2-135m", "float32")[0]
    data = TrainData(sotu / "datastore", sotu / "targets", base.input_layer, base.input_site, lm)
    valid = TrainData(sotu / "valid", sotu / "valid_targets", data.layer, data.site, lm)
    steps_per_epoch = data.n / base.batch_size
    train_sub = Subset(data, np.random.default_rng(1234).choice(data.n, min(train_eval_rows, data.n), replace=False))
    ref = lm_and_knn_valid(sotu)

    res: dict = {
        "what": "MLP memory valid quality vs training epochs and vs memory size (issue: More training, more memory)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": q,
        "threads": torch.get_num_threads(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "data": {
            "experiment": str(sotu),
            "model": "smollm2-135m",
            "train_rows": data.n,
            "valid_rows": valid.n,
            "memory_input": {"layer": data.layer, "site": data.site},
        },
        "base_train_config": dataclasses.asdict(base),
        "reference_valid": ref,
        "train_eval_rows": len(train_sub.rows),
        "notes": [],
    }

    if not q and epochs < 6:
        res["notes"].append(
            f"epoch run cut from the planned 6 to {epochs:g} epochs (cosine over {epochs:g}) to fit ~50 min: the memory trained at only "
            "~110 tokens/s at 1 thread on this shared 2-core machine (quick run), so 6 epochs (360k tokens) alone would take ~55 min"
        )
    if not q and size_epochs < 2:
        res["notes"].append(f"size runs cut from 2 to {size_epochs:g} epochs to fit the time budget")

    def save():
        res["elapsed_s"] = time.perf_counter() - t_start
        write_result(out_json, res, started, default=float)
        plot(res, out_json.with_suffix(".png"))

    # -- 1. epochs
    if not a.skip_epochs:
        eval_every = max(1, round(steps_per_epoch / evals_per_epoch))
        ecfg = dataclasses.replace(
            base,
            epochs=epochs,
            eval_every=eval_every,
            ckpt_every=max(eval_every, round(steps_per_epoch)),
            keep_last=1,
            log_every=max(1, eval_every // 3),
        )
        name = f"epochs{epochs:g}_b{base.n_blocks}"
        log.info("epoch run %s: %g epochs, valid every %d steps (%.2f epoch)", name, epochs, eval_every, eval_every / steps_per_epoch)
        run = run_training(name, out_root / name, ecfg, sotu, lm, train_sub)
        man = run["manifest"]
        # step 0: the lm_copy start is the LM's own head path, so this is the LM's train / valid gap
        m0 = build_memory(ecfg, data.d_in, data.ds.vocab_size, lm)
        v0, t0_ = (evaluate(m0, d, ecfg.alpha, torch.device("cpu"), False, ecfg.batch_size) for d in (valid, train_sub))
        del m0
        init_row = {
            "step": 0,
            "epoch": 0.0,
            "valid_ppl_memory": v0["ppl_memory"],
            "valid_ppl_interp": v0["ppl_interp"],
            "lambda": v0["lambda"],
            "valid_ce": v0["ce"],
            "valid_kl": v0["kl"],
            "valid_loss": v0["loss"],
            "train_loss_running": None,
            "train_subset_ce": t0_["ce"],
            "train_subset_kl": t0_["kl"],
            "train_subset_loss": t0_["loss"],
            "train_subset_ppl_memory": t0_["ppl_memory"],
            "gap_loss_valid_minus_train": v0["loss"] - t0_["loss"],
            "gap_ce_valid_minus_train": v0["ce"] - t0_["ce"],
        }
        curve = [init_row] + epoch_curve(run, data.n, base.batch_size, eval_every)
        for r in curve:
            if "gap_loss_valid_minus_train" in r:
                r["gap_loss_growth_since_init"] = r["gap_loss_valid_minus_train"] - init_row["gap_loss_valid_minus_train"]
                r["gap_ce_growth_since_init"] = r["gap_ce_valid_minus_train"] - init_row["gap_ce_valid_minus_train"]
        res["epochs"] = {
            "name": name,
            "folder": str(out_root / name),
            "epochs": epochs,
            "eval_every_steps": eval_every,
            "steps": man["steps"],
            "config_changes_from_runs_sotu_train": {
                "epochs": epochs,
                "eval_every": eval_every,
                "ckpt_every": ecfg.ckpt_every,
                "keep_last": 1,
                "log_every": ecfg.log_every,
            },
            "params": man["parameters"],
            "trainer_tokens_per_s": man["tokens_per_s"],
            "trainer_threads": man["torch_threads"],
            "size_reference": f"b{base.n_blocks}" + ("" if base.expansion == 4 else f"x{base.expansion}"),
            "curve": curve,
            "wall_seconds_this_call": run["wall_seconds_this_call"],
            "curve_note": "step 0 = the untrained lm_copy memory (= the LM's head path: memory-alone ppl = LM ppl); train_subset_* = the memory in eval mode on "
            "fixed random training rows at the same step as the valid evaluation; train_*_running = mean of the trainer's batch losses since the previous evaluation; "
            "gap_*_growth_since_init = (valid - train) now minus (valid - train) at step 0, i.e. the part of the gap that training added",
        }
        c = res["epochs"]["curve"][1:]
        best = min(c, key=lambda r: r["valid_ppl_interp"])
        res["epochs"]["summary"] = {
            "best_valid_ppl_interp": best["valid_ppl_interp"],
            "best_at_epoch": best["epoch"],
            "final_valid_ppl_interp": c[-1]["valid_ppl_interp"],
            "final_valid_ppl_memory": c[-1]["valid_ppl_memory"],
            "final_lambda": c[-1]["lambda"],
            "final_gap_loss_valid_minus_train": c[-1].get("gap_loss_valid_minus_train"),
            "init_gap_loss_valid_minus_train": init_row["gap_loss_valid_minus_train"],
            "final_gap_loss_growth_since_init": c[-1].get("gap_loss_growth_since_init"),
            "final_gap_ce_growth_since_init": c[-1].get("gap_ce_growth_since_init"),
            "valid_loss_min_at_epoch": min(c, key=lambda r: r["valid_loss"])["epoch"],
        }
        save()

    # -- 2. sizes
    if not a.skip_sizes:
        res["size_epochs"] = size_epochs
        res["sizes"] = []
        sotu_train = sotu / "train"
        for s in sizes:
            label = f"{s['n_blocks']} block{'s' if s['n_blocks'] != 1 else ''}" + (
                "" if s["expansion"] == 4 else f", FFN x{s['expansion']}"
            )
            name = f"b{s['n_blocks']}" + ("" if s["expansion"] == 4 else f"x{s['expansion']}")
            scfg = dataclasses.replace(base, epochs=size_epochs, **s)
            reuse = scfg == base and (sotu_train / "manifest.json").exists()
            if reuse:
                folder = sotu_train
                run = {
                    "metrics": read_metrics(folder / METRICS),
                    "manifest": json.loads((folder / "manifest.json").read_text()),
                    "wall_seconds_this_call": 0.0,
                }
                log.info("size %s: reusing %s", name, folder)
            else:
                folder = out_root / f"size_{name}_ep{size_epochs:g}"
                log.info("size %s: training %s", name, folder)
                run = run_training(name, folder, scfg, sotu, lm, None)
            man = run["manifest"]
            v = [r for r in run["metrics"] if r["split"] == "valid"][-1]
            memory, _ = load_memory(folder / "memory")
            tr = evaluate(memory, train_sub, scfg.alpha, torch.device("cpu"), False, scfg.batch_size)
            row = {
                "name": name,
                "label": label,
                "folder": str(folder),
                "reused_runs_sotu_train": reuse,
                **s,
                "epochs": man["epochs"],
                "steps": man["steps"],
                **param_counts(memory),
                "valid_ppl_memory": v["ppl_memory"],
                "valid_ppl_interp": v["ppl_interp"],
                "lambda": v["lambda"],
                "valid_ce": v["ce"],
                "valid_kl": v["kl"],
                "valid_loss": v["loss"],
                "train_subset_loss": tr["loss"],
                "train_subset_ce": tr["ce"],
                "gap_loss_valid_minus_train": v["loss"] - tr["loss"],
                "trainer_tokens_per_s": man["tokens_per_s"],
                "trainer_threads": man["torch_threads"],
            }
            row["train_tokens_per_s"] = train_speed(scfg, data, lm, speed_steps)
            row["score_tokens_per_s"] = score_speed(memory, valid, min(valid.n, 4096))
            log.info(
                "size %s: %s",
                name,
                {
                    k: row[k]
                    for k in ("params", "valid_ppl_memory", "valid_ppl_interp", "lambda", "train_tokens_per_s", "score_tokens_per_s")
                },
            )
            res["sizes"].append(row)
            del memory
            save()
        res["sizes"].sort(key=lambda r: r["params"])
        res["notes"].append(
            f"train_tokens_per_s / score_tokens_per_s: measured side by side in this process at {torch.get_num_threads()} thread(s) "
            f"({speed_steps} timed optimizer steps of {base.batch_size} rows after a warm-up; forward + log-softmax over valid rows); "
            "trainer_tokens_per_s is each run's own number (runs/sotu/train: its own threads, see trainer_threads)."
        )
    save()
    log.info("wrote %s (%.0f s)", out_json, res["elapsed_s"])


if __name__ == "__main__":
    main()
