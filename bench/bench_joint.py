"""Joint fine-tuning against fine-tuning alone and fine-tuning + memory, at one budget (issue 12 item 4 and its table; not a test).

    python bench/bench_joint.py                       # every step in turn (each cached under runs/joint): ~30 min of 2 idle cores
    python bench/bench_joint.py --step plan           # the steps, one per line (run each under the shared lock)
    python bench/bench_joint.py --step train:sotu:lora  (or score:sotu:lora, score:base, report)
    python bench/bench_joint.py --quick --sotu RUN --gcide RUN --work DIR   # smoke run: 1k fine-tuning tokens, 600 scored per text

SmolLM2-135M, two directions. "sotu": the memory of runs/sotu (State of the Union, 60k training tokens; lambda from
runs/sotu/report.json), in-domain text SOTU, the other corpus GCIDE. "gcide": the memory of runs/gate/gcide20k (GCIDE
dictionary, 20k training tokens; lambda fitted by EM on its valid split for the base model), in-domain GCIDE, other SOTU.
The third kind of text is the generic licence text of bench/bench_mixing.py (/usr/share/common-licenses).

Systems per direction, all fine-tuned on the first --train-tokens of the in-domain train split with the same budget
(chunks, batch, steps, epochs; lr 5e-4 for LoRA and joint, 5e-5 for full, the rates of bench_finetune.py):
  base; base + memory (fixed lambda; gated: a gate fitted on the in-domain valid split with mlpmem.gate, as bench_mixing.py);
  LoRA FT and full FT, alone and + memory (lambda refit by EM on valid for that model; gated, refit on valid);
  joint LoRA with the memory frozen, and with the memory trained (at the training lambda; refit; gated).
Every model is scored once per text with mlpmem.gate.score_memories (windows 512 / 256, the evaluator's), the per-token
scores cached under runs/joint/scores; fixed, refit and gated mixtures are array maths on them. Writes
bench/results/joint.json and joint.png (``--quick``: joint_quick.*).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from provenance import results_dir, start, write_result  # noqa: E402

WORK = ROOT / "runs/joint"
DIRECTIONS = {
    "sotu": {"run": ROOT / "runs/sotu", "other": "gcide", "label": "SOTU"},
    "gcide": {"run": ROOT / "runs/gate/gcide20k", "other": "sotu", "label": "GCIDE"},
}
FINETUNES = {  # name -> (method, memory in the loop, memory trained)
    "lora": ("lora", False, False),
    "full": ("full", False, False),
    "joint_frozen": ("lora", True, False),
    "joint_trained": ("lora", True, True),
}


def budget(a) -> dict:
    return {
        "train_tokens": a.train_tokens,
        "chunk": 512,
        "batch_size": a.batch_size,
        "epochs": 1.0,
        "warmup": 0.1,
        "weight_decay": 0.01,
        "lr": {"lora": 5e-4, "full": 5e-5, "memory (joint_trained)": 5e-4},
        "lora": {"r": 16, "alpha": 32, "targets": "q,k,v,o,gate,up,down"},
        "eval_tokens": {"valid": a.valid_tokens, "test": a.test_tokens, "generic": a.generic_tokens},
        "seed": 0,
    }


def texts(a) -> dict[str, np.ndarray]:
    """Every scored text, by name: {sotu,gcide}_{valid,test}, generic."""
    from bench_mixing import generic_jsonl

    from mlpmem.corpus import Corpus
    from mlpmem.gate import generic_tokens
    from mlpmem.models import DEFAULT_MODEL, load_tokenizer

    out = {}
    for d, spec in DIRECTIONS.items():
        c = Corpus(spec["run"] / "corpus")
        out[f"{d}_valid"] = c.tokens("valid")[: a.valid_tokens]
        out[f"{d}_test"] = c.tokens("test")[: a.test_tokens]
    out["generic"] = generic_tokens(str(generic_jsonl(WORK / "generic.jsonl")), load_tokenizer(DEFAULT_MODEL), a.generic_tokens)
    return out


def memory_dir(d: str) -> Path:
    return DIRECTIONS[d]["run"] / "train/memory"


def fixed_lambda(d: str) -> float:
    """The memory's own lambda: the run's report (EM on valid), or EM on the base model's valid scores here."""
    report = DIRECTIONS[d]["run"] / "report.json"
    if report.exists():
        return float(json.loads(report.read_text())["lambda"]["mlp_memory"])
    from mlpmem.interpolate import fit_lambda_em

    s = load_scores("base", f"{d}_valid", d)
    return fit_lambda_em(s.lm_logprob, s.memory_logprob)


# ----------------------------------------------------------------------------- steps


def step_train(a, d: str, name: str) -> None:
    from mlpmem.finetune import FinetuneConfig, finetune

    method, joint, trained = FINETUNES[name]
    b = budget(a)
    cfg = FinetuneConfig(
        method=method,
        lr=b["lr"][method],
        weight_decay=b["weight_decay"],
        epochs=b["epochs"],
        tokens=b["train_tokens"],
        chunk=b["chunk"],
        batch_size=b["batch_size"],
        warmup=b["warmup"],
        seed=b["seed"],
        device="cpu",
        dtype="float32",
        memory=str(memory_dir(d)) if joint else None,
        memory_trainable=trained,
        lambda_=fixed_lambda(d) if joint else None,
    )
    m = finetune(cfg, DIRECTIONS[d]["run"] / "corpus", WORK / d / name)
    print(
        json.dumps(
            {k: m[k] for k in ("method", "lambda", "memory_trained", "steps", "train_tokens", "loss_first", "loss_last", "train_seconds")}
        )
    )


def score_file(system: str, text: str, d: str) -> Path:
    return WORK / "scores" / f"{system}__{text}__{d}mem.npz"


def load_scores(system: str, text: str, d: str):
    from mlpmem.gate import MixScores

    return MixScores.load(score_file(system, text, d))


def step_score(a, d: str | None, name: str) -> None:
    """Score every text needed for one model: base (with both memories, one LM pass each) or a fine-tuned model (its direction's memory)."""
    import torch

    from mlpmem.gate import MixScores, score_memories
    from mlpmem.memory import load_memory
    from mlpmem.models import DEFAULT_MODEL, load_model
    from mlpmem.modeling.read_site import ReadSite

    if name == "base":
        model_name, dirs = DEFAULT_MODEL, list(DIRECTIONS)
        mems = [load_memory(memory_dir(x)) for x in dirs]
        wanted = list(texts(a))
    else:
        folder = WORK / d / name
        model_name, dirs = str(folder / "model"), [d]
        mems = [load_memory(folder / "memory" if FINETUNES[name][2] else memory_dir(d))]
        wanted = [f"{d}_valid", f"{d}_test", f"{DIRECTIONS[d]['other']}_test", "generic"]
    system = name if name == "base" else f"{d}_{name}"
    all_texts = texts(a)
    model, _, _ = load_model(model_name)
    pairs = [(m, ReadSite(int(meta["layer"]), meta["site"])) for m, meta in mems]
    for t in wanted:
        if all(score_file(system, t, x).exists() for x in dirs):
            continue
        t0 = time.perf_counter()
        with torch.inference_mode():
            labels, lp, feats, secs = score_memories(model, all_texts[t], 512, 256, pairs, batch_size=8, desc=f"{system} {t}")
        for k, x in enumerate(dirs):
            f = score_file(system, t, x)
            f.parent.mkdir(parents=True, exist_ok=True)
            MixScores(labels, lp[:, 0], lp[:, k + 1], feats[:, k], secs).save(f.with_suffix(".partial.npz"))
            f.with_suffix(".partial.npz").rename(f)
        print(f"{system} {t}: {len(labels)} tokens in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


# ----------------------------------------------------------------------------- the table


def step_report(a) -> dict:
    from mlpmem.gate import GateConfig, fit_gate, gate_lambdas
    from mlpmem.interpolate import fit_lambda_em, interpolate_logprobs, interpolate_per_token, perplexity
    from mlpmem.files import read_json

    out_rows: dict[str, dict] = {}
    training: dict[str, dict] = {}
    missing = []
    for d, spec in DIRECTIONS.items():
        cols = {"in_domain": f"{d}_test", "other_corpus": f"{spec['other']}_test", "generic": "generic"}
        lam_fixed = fixed_lambda(d)
        rows: dict[str, dict] = {}

        def add(label: str, system: str, how: str, lam_note=None, **extra) -> None:
            """One row: the model `system` with the direction's memory mixed `how` (none | fixed:<lam> | refit | gated)."""
            try:
                sc = {c: load_scores(system, t, d) for c, t in {**cols, "valid": f"{d}_valid"}.items()}
            except FileNotFoundError:
                missing.append(f"{d}: {label}")
                return
            row = {"system": system, "mixing": how, **extra}
            if how == "none":
                lam_of = lambda s: 0.0  # noqa: E731
            elif how.startswith("fixed"):
                lam = float(how.split(":")[1])
                lam_of, row["lambda"] = (lambda s: lam), lam
            elif how == "refit":
                lam = fit_lambda_em(sc["valid"].lm_logprob, sc["valid"].memory_logprob)
                lam_of, row["lambda"] = (lambda s: lam), lam
            else:
                gate, rec = fit_gate(sc["valid"], GateConfig(kind="mlp"))
                lam_of = lambda s: gate_lambdas(gate, s.features)  # noqa: E731
                row["gate_params"] = gate.num_parameters()
            for c, s in sc.items():
                lam = lam_of(s)
                lp = (
                    interpolate_logprobs(s.lm_logprob, s.memory_logprob, lam)
                    if np.isscalar(lam)
                    else interpolate_per_token(s.lm_logprob, s.memory_logprob, lam)
                )
                row[c] = perplexity(lp)
                if how == "gated":
                    row[f"mean_lambda_{c}"] = float(np.mean(lam))
            rows[label] = row

        add("base", "base", "none")
        add("base + memory (fixed lambda)", "base", f"fixed:{lam_fixed}")
        add("base + memory (gated)", "base", "gated")
        for ft in ("lora", "full"):
            s = f"{d}_{ft}"
            add(f"{ft} FT", s, "none")
            add(f"{ft} FT + memory (lambda refit)", s, "refit")
            add(f"{ft} FT + memory (gated)", s, "gated")
        for j, what in (("joint_frozen", "memory frozen"), ("joint_trained", "memory trained")):
            s = f"{d}_{j}"
            add(f"joint LoRA, {what} (training lambda)", s, f"fixed:{lam_fixed}")
            add(f"joint LoRA, {what} (lambda refit)", s, "refit")
            add(f"joint LoRA, {what} (gated)", s, "gated")
            add(f"joint LoRA, {what}: its LM alone", s, "none")
        base = rows.get("base")
        if base:
            for row in rows.values():
                for c in ("in_domain", "other_corpus", "generic"):
                    row[f"{c}_vs_base"] = row[c] / base[c] - 1
        out_rows[d] = {
            "memory": str(memory_dir(d)),
            "lambda_fixed": lam_fixed,
            "lambda_fixed_source": "report.json (EM on valid)"
            if (spec["run"] / "report.json").exists()
            else "EM on the base model's valid scores here",
            "texts": {c: t for c, t in {**cols, "valid (lambda refit, gate fit)": f"{d}_valid"}.items()},
            "rows": rows,
        }
        for name in FINETUNES:
            mf = WORK / d / name / "manifest.json"
            if mf.exists():
                m = read_json(mf)
                training[f"{d}_{name}"] = {
                    k: m.get(k)
                    for k in (
                        "method",
                        "lr",
                        "lambda",
                        "memory_trained",
                        "steps",
                        "warmup_steps",
                        "chunks",
                        "batch_size",
                        "train_tokens",
                        "epochs",
                        "trainable_params",
                        "memory_trainable_params",
                        "loss_first",
                        "loss_last",
                        "loss_mean_last_quarter",
                        "train_seconds",
                        "train_tokens_per_s",
                        "peak_rss_mb",
                        "torch_threads",
                    )
                }
    import torch

    n_tok = {}
    for f in sorted((WORK / "scores").glob("base__*__sotumem.npz")):
        n_tok[f.name.split("__")[1]] = int(np.load(f)["labels"].shape[0])
    result = {
        "what": "SmolLM2-135M: fine-tuning alone, fine-tuning + memory (refit, gated) and joint fine-tuning with the memory in the loop "
        "(-log((1-lambda) p_LM + lambda p_MLP); memory frozen or trained), at one budget; test perplexity in-domain, on the other "
        "corpus and on generic licence text, for a memory trained on SOTU and one trained on GCIDE",
        "budget": budget(a),
        "n_scored_tokens": n_tok,
        "scoring": {"context": 512, "stride": 256, "function": "mlpmem.gate.score_memories"},
        "gate": "mlpmem.gate.fit_gate(valid, GateConfig(kind='mlp')): fitted on the in-domain valid split of the model it mixes with",
        "directions": out_rows,
        "training": training,
        "missing_rows": missing,
        "notes": [
            f"{d}: first-step training loss on the same chunks: LM alone {training[f'{d}_lora']['loss_first']:.3f} nats, mixture "
            f"{training[f'{d}_joint_frozen']['loss_first']:.3f}: the memory fits the split it was trained on far better than test text "
            f"(base + memory gains only {-100 * out_rows[d]['rows']['base + memory (fixed lambda)']['in_domain_vs_base']:.1f}% on test), so joint "
            "fine-tuning on that split leans on the memory, and the LM's last hidden state (the memory's input) is pulled toward what suits the memory"
            for d in DIRECTIONS
            if f"{d}_lora" in training and f"{d}_joint_frozen" in training and "base" in out_rows[d]["rows"]
        ],
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": "python bench/bench_joint.py " + " ".join(sys.argv[1:]),
    }
    res = results_dir() if a.quick or WORK == (ROOT / "runs/joint").resolve() else WORK
    stem = "joint_quick" if a.quick else "joint"
    write_result(res / f"{stem}.json", result, a.started, default=float)
    plot(out_rows, res / f"{stem}.png", budget(a))
    for d, r in out_rows.items():
        print(f"== memory trained on {DIRECTIONS[d]['label']} (lambda {r['lambda_fixed']:.3f})")
        for label, row in r["rows"].items():
            print(
                f"  {label:46s} in {row['in_domain']:8.3f} ({100 * row.get('in_domain_vs_base', 0):+6.2f}%)  other {row['other_corpus']:8.3f} "
                f"({100 * row.get('other_corpus_vs_base', 0):+6.2f}%)  generic {row['generic']:8.3f} ({100 * row.get('generic_vs_base', 0):+6.2f}%)"
            )
    if missing:
        print("missing rows (steps not run):", missing)
    return result


def plot(directions: dict, path: Path, b: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2 * len(directions)))
    FigureCanvasAgg(fig)
    for i, (d, r) in enumerate(directions.items()):
        ax = fig.add_subplot(len(directions), 1, i + 1)
        rows = {k: v for k, v in r["rows"].items() if "in_domain_vs_base" in v}
        x = np.arange(len(rows))
        for j, (c, label) in enumerate(
            (("in_domain", "in-domain test"), ("other_corpus", "other corpus test"), ("generic", "generic licence text"))
        ):
            ax.bar(x + (j - 1) * 0.27, [100 * v[f"{c}_vs_base"] for v in rows.values()], 0.27, label=label)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x, list(rows), rotation=22, ha="right", fontsize=7)
        ax.set_ylabel("perplexity vs base (%)")
        ax.set_title(
            f"memory trained on {DIRECTIONS[d]['label']} (fixed lambda {r['lambda_fixed']:.3f}); fine-tuning on {b['train_tokens']} "
            f"{DIRECTIONS[d]['label']} tokens, {b['epochs']:g} epoch",
            fontsize=9,
        )
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plan() -> list[str]:
    steps = ["score:base"]
    for d in DIRECTIONS:
        for name in FINETUNES:
            steps += [f"train:{d}:{name}", f"score:{d}:{name}"]
    return steps + ["report"]


def main() -> None:
    global WORK
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--step",
        default="all",
        help="all | plan | score:base | train:DIR:NAME | score:DIR:NAME | report (DIR sotu|gcide, NAME lora|full|joint_frozen|joint_trained)",
    )
    p.add_argument(
        "--train-tokens", type=int, default=8192, help="fine-tuning budget: the first N tokens of the in-domain train split, 1 epoch"
    )
    p.add_argument("--batch-size", type=int, default=2, help="chunks of 512 tokens per step")
    p.add_argument("--valid-tokens", type=int, default=4000, help="tokens of each valid split scored (lambda refit, gate fit)")
    p.add_argument("--test-tokens", type=int, default=6000, help="tokens of each test split scored")
    p.add_argument("--generic-tokens", type=int, default=4000, help="tokens of generic licence text scored")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="runs and score caches (default runs/joint[_quick]; another folder: results go there too, not to bench/results, "
        "except with --quick)",
    )
    p.add_argument("--sotu", type=Path, default=DIRECTIONS["sotu"]["run"], help="the SOTU memory's run (corpus, train/memory, report.json)")
    p.add_argument("--gcide", type=Path, default=DIRECTIONS["gcide"]["run"], help="the GCIDE memory's run (corpus, train/memory)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1024 fine-tuning tokens, 600 tokens scored per text; joint_quick.*")
    a = p.parse_args()
    a.started = start()
    import torch

    if a.quick:
        a.train_tokens, a.valid_tokens, a.test_tokens, a.generic_tokens = 1024, 600, 600, 600
    WORK = (a.work or WORK.with_name("joint_quick" if a.quick else "joint")).resolve()
    DIRECTIONS["sotu"]["run"], DIRECTIONS["gcide"]["run"] = a.sotu.resolve(), a.gcide.resolve()

    if a.threads:
        torch.set_num_threads(a.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    if a.step == "plan":
        print("\n".join(plan()))
    elif a.step == "all":  # each step in its own process: its memory is freed, and a failed step leaves the others' caches
        same = (
            [
                "--train-tokens",
                str(a.train_tokens),
                "--batch-size",
                str(a.batch_size),
                "--valid-tokens",
                str(a.valid_tokens),
                "--test-tokens",
                str(a.test_tokens),
                "--generic-tokens",
                str(a.generic_tokens),
                "--work",
                str(WORK),
                "--sotu",
                str(a.sotu),
                "--gcide",
                str(a.gcide),
            ]
            + (["--threads", str(a.threads)] if a.threads else [])
            + (["--quick"] if a.quick else [])
        )
        for s in plan():
            if a.quick:  # tiny models: one process is enough, and a dozen fewer interpreter starts
                run_step(a, s)
            else:
                subprocess.run([sys.executable, __file__, "--step", s, *same], check=True)
    else:
        run_step(a, a.step)


def run_step(a, step: str) -> None:
    if step == "report":
        step_report(a)
        return
    parts = step.split(":")
    if parts[0] == "train":
        step_train(a, parts[1], parts[2])
    elif parts == ["score", "base"]:
        step_score(a, None, "base")
    else:
        step_score(a, parts[1], parts[2])


if __name__ == "__main__":
    main()
