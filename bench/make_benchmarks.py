"""Write BENCHMARKS.md from the JSON under bench/results (not a test).

    python bench/make_benchmarks.py [--quick --out FILE]

Every table is read from a results file that one benchmark command wrote; the
command is printed above its table, and under it the commit and date each
results file was measured at (its provenance, bench/provenance.py). A missing
file gives a line saying which command produces it, never a number from elsewhere.
``--quick`` reads the ``*_quick.json`` of smoke runs (bench/reproduce.py --quick,
from ``$MLPMEM_BENCH_RESULTS``) and must write elsewhere (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import command_of, measured, results_dir  # noqa: E402

from mlpmem.models import DEFAULT_MODEL, model_label  # noqa: E402
from mlpmem.interpolate import interval_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RES = results_dir()
SUFFIX = ""  # "_quick": read the smoke runs' results


def load(name: str) -> dict | None:
    p = RES / f"{name}{SUFFIX}.json"
    return json.loads(p.read_text()) if p.exists() else None


def img(name: str, alt: str) -> str:
    return f"![{alt}](bench/results/{name}{SUFFIX}.png)\n" if (RES / f"{name}{SUFFIX}.png").exists() else ""


def when(*names: str) -> str:
    """The line under a section's command: the commit and date each of its results files was measured at."""
    by: dict[str, list[str]] = {}  # files measured alike share one clause
    for n in names:
        if (r := load(n)) is not None:
            by.setdefault(measured(r), []).append(f"`{n}{SUFFIX}.json`")
    return "_" + "; ".join(f"{', '.join(files)} {text}" for text, files in by.items()) + "._\n\n" if by else ""


def table(head: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def bench_markdown(module: str):
    """The ``markdown`` function of a bench script that renders its own section."""
    import importlib

    return importlib.import_module(module).markdown


def missing(cmd: str) -> str:
    return f"_Not measured yet: run `{cmd}`._\n"


def section(title: str, name: str, cmd: str) -> tuple[dict | None, str]:
    """A section's results (bench/results/NAME.json, or None) and its heading with the command that made them
    (the command recorded in the JSON, else ``cmd``) or, when there are none, the command to run."""
    r = load(name)
    shown = (r.get("command") or command_of(r) or cmd) if r else cmd
    s = f"{title}\n\n```\n" + shown + "\n```\n\n"
    return r, s + when(name) if r else s + missing(cmd)


def quality_plot(runs: list[tuple[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [("knn_lm", "LM + kNN-LM"), ("mlp_memory", "LM + MLP memory"), ("knn_lm+mlp_memory", "LM + both")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    for j, (key, label) in enumerate(methods):
        xs = [i + (j - 1) * width for i in range(len(runs))]
        ys = [100 * (r["ppl"][key] / r["ppl"]["base"] - 1) for _, r in runs]
        ax.bar(xs, ys, width, label=label)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f}%", (x, y), ha="center", va="top", fontsize=8, xytext=(0, -2), textcoords="offset points")
    ax.set_xticks(range(len(runs)), [name for name, _ in runs])
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_ylabel("test perplexity change vs LM alone (%)")
    ax.set_title("SmolLM2-135M-Instruct (Q4_1, dequantised): test perplexity relative to the LM alone")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(RES / f"quality{SUFFIX}.png", dpi=120)
    plt.close(fig)


def quality() -> str:
    runs = [(name, r) for name, r in (("State of the Union", load("sotu200k")), ("GCIDE", load("gcide100k"))) if r]
    s = "## 1. Quality: LM alone, + kNN-LM, + MLP memory, + both\n\n"
    s += (
        "```\npython bench/bench_quality.py   # = mlpmem run bench/recipes/{sotu200k,gcide100k}.yaml + bench/summarize_run.py\n```\n\n"
        "GCIDE: Webster 1913 + WordNet from the Debian package `dict-gcide` (bench/gcide.py: one entry per document, "
        "source markers such as `[1913 Webster]` removed), split by entry.\n\n"
    )
    if not runs:
        return s + missing("mlpmem run bench/recipes/sotu200k.yaml")
    s += when("sotu200k", "gcide100k")
    rows = []
    for name, r in runs:
        p, tps = r["ppl"], r["tokens_per_s"]
        rows.append(
            [
                name,
                r["n_train_tokens"],
                r["n_test_tokens"],
                p["base"],
                p["knn_lm"],
                p["mlp_memory"],
                p["knn_lm+mlp_memory"],
                p.get("memory_alone", "not defined (pruned head)"),
                f"{r['lambda']['knn_lm']:.3f} / {r['lambda']['mlp_memory']:.3f}",
                r["knn_temperature"],
                f"{tps['knn_lm'] / tps['base']:.2f} / {tps['mlp_memory'] / tps['base']:.2f}",
            ]
        )
    s += table(
        [
            "corpus",
            "train tokens",
            "test tokens",
            "LM",
            "+ kNN-LM",
            "+ memory",
            "+ both",
            "memory alone",
            "lambda kNN / memory",
            "kNN T",
            "speed vs LM: kNN / memory",
        ],
        rows,
    )
    s += (
        "\nTest perplexity (lower is better). T and the lambdas are tuned on the valid split (EM for lambda); "
        "the memory starts as a copy of the LM's head path (init `lm_copy`) and trains 2 epochs. "
        "Speeds are tokens/s of the same scoring pass relative to the LM alone (exact Flat search, k=1024).\n\n"
    )
    quality_plot(runs)
    s += img("quality", "perplexity change vs LM alone")
    for key, (name, _) in zip(("sotu200k", "gcide100k"), runs):
        s += f"\n{name}, valid perplexity against lambda:\n\n" + img(f"{key}_lambda_curves", f"{name} lambda curves")
    return s


def scaling() -> str:
    r = load("scaling")
    s = "## 2. Cost per token as the datastore grows\n\n```\npython bench/bench_scaling.py --threads 1                         # 10k to 1M keys\npython bench/bench_scaling.py --threads 1 --sizes 3e6 --repeats 2 # adds 3M keys to the same JSON\n```\n\n"
    if not r:
        return s + missing("python bench/bench_scaling.py")
    s += when("scaling")
    rows = [
        [
            x["n"],
            x["factory"] + (f" nprobe {x['nprobe']}" if x.get("nprobe") else ""),
            x.get("recall_at_k"),
            x["tokens_per_s"]["lm"],
            x["tokens_per_s"]["lm+knn"],
            x["tokens_per_s"]["lm+memory"],
            x["ms_per_token"]["knn_search"],
            x["ms_per_token"]["memory"],
            x["speed_memory_over_knn"],
        ]
        for x in sorted(r["sizes"], key=lambda x: (x["n"], x["index"]))
    ]
    s += table(
        [
            "keys",
            "index",
            "recall@k",
            "LM tok/s",
            "LM + kNN tok/s",
            "LM + memory tok/s",
            "search ms/token",
            "memory ms/token",
            "speed memory / kNN",
        ],
        rows,
    )
    lg = r.get("largest", {})
    s += (
        f"\nSmolLM2-135M over {r['test_tokens']} test tokens (windows {r['context']}/{r['stride']}, batches of {r['batch_windows']} windows), "
        f"k={r['k']}, {r['threads']} torch thread(s), median of {' or '.join(str(n) for n in sorted({len(x['repeats']) for x in r['sizes']}))} passes per size; every ratio is taken inside one pass. "
        f"Keys beyond the 200k real ones are real keys plus Gaussian jitter (sigma {r['jitter_sigma']:.3f} per dim, about one "
        f"nearest-neighbour distance); the search is the library's (FAISS, exact re-rank for IVF). "
        f"At the largest size measured ({lg.get('n')}, {lg.get('index')} index) LM + memory runs at "
        f"{lg.get('speed_memory_over_knn', float('nan')):.2f}x the speed of LM + kNN-LM. The auto index scans about 16k keys per "
        "query whatever N, so its recall@k falls as N grows (column 3): keeping recall would cost more search time than shown. "
        "The machine's load fell during the run (LM alone from 30 to 115 tokens/s), hence the relative figure and fits.\n\n"
    )
    for kind, f in r.get("fits", {}).items():
        s += (
            f"- fitted {kind} search time per token, in units of the LM forward's time in the same pass = {f['a']:.3g} + {f['b']:.3g} x "
            f"{'N' if f['form'] == 'linear' else 'sqrt(N)'} on {len(f['points'])} points; extrapolated to {f['extrapolate_to']:,} keys: "
            f"{f['extrapolated_search_cost']:.3g}x the LM forward, "
            f"memory / kNN speed {f['extrapolated_speed_memory_over_knn']:.2f}x (an extrapolation, not a measurement)\n"
        )
    return s + "\n" + img("scaling", "throughput vs datastore size")


def finetune() -> str:
    r, s = section("## 3. Against fine-tuning the LM", "finetune", "python bench/bench_finetune.py --threads 1")
    if not r:
        return s
    base = r["ppl"]["base"]
    rows = [
        [
            name,
            v.get("lambda", ""),
            v["in_domain"],
            f"{100 * (v['in_domain'] / base['in_domain'] - 1):+.1f}%",
            v["ood"],
            f"{100 * (v['ood'] / base['ood'] - 1):+.1f}%",
        ]
        for name, v in r["ppl"].items()
    ]
    s += table(["system", "lambda", "in-domain ppl (SOTU test)", "vs base", "out-of-domain ppl (GCIDE)", "vs base"], rows)
    c, tr = r["compute"], r["training"]
    s += (
        f"\nFine-tuned on {r['train_tokens']:,} tokens of the memory's training split ({r['train_tokens_note'] if r.get('train_tokens_note') else 'the whole split'}). "
        f"Lambda `refit` is fitted by EM on the in-domain valid split for that model; the memory was trained on the base model's hidden states. "
        f"Compute: full FT {c['full_ft_flops']:.2e} FLOPs ({tr['full']['train_tokens_per_s']:.0f} tokens/s, peak {tr['full']['peak_rss_mb'] / 1024:.1f} GiB), "
        f"LoRA {c['lora_ft_flops']:.2e} ({tr['lora']['train_tokens_per_s']:.0f} tokens/s, {tr['lora']['trainable_params'] / 1e6:.1f}M trainable), "
        f"memory {c['memory_flops']['total']:.2e} (extraction {c['memory_flops']['extraction']:.2e} + training {c['memory_flops']['training']:.2e}). "
        f"{c['note']}.\n\n"
    )
    return s + img("finetune", "fine-tuning comparison")


def memory_size() -> str:
    r, s = section("## 4. More training, more memory", "memory_size", "python bench/bench_memory_size.py --threads 1")
    if not r:
        return s
    ref = r["reference_valid"]
    s += (
        f"Valid split of the {r['data']['train_rows']:,}-token State of the Union experiment (`runs/sotu`): LM alone {ref['ppl_lm']:.2f}, "
        f"kNN-LM {ref['ppl_knn_lm']:.2f}. Lambda is fitted on the same valid split at every evaluation, so the interpolated "
        "numbers are slightly optimistic; they compare settings, not methods.\n\n"
    )
    e = r.get("epochs")
    if e:
        rows = [
            [c["epoch"], c["valid_ppl_memory"], c["valid_ppl_interp"], c["lambda"], c.get("gap_loss_valid_minus_train")] for c in e["curve"]
        ]
        s += f"Epochs ({e['name']}, {e['params'] / 1e6:.1f}M parameters, cosine schedule over {e['epochs']:g} epochs):\n\n"
        s += table(["epoch", "valid ppl, memory alone", "valid ppl, LM + memory", "lambda", "valid - train loss"], rows)
    sizes = r.get("sizes") or []
    if sizes:
        rows = [
            [
                z["label"],
                z["params"] / 1e6,
                z["non_head_params"] / 1e6,
                z["valid_ppl_memory"],
                z["valid_ppl_interp"],
                z["lambda"],
                z.get("train_tokens_per_s"),
                z.get("score_tokens_per_s"),
            ]
            for z in sizes
        ]
        s += f"\nSizes, each trained {r.get('size_epochs', 2)} epochs:\n\n"
        s += table(
            [
                "memory",
                "params (M)",
                "without head (M)",
                "valid ppl, memory alone",
                "valid ppl, LM + memory",
                "lambda",
                "train tokens/s",
                "memory scoring tokens/s",
            ],
            rows,
        )
    for note in r.get("notes", []):
        s += f"\n- {note}"
    return s + "\n\n" + img("memory_size", "memory quality vs epochs and size")


def decoder() -> str:
    r = load("decoder")
    s = "## 5. Against a bigger decoder (Gemma-3-270M)\n\n```\npython bench/bench_decoder.py --threads 1 --repeats 3 --plain\n```\n\n"
    if not r:
        return s + missing("python bench/bench_decoder.py --threads 1 --repeats 3 --plain")
    s += when("decoder")
    rows = [[name, v["bits_per_byte"], v["bytes_per_s"], v["speed_vs_gemma"]] for name, v in r["systems"].items()]
    s += table(["system", "bits per byte", "bytes/s", "speed vs Gemma"], rows)
    s += (
        f"\nSame {r['text']['bytes']:,} bytes of State of the Union test text ({r['text']['documents']} speeches) for both tokenizers; "
        f"{r['convention']} Timing: {r['timing']}; {r['threads']} thread(s), median of {r['repeats']}. "
        f"Gemma: {r['gemma']['model']}; {r['gemma']['note']}. Gemma + kNN-LM: {r['gemma']['knn_lm']}.\n\n"
    )
    return s + img("decoder", "bits per byte and throughput")


def decode_table(r: dict) -> str:
    """bench_generate.py's ratios: one row per memory variant, a column per batch size and measure."""
    rng = lambda x: f"{x['median']:.3f} [{x['min']:.3f}, {x['max']:.3f}]"  # noqa: E731
    names = list(r["variants"])
    in_step = any("in_step" in r["decode"][b][v] for b in r["decode"] for v in names)
    step_text = lambda x: (
        f"{x['implied_ratio_to_lm']:.3f} (+{100 * x['overhead']['median']:.1f}%, 10-90%: +{100 * x['overhead']['p10']:.1f} to +{100 * x['overhead']['p90']:.1f})"
        if x
        else "-"
    )  # noqa: E731
    rows = []
    for v in names:
        var = r["variants"][v]
        head = var["head"] + (f" ({var['head_tokens']:,} tokens)" if var.get("head_tokens") else "") + (", int8" if var.get("int8") else "")
        row = [v, var["blocks"], head, f"{var['extra_params_read'] / 1e6:.1f}M"]
        row += [rng(r["decode"][b][v]["ratio_to_lm"]) for b in r["decode"]]
        row += [rng(r["decode"][b][v]["cpu_time_ratio_to_lm"]) for b in r["decode"] if "cpu_time_ratio_to_lm" in r["decode"][b][v]]
        row += [step_text(r["decode"][b][v].get("in_step")) for b in r["decode"] if in_step]
        row += [rng(r["score"][b][v]["ratio_to_lm"]) for b in r["score"]]
        rows.append(row)
    head = ["memory", "blocks", "head", "weights read per token beyond the LM"]
    head += [f"decode batch {b}: tokens/s vs LM" for b in r["decode"]]
    head += [f"decode batch {b}: CPU time, LM / system" for b in r["decode"] if "cpu_time_ratio_to_lm" in r["decode"][b][names[0]]]
    head += [f"decode batch {b}: in-step, 1 / (1 + time beyond the LM's call)" for b in r["decode"] if in_step]
    head += [f"scoring one pass of {r['score_tokens']} tokens vs LM"]
    return table(head, rows)


def decode_speed() -> str:
    r, s = section("## 5b. Decoding at the LM's speed", "generate", "python bench/bench_generate.py --threads 1")
    if not r:
        return s
    s += decode_table(r)
    in_step = any("in_step" in r["decode"][b][v] for b in r["decode"] for v in r["variants"])
    lm = ", ".join(f"batch {b} {r['decode'][b]['lm_tokens_per_s']} tokens/s" for b in r["decode"])
    s += (
        f"\nGreedy decoding with the KV cache, {r['new_tokens']} new tokens after a {r['prompt_tokens']}-token prompt; "
        f"{r['threads']} thread(s), float32, lambda {r['lambda']}; the LM alone: {lm}. Median ratio over {r['repeats']} rounds "
        + (
            "(in each round every memory system is timed in a pair with an LM call beside it, the order alternating) "
            if r.get("pairing")
            else "(each round calls every system once, in turn) "
        )
        + "and its range; the CPU-time columns divide the process's CPU seconds (one thread) instead, which leave out "
        + "the time this shared machine gave other tenants. "
        + (
            "The in-step columns time each decode step's work beyond the LM's own forward (memory, mixing, the model "
            "class) against that forward, in the same step: the machine's drift between calls, which the paired ratios "
            "carry, leaves them; median over every step of every round, with its 10-90% range (not measured for a shared "
            "head, whose rows run inside the LM's call). "
            if in_step
            else ""
        )
        + "`own`: the memory's own head, a trained copy of "
        "the LM's (the format before this round); `shared`: a memory trained with `freeze_head`, whose head is the LM's: "
        "the model class stacks its rows under the LM's in the LM's own head call, so the output embedding is read once "
        "per token for both; `vT`: the own head pruned to T tokens (`train.head_vocab: corpus`: the demo's train text has "
        "6,647 distinct tokens of 49,152); `q8`: the memory's linear layers in int8 (`memory_dtype='int8'`), a quarter "
        "of the bytes; `g`: mixed by a gate (per-token lambda, a run's default) instead of a fixed lambda.\n\n"
    )
    return s + decode_bfloat16(r) + shared_head_quality()


def decode_bfloat16(fp32: dict) -> str:
    """The same ratios with the LM (and the float memories) in bfloat16 (generate_bfloat16.json)."""
    r = load("generate_bfloat16")
    if not r:
        return missing("python bench/bench_generate.py --dtype bfloat16")
    s = f"The same in bfloat16 (the LM and the float memory; int8 memories stay int8):\n\n```\n{command_of(r)}\n```\n\n"
    s += when("generate_bfloat16") + decode_table(r)
    lm = lambda x: ", ".join(f"batch {b} {x['decode'][b]['lm_tokens_per_s']}" for b in x["decode"])  # noqa: E731
    return s + (
        f"\nThe LM alone decodes at {lm(r)} tokens/s in bfloat16 ({r['new_tokens']} new tokens after a "
        f"{r['prompt_tokens']}-token prompt), against {lm(fp32)} in float32 ({fp32['new_tokens']} after "
        f"{fp32['prompt_tokens']}; another run, so only the order of magnitude compares). This CPU has no bfloat16 "
        "instructions (AVX-512 BF16, AMX), so torch emulates them: on such a CPU float32, with the memory in int8, is the "
        "setting to use. The ratios still compare the memory's cost with the LM's at the same precision.\n\n"
    )


def shared_head_quality() -> str:
    q = load("shared_head")
    if not q:
        return missing("python bench/bench_shared_head.py --threads 2")
    cmd = q.get("command") or command_of(q)
    s = f"What keeping the LM's head costs in quality:\n\n```\n{cmd}\n```\n\n" + when("shared_head")
    ref = q["reference"]
    rows = [
        [
            name + (" (chosen on valid)" if name == q["selection"]["chosen"] else ""),
            r["blocks"],
            ("the LM's" if r["head_is_the_lms"] else "own")
            + (f" ({r['head_tokens']:,} tokens)" if r.get("head_tokens", 0) < q["runs"][ref].get("head_tokens", 0) else "")
            + (", int8" if r.get("int8") else ""),
            f"{r.get('bytes_read_per_token_beyond_the_lm', 4 * r['weights_read_per_token_beyond_the_lm']) / 1e6:.0f} MB",
            f"{r['lambda']:.3f}",
            f"{r['valid']:.3f}",
            f"{r['test']:.3f}",
            interval_text(r["test_vs_base"]),
            interval_text(r[f"test_vs_{ref}"]) if f"test_vs_{ref}" in r else "-",
            interval_text(r["ood_vs_base"]),
        ]
        for name, r in q["runs"].items()
    ]
    s += table(
        [
            "run",
            "blocks",
            "head",
            "weight bytes read beyond the LM",
            "lambda (valid)",
            "valid ppl",
            "test ppl",
            "test vs LM",
            f"test vs {ref}",
            "GCIDE test vs LM",
        ],
        rows,
    )
    b, n = q["base"], q["n_tokens"]
    s += (
        f"\nLM alone: valid {b['valid']:.3f}, test {b['test']:.3f}, GCIDE {b['ood']:.3f} ({n['test']:,} test and {n['ood']:,} GCIDE positions). "
        "Each memory at its fixed lambda fitted on valid; intervals are 95% paired bootstrap over blocks of 256 positions. "
        "`int8`: the memory's linear layers run in int8 at inference (`memory_dtype='int8'`, MLPMemory.use_int8, each "
        "input row with its own scale). `vocab`: the head pruned to the tokens of the run's train text (MLPMemory.prune_head, "
        "what `train.head_vocab: corpus` saves), no mass on other tokens. "
        f"Selection rule: {q['selection']['rule']}.\n\n"
    )
    return s


def pipeline() -> str:
    r, ex, se = load("pipeline"), load("extract"), load("search")
    s = (
        "## 6. Pipeline throughput, memory and disk\n\n```\npython bench/bench_pipeline.py\n"
        "python bench/bench_extract.py --tokens 16384 --repeats 3 --check-tokens 4096\npython bench/bench_search.py\n```\n\n"
    )
    s += when("pipeline", "extract", "search")
    if ex:
        rt = ex["ratio_to_plain"]
        per = (
            "; median of the per-repeat ratios: " + ", ".join(f"{m} {rt[m]['median_per_repeat']:.3f}x" for m in ("recompute", "cache"))
            if all("median_per_repeat" in rt[m] for m in ("recompute", "cache"))
            else ""
        )
        s += (
            f"Extraction against a plain forward pass (same model, same tokens, side by side, median of {ex['repeats']}, "
            f"{ex.get('threads', '?')} thread(s)): recompute windows {rt['recompute']['of_medians']:.3f}x, KV-cache mode {rt['cache']['of_medians']:.3f}x"
            f"{per} (cache-mode perplexity differs from recompute by {100 * ex['check']['ppl_rel_diff']:.2f}%).\n\n"
        )
    if se:
        k = se["k"]
        s += (
            f"Search at {se['n']:,} synthetic keys (d={se['d']}, k={se['k']}): Flat {se['flat_qps']:.1f} queries/s, "
            f"auto ({se['auto_factory']}, nprobe {se['auto_nprobe']}, exact re-rank) {se['auto_qps']:.1f} queries/s, recall@{k} {se[f'auto_recall@{k}']:.3f}.\n\n"
        )
    if not r:
        return s + missing("python bench/bench_pipeline.py")
    rows = []
    for st in r["stages"]:
        rate = st.get("tokens_per_s") or st.get("queries_per_s")
        unit = "tokens/s" if st.get("tokens_per_s") else ("queries/s" if st.get("queries_per_s") else "")
        extra = f"recall@1024 {st['index_recall_at_1024']:.3f}" if "index_recall_at_1024" in st else ""
        rows.append([st["stage"], st["wall_s"], st["cpu_s"], f"{rate:.1f} {unit}" if rate else "", st["peak_rss_mb"] / 1024, extra])
    s += table(["stage (own process)", "wall s", "CPU s", "rate", "peak RSS GiB", "note"], rows)
    s += (
        f"\n{r['n_train_tokens']:,} training tokens of State of the Union, {r['model']} (d={r['d']}); each stage is one `mlpmem` command "
        "(the log of commands is in the bench's work folder). At this size the forced IVF index scans most of its lists and then "
        "re-ranks, so it is slower than Flat; section 2 shows where it pays off. Rates are on the shared machine (other benchmarks ran "
        "alongside). Bytes on disk per training token:\n\n"
    )
    s += table(["artefact", "bytes / token"], [[k, v] for k, v in r["bytes_per_token"].items()])
    s += f"\nThe trained memory itself is {r['memory_weights_bytes'] / 2**20:.0f} MiB whatever the corpus size.\n\n"
    return s + img("pipeline", "pipeline stages")


def mixing() -> str:
    r, s = section("## 7. Gated mixing: lambda per token", "mixing", "python bench/bench_mixing.py --threads 2")
    if not r:
        return s
    sy, n = r["systems"], r["n_tokens"]
    pct = lambda v: f"{100 * v:+.2f}%"  # noqa: E731

    def vs_base(v: dict, split: str) -> str:  # the change and, where measured, its 95% paired interval
        iv = v.get("intervals", {}).get(f"{split}_vs_base")
        return interval_text(iv) if iv else pct(v[f"{split}_vs_base"])

    rows = [
        [
            name + (" (chosen on valid)" if name == r.get("selection", {}).get("chosen") else ""),
            v.get("params", ""),
            v["test"],
            vs_base(v, "test"),
            v["ood"],
            vs_base(v, "ood"),
            pct(v["ood_valid_vs_base"]) if "ood_valid_vs_base" in v else "",
            pct(v["generic_vs_base"]),
            f"{v['mean_lambda_test']:.3f} / {v['mean_lambda_ood']:.3f}",
        ]
        for name, v in sy.items()
    ]
    s += table(
        [
            "system",
            "gate params",
            "in-domain ppl (SOTU test)",
            "vs base [95% paired interval]",
            "out of domain (GCIDE test)",
            "vs base [95% paired interval]",
            "GCIDE valid vs base (selection)",
            "licence texts vs base",
            "mean lambda in / out",
        ],
        rows,
    )
    if sel := r.get("selection"):
        s += f"\nSelection rule, fixed before test was read: {sel['rule']}. Chosen: **{sel['chosen']}**.\n"
    s += (
        f"\nThe memory of `runs/sotu` ({r['memory_params'] / 1e6:.1f}M parameters, 60k SOTU training tokens, the one section 3 measured), "
        f"scored once per split (windows {r['scoring']['context']}/{r['scoring']['stride']}): SOTU valid {n['valid']:,} tokens (gate training), "
        f"SOTU test {n['test']:,}, GCIDE test {n['ood']:,} (never seen by any gate), licence texts {n['generic']:,} and text sampled from the LM "
        f"{n.get('lm_samples', 0):,} (optional generic training text of the `+ ...` rows; their own column is in-sample for those rows). "
        f"`fixed` is lambda {r['lambda_fixed']:.3f} from the run's report (EM on valid). `binned` is the closed form: one EM lambda per "
        "octile of the LM's entropy. `gated` is the learned gate (7 features, tanh MLP, sigmoid), started at the fixed lambda and "
        f"stopped early on held-out valid blocks. Computing the features and the gate took {100 * r['gate_share_of_scoring']:.1f}% "
        "of the scoring time (LM forward + memory + features + gate, same pass; windows of 512 / 256 run the LM twice per token, "
        "so a single cached pass would show about twice that share). The learned gate is the library's default kind (`gate: {kind: mlp}`): "
        "it beat the closed form in the comparisons below. Since this round a run fits it by default (`eval.mixing: auto`) with "
        "text sampled from the LM as its generic text (`gate: {generic: lm}`), chosen by a rule stated before any test "
        "number: it needs no data, so it is the one option every user has; the selection rule in the table checks the choice on "
        "GCIDE valid.\n\n"
    )
    for note in r.get("notes", []):
        s += f"- {note}\n"
    s += gate_select()
    s += ood_lmeval()
    rr = load("mixing_router")
    if rr:
        s += (
            "\nTwo memories on one LM (issue 12 item 2, scoring path only): the SOTU memory above and a GCIDE memory (20k training tokens, "
            "`lm_copy` start, 2 epochs), scored in one LM pass; the router (`mlpmem.gate.fit_router`, "
            f"{rr['router_params']} parameters, softmax over LM + 2 memories from both memories' features) is fitted on both valid splits "
            f"({rr['n_tokens_per_split_and_domain']:,} tokens each); test {rr['n_tokens_per_split_and_domain']:,} tokens per domain, `mixed` is both together. "
            f"`{rr['command']}`\n\n" + when("mixing_router")
        )
        base = rr["ppl"]["base"]
        s += table(
            ["system", "SOTU test", "GCIDE test", "both (mixed)"],
            [
                [name] + [f"{v[d]:.3f} ({100 * (v[d] / base[d] - 1):+.1f}%)" for d in ("sotu", "gcide", "mixed")]
                for name, v in rr["ppl"].items()
            ],
        )
        s += (
            "\nMean router weights (LM, SOTU memory, GCIDE memory) on test: "
            + "; ".join(f"{d} {', '.join(f'{x:.2f}' for x in w)}" for d, w in rr["mean_router_weights_test"].items())
            + ".\n"
        )
    return s


# the demo's memory (the acceptance check of the defaults), then earlier memories: their gates read the two
# distributions alone (before gate.centroids)
OOD_LMEVAL = (
    (
        "ood_lmeval",
        "Every default, through lm-eval (the acceptance check of the defaults; the demo recipe: 1 block, pruned head, int8, "
        "the gate reading the novelty of the memory's input)",
    ),
    (
        "ood_lmeval_v1",
        "The same memory (1 block, pruned head, int8) with the gate of before, which reads the two distributions alone",
    ),
    ("ood_lmeval_v", "And 4 blocks, pruned head, int8, the gate of before (`train.head_vocab=corpus eval.memory_dtype=int8`)"),
)


def gate_select() -> str:
    """Section 7: the gate's settings chosen on valid text (bench/bench_gate_select.py)."""
    r = load("gate_select")
    if not r:
        return "\n" + missing("python bench/bench_gate_select.py")
    s = (
        "\nThe gate's settings, chosen on valid text only (documents scored as lm-eval scores them):\n\n```\n"
        + (command_of(r) or "")
        + "\n```\n\n"
    )
    s += when("gate_select")
    pct = lambda x: f"{100 * x:+.2f}%"  # noqa: E731
    held = "share_of_fixed_gain_held_out_valid"
    rows = [
        [
            "fixed lambda " + f"{r['lambda_fixed']:.3f}",
            *("-" * 4),
            *(pct(r["fixed"][k]) for k in ("gcide_valid", "python_valid")),
            "100%" if "fixed_held_out_valid" in r else "-",
            pct(r["fixed"]["sotu_valid"]) + " (100%)",
            pct(r["fixed"]["lm_samples_next_seed"]),
        ]
    ]
    for name, c in r["candidates"].items():
        ch = c["change"]
        rows.append(
            [
                ("**gate**" if name == r["chosen"] else "gate"),
                f"{c['generic_tokens']:,}",
                f"{c['generic_weight']:g}",
                f"{c['centroids']} centres" if c["centroids"] else "no",
                f"{c.get('floor', 0):g}",
                pct(ch["gcide_valid"]),
                pct(ch["python_valid"]),
                f"{100 * c[held]:.0f}%" if held in c else "-",
                f"{pct(ch['sotu_valid'])} ({100 * c['share_of_fixed_gain_sotu_valid']:.0f}%)",
                pct(ch["lm_samples_next_seed"]),
            ]
        )
    s += table(
        [
            "mixing",
            "LM-sample tokens",
            "their weight",
            "novelty",
            "floor",
            "GCIDE valid",
            "Python valid",
            "held-out valid halves: share of the fixed gain",
            "SOTU valid (share of the fixed gain)",
            "LM samples, next seed",
        ],
        rows,
    )
    s += (
        f"\nChange in bits per byte against the LM alone, {r['documents']['gcide_valid']} GCIDE, {r['documents']['python_valid']} Python "
        f"and {r['documents']['sotu_valid']} SOTU documents of 150 words ({', '.join(r['python_valid_modules'])}: standard-library "
        f"modules other than the test ones). Rule, fixed before any candidate was scored: {r['rule']}; chosen in bold; "
        "`mlpmem.gate.GateConfig`'s defaults follow it. SOTU valid is the gates' own training text; the held-out share "
        "comes from gates (and a fixed lambda) fitted on one half of the run's valid split and judged on the other.\n"
    )
    demo = load("demo")
    if demo and "mlp_memory_gated" in demo.get("vs_base", {}):
        g, f = demo["vs_base"]["mlp_memory_gated"]["change"], demo["vs_base"]["mlp_memory"]["change"]
        s += (
            f"On the SOTU test split (`demo.json`, the demo's own gate, windows of 512 / 256) the gate keeps {100 * g / f:.0f}% of "
            f"the fixed lambda's gain ({100 * g:+.2f}% against {100 * f:+.2f}%), measured after the choice.\n"
        )
    return s


def ood_lmeval() -> str:
    if not load("ood_lmeval"):
        return "\n" + missing("python bench/bench_ood_lmeval.py")
    return "".join(ood_lmeval_one(name, title) for name, title in OOD_LMEVAL if load(name))


def ood_lmeval_one(name: str, title: str) -> str:
    o = load(name)
    s = f"\n{title}:\n\n```\n" + (command_of(o) or "") + "\n```\n\n"
    s += when(name)
    rows = [
        [
            kind,
            r["documents"],
            f"{r['bytes']:,}",
            f"{r['bits_per_byte']['base']:.4f}",
            f"{r['bits_per_byte']['memory_defaults']:.4f}",
            interval_text(r["memory_vs_base"]),
        ]
        for kind, r in o["kinds"].items()
    ]
    s += table(["text", "documents", "bytes", "LM alone (bits/byte)", "LM + memory, every default", "change [95% paired interval]"], rows)
    s += (
        f"\n`--model mlpmem --model_args memory={o['run']}/train/memory` and nothing else: {o['mixing_by_default']}; the LM alone is "
        "the same backend with `lambda_=0`. lm-eval's `loglikelihood_rolling` per document; interval: paired bootstrap over documents. "
        "`sotu_test` is the memory's own domain (held-out speeches), for contrast.\n\n"
    )
    return s


def knowledge() -> str:
    r = load("knowledge")
    s = "## 9. Knowledge tasks against RAG\n\n"
    if not r:
        return s + missing("python bench/bench_knowledge.py")
    s += when("knowledge")
    markdown = bench_markdown("bench_knowledge")
    return s + markdown(r) + "".join(f"- {note}\n" for note in r.get("notes", [])) + "\n"


def joint() -> str:
    """Section 3b: joint fine-tuning (bench/bench_joint.py)."""
    r, s = section("### 3b. Joint fine-tuning: the memory in the loop", "joint", "python bench/bench_joint.py")
    if not r:
        return s
    b = r["budget"]
    s += (
        f"{r['what']}. Budget for every fine-tune: the first {b['train_tokens']:,} training tokens, {b['epochs']:g} epoch, chunks of "
        f"{b['chunk']}, batch {b['batch_size']}, lr {b['lr']['lora']:g} (LoRA r={b['lora']['r']}) / {b['lr']['full']:g} (full); "
        f"scored on {b['eval_tokens']['test']:,} test tokens per text (windows {r['scoring']['context']}/{r['scoring']['stride']}). "
        "Change of test perplexity against the base LM; the third text is the generic licence text of bench_mixing.py.\n\n"
    )
    for name, d in r["directions"].items():
        rows = [
            [
                k,
                f"{v['in_domain']:.2f} ({100 * v['in_domain_vs_base']:+.1f}%)",
                f"{v['other_corpus']:.2f} ({100 * v['other_corpus_vs_base']:+.1f}%)",
                f"{v['generic']:.2f} ({100 * v['generic_vs_base']:+.1f}%)",
                f"{v['lambda']:.3f}" if "lambda" in v else "-",
            ]
            for k, v in d["rows"].items()
        ]
        s += f"Memory trained on {name.upper()} ({d['memory']}; fixed lambda {d['lambda_fixed']:.3f}, {d['lambda_fixed_source']}):\n\n"
        s += table(["system", "in-domain", "other corpus", "licence text", "lambda"], rows) + "\n"
    if r.get("missing_rows"):
        s += f"Not run (time): {', '.join(r['missing_rows'])}.\n\n"
    s += img("joint", "joint fine-tuning")
    return s + "".join(f"- {n}\n" for n in r.get("notes", [])) + "\n"


def multi_memory() -> str:
    """Section 7b: several memories in the model class (bench/bench_multi_memory.py)."""
    r, s = section("### 7b. Two memories on one LM, in the model class", "multi_memory", "python bench/bench_multi_memory.py")
    if not r:
        return s
    s += (
        f"{r['what']}. {r['n_tokens_per_split_and_domain']:,} tokens per split and domain; router: {r['router_params']} parameters, "
        f"fitted on both valid splits; every fixed system reproduces mixing_router.json's scoring path within {100 * r['tolerance']:.1f}% "
        f"({'all within' if r['all_within_tolerance'] else 'NOT all within'}).\n\n"
    )
    rows = [[k, f"{v['sotu']:.3f}", f"{v['gcide']:.3f}", f"{v['mixed']:.3f}"] for k, v in r["ppl"].items()]
    s += table(["system", "SOTU test", "GCIDE test", "mixed stream"], rows) + "\n"
    t = r["timing"]
    s += (
        "Forward time (median of 5, 4 x 512 tokens): "
        + ", ".join(f"{k} {v['median_s']:.2f} s" for k, v in t.items())
        + f". The router is {100 * r['router_share_of_forward']:.1f}% of the two-memory forward, the gate "
        f"{100 * r['gate_share_of_forward']:.1f}% of the one-memory forward.\n\n"
    )
    return s + "".join(f"- {n}\n" for n in r.get("notes", [])) + "\n"


def retrieval() -> str:
    """Section 11: kNN-LM as a model component (bench/bench_retrieval.py)."""
    r, s = section("## 11. kNN-LM as a component of the model class", "retrieval", "python bench/bench_retrieval.py")
    if not r:
        return s
    k = r["knn"]
    s += (
        f"{r['what']}. Run {r['run']}: {r['n_tokens']:,} test tokens, k={k['k']}, T={k['temperature']:g}, lambda={k['lambda']:.3f} "
        f"({k['index_kind']} index over {k['n_datastore']:,} keys), {r['threads']} threads, load {r['load_average_before']} before.\n\n"
    )
    tp = r["tokens_per_s"]
    rows = [
        [
            m,
            f"{r['ppl']['component'][m]:.6f}",
            f"{r['ppl']['report'][m]:.6f}" if r["ppl"]["report"] else "-",  # a --quick run has no report to compare with
            f"{r['gap_component_vs_report'][m]['rel']:+.1e}" if r["gap_component_vs_report"] else "-",
            f"{tp['component'][m]:.0f} ({tp['component'][m] / tp['component']['base']:.2f}x)",
            f"{tp['evaluator'][m] / tp['evaluator']['base']:.2f}x",
        ]
        for m in r["ppl"]["component"]
    ]
    s += (
        table(
            ["method", "ppl (component)", "ppl (report.json)", "rel. gap", "tokens/s (component, vs LM)", "evaluator's speed vs LM"], rows
        )
        + "\n"
    )
    s += (
        "The component builds full [n, V] log-prob rows (what generation needs); the evaluator gathers only the targets' "
        "log-probs and shares one LM forward, so its ratios are higher.\n\n"
    )
    return s


def stores() -> str:
    r = load("store")
    if not r:
        return "## 8. Stores: bytes per token, recall target, compressed codes\n\n" + missing("nice python bench/bench_store.py")
    markdown = bench_markdown("bench_store")
    head, _, rest = markdown(r, load("recall_target")).partition("```\n\n")  # the measured line goes under the commands
    return head + "```\n\n" + when("store", "recall_target") + rest + "\n" + smallest_store() + STORE_NOTES + "\n" + one_million()


def one_million() -> str:
    """A corpus of 1M training tokens end to end with the smallest store (bench/recipes/sotu1m.yaml), beside the same store at 200k."""
    cmd = "mlpmem run bench/recipes/sotu1m.yaml && python bench/summarize_run.py runs/sotu1m"
    s = f"### 8b. A corpus of 1M training tokens end to end\n\n```\n{cmd}\n```\n\n"
    big, small = load("sotu1m"), load("sotu200k_codes")
    if not big:
        return s + missing(cmd)
    s += when("sotu1m")
    ppl = big["ppl"]
    names = {
        "base": "LM alone",
        "knn_lm": "LM + kNN-LM",
        "mlp_memory": "LM + memory",
        "knn_lm+mlp_memory": "LM + both",
        "memory_alone": "memory alone",
    }
    s += (
        f"State of the Union, {big['n_train_tokens']:,} training tokens (one key per position), "
        f"{big['n_test_tokens']:,} test tokens; {big['model']}; the smallest store of the 200k run above "
        f"({big['index']['factory']} codes only, nprobe {big['index']['nprobe']}, recall@1024 {big['index']['recall_at_k']:.2f}; keys deleted; "
        f"online training, {big['train']['epochs']:.2f} epochs in {big['train']['steps']} steps).\n\n"
    )
    s += (
        table(
            ["system", "test ppl", "vs LM alone", "lambda"],
            [
                [
                    names[key],
                    f"{v:.3f}",
                    f"{100 * (v / ppl['base'] - 1):+.2f}%" if key != "base" else "",
                    {"knn_lm": f"{big['lambda']['knn_lm']:.3f}", "mlp_memory": f"{big['lambda']['mlp_memory']:.3f}"}.get(key, ""),
                ]
                for key, v in ppl.items()
            ],
        )
        + "\n"
    )
    kept = lambda r: r["kept_bytes_per_token"]  # noqa: E731
    rows = [
        [
            name,
            f"{r['n_train_tokens']:,}",
            f"{kept(r)['index']:.1f}",
            f"{kept(r)['values']:.1f}",
            f"{kept(r)['targets_ids'] + kept(r)['targets_probs']:.1f}",
            f"**{kept(r)['total']:.1f}**",
        ]
        for name, r in (("sotu200k_codes", small), ("sotu1m", big))
        if r
    ]
    s += (
        "Kept on disk after the run, bytes per training token:\n\n"
        + table(["run", "training tokens", "index", "values", "kNN targets", "total"], rows)
        + "\n"
    )
    secs = big["stage_seconds"]
    s += (
        "Time per stage on the 2 shared cores (from each stage's own records, since the run was made in pieces over sessions: rows over the "
        "recorded rate; training counts its steps, not its validation passes; evaluation is the last piece's wall time):\n\n"
        + table(
            ["stage", "minutes"],
            [[k, f"{v / 60:.1f}"] for k, v in secs.items()]
            + [["evaluation", f"{big['seconds_this_run'].get('evaluation: lambda on valid, then the test split', 0) / 60:.1f}"]],
        )
        + "\n"
    )
    return s + "".join(f"- {n}\n" for n in ONE_MILLION_NOTES) + "\n"


# what the 1M table says, written when it was measured
ONE_MILLION_NOTES: list[str] = [
    "Against the same store at 200k training tokens (section 8, the same 20,000 test tokens: the LM alone scores 23.180 in both), "
    "five times the text takes kNN-LM from 22.295 to 21.101 and LM + memory from 21.410 to 19.558. At 1M the memory is 7.3% "
    "below kNN-LM, against 4.0% at 200k, and the memory alone (20.440, no LM) is below LM + kNN-LM; the fitted lambdas grew "
    "with the store (kNN-LM 0.128 -> 0.194, memory 0.427 -> 0.645). The 1M memory trained one epoch (977 steps), the 200k one "
    "two (391 steps).",
    "The size goal (at most 600 B per token) is met at 1M keys: 598.1 B, as estimated from the 200k store's parts. The IVF "
    "centroids are spread over five times the keys (index 98.6 -> 82.1 B); the kNN targets, 512 B, are most of it.",
    "Recall from the codes alone: 0.727 at nprobe 72 (the best of the probe, 0.735 at nprobe 288, was within 0.01); kNN-LM "
    "still gains 9%. Scoring speed (windows of 512, stride 256): LM + memory 178 tokens/s, LM + kNN-LM 172, LM alone 208.",
    "Time: online training is 136 of the 207 stage minutes (122 positions/s: it runs the LM again over every batch's windows), "
    "extraction in cache mode 43 (385 tokens/s in its last piece). `mlpmem plan` had put the kNN targets at 11.5 min against "
    "the 19.4 measured (0.59; real keys scan slower than the calibration's random ones). No GPU was lent to this work.",
]


def smallest_store() -> str:
    """The 200k SOTU run as first measured (Flat, offline training) beside the smallest store the library makes, end to end."""
    old, new = load("sotu200k"), load("sotu200k_codes")
    if not (old and new):
        return "The smallest store end to end: " + missing(
            "mlpmem run bench/recipes/sotu200k_codes.yaml && python bench/summarize_run.py runs/sotu200k_codes"
        )

    def kept(r: dict) -> dict:  # older summaries have no kept_bytes_per_token: every file was kept
        k = r.get("kept_bytes_per_token") or {**r["bytes_per_token"], "total": sum(r["bytes_per_token"].values())}
        feats = sum(v for name, v in k.items() if name.startswith("h") and "." in name)
        return {
            "index": k["index"],
            "keys": k.get("keys", 0.0),
            "feats": feats,
            "values": k["values"],
            "targets": k["targets_ids"] + k["targets_probs"],
            "total": k["total"],
        }

    rows = []
    for name, r, store in (
        ("sotu200k", old, "Flat copy + keys, offline training (second feature array), recompute mode, int32 target ids"),
        (
            "sotu200k_codes",
            new,
            f"{new['index']['factory']} codes only (nprobe {new['index']['nprobe']}), keys deleted, online training, cache mode, uint16 target ids",
        ),
    ):
        k, p = kept(r), r["ppl"]
        rows.append(
            [
                name,
                store,
                f"{k['index']:.0f}",
                f"{k['keys']:.0f}",
                f"{k['feats']:.0f}",
                f"{k['values']:.0f}",
                f"{k['targets']:.0f}",
                f"**{k['total']:.0f}**",
                f"{p['base']:.3f}",
                f"{p['knn_lm']:.3f}",
                f"{p['mlp_memory']:.3f}",
                f"{p['knn_lm+mlp_memory']:.3f}",
            ]
        )
    rel = lambda key: 100 * (new["ppl"][key] / old["ppl"][key] - 1)  # noqa: E731
    return (
        "The smallest store end to end, on the SOTU 200k run (200,000 training tokens, 20,000 test tokens; "
        "`mlpmem run bench/recipes/sotu200k.yaml` then `bench/recipes/sotu200k_codes.yaml`, each summarised by "
        "`python bench/summarize_run.py RUN`): bytes per training token of what each run keeps on disk after it finished, "
        "and test perplexity.\n\n"
        + when("sotu200k", "sotu200k_codes")
        + table(
            [
                "run",
                "store",
                "index",
                "keys",
                "second feature array",
                "values",
                "kNN targets",
                "kept, B/token",
                "LM",
                "LM + kNN-LM",
                "LM + memory",
                "LM + both",
            ],
            rows,
        )
        + f"\nAgainst the first run: kNN-LM {rel('knn_lm'):+.2f}%, memory {rel('mlp_memory'):+.2f}%, both {rel('knn_lm+mlp_memory'):+.2f}% "
        f"(LM alone {rel('base'):+.2f}%: the same test tokens). Kept: {kept(old)['total'] / kept(new)['total']:.1f}x less.\n\n"
        + SMALLEST_NOTES.format(
            recall=new["index"]["recall_at_k"], online=new["train"]["tokens_per_s"], offline=old["train"]["tokens_per_s"]
        )
    )


# what the smallest-store table says (sotu200k_codes.json; the build's own report with its stage times is
# bench/results/sotu200k_codes_build_report.json: the summary's report.json is from a rerun that deleted the keys)
SMALLEST_NOTES = """- The goal (at most 600 B per token, memory perplexity within 1% of today's): the perplexity holds (+0.48%), the size misses at 200k keys by 15 B (2.5%). The kNN targets are 512 of the 615 B (top 128 ids as uint16 + float16 probabilities); the index is 99 B, of which 72 B are the codes and FAISS's 8-byte ids and 24 B the 2048 IVF centroids in float32, which do not grow with N. At 1M keys (4096 lists) the centroids come to 9 B per token and the total to 598.1 B, measured by bench/recipes/sotu1m.yaml (section 8b). The two runs differ in four settings at once (index, training mode, extraction mode, id type), so the table compares the configurations as wholes; the first run was made by an earlier revision on the same corpus split (the LM alone scores the same).
- Recall. Distances from the codes alone cap recall@1024 against exact search at {recall:.2f} here (nprobe 336 of 2048 lists: the recall target of 0.9 cannot be reached without re-ranking, and the index records what it got). kNN-LM perplexity moved by only +0.15%, and the memory, trained on these targets, by +0.48%. The index tried nprobe 84, 168 and 336 for recall 0.763, 0.771 and 0.772 at 1.0, 1.6 and 2.6 ms per query; since this run, an out-of-reach target settles on the smallest nprobe within 0.01 of the best recall (`index.SHORT_OF_BEST`), 84 on this curve, which would have made the targets' search about 2.6x faster (not rerun).
- Cost. Online training recomputes the LM's hidden states at every step: {online:.0f} training tokens/s here against {offline:.0f} offline in the first run (each measured beside other jobs on the 2 shared cores, so the ratio is rough). It buys 1152 B per token of disk. The whole run took 80 min (extraction 12 min in cache mode, index 1 min, targets 9 min, training 52 min, evaluation 4 min) beside the 3M-key recall bench.
- The keys are deleted by the run itself (`index: {{keep_keys: false}}`) once the memory is trained; rerunning the recipe afterwards finds every stage done and gives the same perplexities to the last digit (the codes-only search never reads them).

"""


# what the store tables above say, written when they were measured (bench/results/store.json, recall_target.json)
STORE_NOTES = """Reading the tables:

- Size. The codes-only IVF-PQ store reads 125 B per token at search, 18x less than Flat (2308 B) and 9x less than exact search over the float16 keys (1156 B, with no copy at all: the `keys` kind). 49 of its 121 index bytes are the IVF centroids and PQ codebooks spread over only 60k keys; at 1M keys the index would be about 82 B (64 B codes, 8 B ids, ~10 B). The targets now store their ids as uint16 when the vocabulary fits (V = 49,152 < 65,536; `targets.id_dtype`, since commit f12abc6): 512 B per token instead of the 768 B in this table (runs/sotu's targets were built before), so codes + values + targets come to 641 B per token at 60k keys; measured end to end at 200k keys, 615 B (the table after this list).
- Quality. Every store is within 0.025 perplexity (0.09%) of exact kNN-LM on this run; the codes alone (recall@1024 0.82) cost +0.006. The SPEC's 1.3-point penalty for PQ distances does not show at 60k keys with lambda 0.07: a small datastore and a small kNN weight make this a weak test of it, so re-ranking stays the default wherever keys exist.
- Recall target. The auto index held recall@1024 0.90 on its build probe from 200k to 3M keys with nprobe 58-78 (6k to 29k vectors scanned per query); on 200 other queries it measured 0.885-0.909 (sampling noise of a 200-query probe is about +-0.02). The fixed 16k-vector scan it replaces gave 0.99 at 200k but 0.84 at 3M (section 2). Search took about 13 ms per query from 200k to 1M; the 3M row (37 ms, 46 min to build) ran while two other jobs kept both cores busy (load average about 4), so its time is not comparable with the others: it scans 1.75x the vectors of 1M, and its 3.5 GB of float16 keys are past the 2 GiB that re-ranking reads into memory, so re-ranking gathers them from the memory map.
- Not measured: `ivfopq` (OPQ training ran over 10 minutes on one thread of the loaded machine and was stopped), the `mlpmemory` preset (IVF4096 needs 160k training keys; this datastore has 60k), any GPU. These benches run FAISS on one thread: on this loaded 2-core machine FAISS's OpenMP loops ran 10-40x slower on two (training IVF64,PQ8x4 on 12k keys: 0.16 s on one thread, 6.1 s on two).
"""


def distributed() -> str:
    r, p = load("dist"), load("plan")
    s = "## 10. Several processes, and the plan before a run\n\n```\npython bench/bench_dist.py\n```\n\n"
    if not r:
        s += missing("python bench/bench_dist.py")
    else:
        s += when("dist")
        a = r["artefacts"]
        s += table(
            [
                "stage",
                "1 process (s)",
                f"{len(r['seconds']['datastore']) and list(r['seconds']['datastore'])[-1]} processes (s)",
                "speed-up",
            ],
            [[st, v["1"], list(v.values())[-1], r["speedup"][st]] for st, v in r["seconds"].items()],
        )
        s += (
            f"\n{r['what']}, {r['train_tokens']:,} training tokens, k={r['k']}, {r['model']}; wall seconds of each whole command "
            "(model loading included). "
            + r.get("conditions", "")
            + " Artefacts of the N-process runs against the 1-process ones: datastore files "
            f"{'byte-identical' if a['datastore_files_identical'] else 'not byte-identical'} (values equal: {a['datastore_values_equal']}, "
            f"keys max |diff| {a['datastore_keys_max_abs_diff']:.3g}), "
            f"kNN target ids equal for {100 * a['targets_ids_equal_share']:.2f}% of entries (probabilities max |diff| {a['targets_probs_max_abs_diff']:.3g}), "
            f"memory weights max |diff| {a['memory_weights_max_abs_diff']:.3g}, knnlm perplexities "
            + ", ".join(f"{m} {a['knnlm_ppl']['1'][m]:.4f} vs {list(a['knnlm_ppl'].values())[-1][m]:.4f}" for m in a["knnlm_ppl"]["1"])
            + ".\n\n"
        )
    s += "```\nmlpmem run sotu --out RUN && python bench/bench_plan.py --run RUN\n```\n\n"
    if not p:
        return s + missing("python bench/bench_plan.py --run RUN")
    s += when("plan")
    s += table(
        ["stage", "plan (s)", "real (s)", "plan / real", "plan disk", "real disk", "plan / real"],
        [
            [
                x["stage"],
                round(x["plan_seconds"]),
                round(x["real_seconds"]) if x["real_seconds"] else "-",
                f"{x['seconds_ratio']:.2f}" if x["seconds_ratio"] else "-",
                x["plan_disk_bytes"],
                x["real_disk_bytes"] or "-",
                f"{x['disk_ratio']:.2f}" if x["disk_ratio"] else "-",
            ]
            for x in p["stages"]
        ],
    )
    tp = p["throughputs"]
    s += (
        f"\n`mlpmem plan` for the sotu recipe ({p['tokens']['train']:,} training tokens), calibrated in {tp['seconds']:.0f} s on this machine "
        f"(extraction {tp['extract_rows_s']:.0f} rows/s, scoring {tp['score_rows_s']:.0f} rows/s, search {tp['search_qps']:.0f} q/s over "
        f"{tp['search_rows']:,} keys, training {tp['train_positions_s']:.0f} positions/s), against a run of the same recipe "
        "(`mlpmem run sotu`, the run folder given to bench_plan.py) made just before on the same, otherwise idle, machine: its own stage times "
        "and folder sizes. Every stage that takes more than a few seconds is within 15% (the goal was 25%); corpus and index take "
        "1-3 s and are not modelled. Calibrated against a run made under other load, the ratios follow the load instead.\n"
    )
    return s


def main() -> None:
    global SUFFIX
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="read the smoke runs' *_quick.json (needs --out)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    a = p.parse_args()
    if a.quick and a.out.resolve() == (ROOT / "BENCHMARKS.md").resolve():
        sys.exit("--quick renders smoke-run numbers: write them elsewhere (--out)")
    SUFFIX = "_quick" if a.quick else ""
    head = (
        "# Benchmarks\n\nGenerated by `python bench/make_benchmarks.py` from the JSON in `bench/results/`; each section names "
        "the command that measured it. Machine: 2 shared CPU cores, 24 GB, no GPU. Absolute speeds are low and noisy "
        "(several benchmarks shared the cores); compare the ratios, which are measured side by side in one process.\n\n"
        f"Model: {model_label(DEFAULT_MODEL)}, called SmolLM2-135M below, unless a section names another. "
        "Scoring speeds use windows of 512 tokens with stride 256, so the LM body runs twice per scored token, "
        "and the extra cost of the memory or of kNN-LM relative to the LM alone is about half of what a single pass (KV cache) would show.\n\n"
    )
    parts = [quality(), scaling()]
    parts += [finetune(), joint(), memory_size(), decoder(), decode_speed(), pipeline(), mixing(), multi_memory()]
    parts.append(stores())
    parts.append(knowledge())
    parts.append(distributed())
    parts.append(retrieval())
    parts.append(
        "## Not measured here\n\n"
        "- GPU runs (no GPU on this machine; FAISS on GPUs, CUDA extraction and training, nccl and bench/gpu_check.sh are written and run on the CPU, not measured on a GPU).\n"
        "- Datastores of 10M keys: the largest measured is in section 2; the 10M figures there are extrapolations from the fitted curves shown.\n"
        "- Gemma-3-270M + kNN-LM (needs a Gemma datastore), Gemma in bf16 (only the Q4_K_M file is available offline).\n"
        "- Fine-tuning on the whole 60k-token split, several seeds, learning-rate searches; memory epochs beyond 3.\n"
        "- Memory quality against epochs at 200k tokens (section 4 has it at 60k)"
        + (
            ""
            if load("sotu1m")
            else "; a corpus of 1M training tokens end to end (bench/recipes/sotu1m.yaml, under way: one epoch of online training alone takes about 2 h at the rate in section 8)"
        )
        + ".\n"
        "- A router over memory + kNN-LM on real data; generation and lm-eval throughput through the several-memory class.\n"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(head + "\n".join(parts))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
