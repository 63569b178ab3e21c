"""Cost per token as the datastore grows: LM alone, LM + kNN-LM, LM + memory (not a test).

    python bench/bench_scaling.py [--sizes 1e4,3e4,1e5,3e5,1e6,3e6] [--tokens 2048] [--repeats 3] [--quick]

For each datastore size the library's own scoring pass (``evaluate.score_online``)
runs SmolLM2-135M over the same test tokens with a real FAISS index (``auto``, what
a user gets: exact Flat up to 200k keys, IVF + SQ8 + exact re-rank above; and
``flat`` up to ``--flat-max``) searched for k=1024 neighbours per token, and the
memory applied to every token. Each method's seconds come from the same pass, so
the ratios are side by side; medians over ``--repeats`` passes.

Keys: the first N real keys of ``--real`` (a SmolLM2 datastore, 200k keys) when
N fits; above that, real keys again plus Gaussian jitter of about a
nearest-neighbour distance, so the index sees keys shaped like the model's
(clusters, scale) while N grows past the corpus. The memory's cost does not
depend on N (it has no datastore): that is the claim under test.

Sizes already measured in the output JSON are kept (resume); ``--force`` remeasures.
Writes bench/results/scaling.json and scaling.png; ``--quick`` writes *_quick.*.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_search import write_datastore  # noqa: E402
from provenance import results_dir, start, write_result  # noqa: E402

from mlpmem.evaluate import score_online  # noqa: E402
from mlpmem.index import IndexConfig, KnnIndex, build_index  # noqa: E402
from mlpmem.models import load_model  # noqa: E402
from mlpmem.modeling.read_site import ReadSite
from mlpmem.datastore import Datastore  # noqa: E402


def test_tokens(corpus_dir: Path, n: int, tok) -> np.ndarray:
    if (corpus_dir / "tokens.test.npy").exists():
        from mlpmem.corpus import Corpus

        return np.asarray(Corpus(corpus_dir).tokens("test")[: n + 1])
    from mlpmem.corpus import CorpusConfig, load_documents

    text = "\n\n".join(d.text for d in load_documents(CorpusConfig())[-20:])
    return np.asarray(tok(text)["input_ids"][: n + 1], dtype=np.int32)


def jittered_datastore(folder: Path, n: int, real: np.ndarray, sigma: float) -> Path:
    def make_keys(start, m, rng):
        rows = np.arange(start, start + m) % len(real)
        keys = real[rows].astype(np.float32)
        if start + m > len(real):  # the first pass over the real keys stays exact
            extra = np.arange(start, start + m) >= len(real)
            keys[extra] += sigma * rng.normal(size=(int(extra.sum()), real.shape[1])).astype(np.float32)
        return keys.astype(np.float16)

    return write_datastore(
        folder, n, real.shape[1], make_keys, {"keys": "real SmolLM2 keys, jittered beyond the first pass", "sigma": sigma}
    )


def measure(model, tokens, key_site, mem, mem_site, index, values, k, repeats, batch_size) -> dict:
    runs = []
    for _ in range(repeats):
        sc = score_online(
            model,
            tokens,
            512,
            256,
            key_site,
            index=index,
            train_values=values,
            k=k,
            memory=mem,
            memory_site=mem_site,
            batch_size=batch_size,
            desc=f"N={index.n_rows}",
        )
        runs.append(sc.seconds)
    n = len(tokens) - 1
    med = {m: statistics.median(r[m] for r in runs) for m in ("lm", "knn", "memory")}
    # per-run ratios, then the median: each ratio is measured inside one pass
    ratio = statistics.median((r["lm"] + r["knn"]) / (r["lm"] + r["memory"]) for r in runs)
    return {
        "ms_per_token": {"lm": 1e3 * med["lm"] / n, "knn_search": 1e3 * med["knn"] / n, "memory": 1e3 * med["memory"] / n},
        "tokens_per_s": {"lm": n / med["lm"], "lm+knn": n / (med["lm"] + med["knn"]), "lm+memory": n / (med["lm"] + med["memory"])},
        "speed_memory_over_knn": ratio,
        "repeats": runs,
    }


def cost(r: dict, what: str) -> float:
    """Time per token of ``what`` over the LM forward's, both from the same pass: the machine's load drifted
    between sizes (the LM alone ran 30 to 115 tokens/s), a ratio inside one pass does not."""
    return r["ms_per_token"][what] / r["ms_per_token"]["lm"]


def add_fits(res: dict, target: int = 10_000_000) -> None:
    """Fit the search's relative cost against N and extrapolate to ``target`` keys (auto below 200k rows is Flat:
    the Flat curve takes those points too)."""
    rows = res["sizes"]
    mem = statistics.median(cost(r, "memory") for r in rows)
    res["fits"] = {}
    for kind, form, pick in (("flat", "linear", lambda r: r["factory"] == "Flat"), ("auto", "sqrt", lambda r: r["factory"] != "Flat")):
        pts = [(r["n"], cost(r, "knn_search")) for r in rows if pick(r)]
        if len(pts) >= 2:
            a, b = fit(pts, form)
            g = target if form == "linear" else np.sqrt(target)
            res["fits"][kind] = {
                "form": form,
                "a": a,
                "b": b,
                "points": pts,
                "extrapolate_to": target,
                "units": "x LM forward time",
                "extrapolated_search_cost": a + b * g,
                "extrapolated_speed_memory_over_knn": (1 + a + b * g) / (1 + mem),
            }


def fit(points: list[tuple[int, float]], form: str) -> tuple[float, float]:
    """Least squares for ms = a + b * f(N), f = N (Flat scans every key) or sqrt(N) (auto's IVF quantizer)."""
    n = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points])
    f = n if form == "linear" else np.sqrt(n)
    a, b = np.linalg.lstsq(np.stack([np.ones_like(f), f], 1), y, rcond=None)[0]
    return float(a), float(b)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    # relative to the LM timed in the same pass: the machine's load drifted between sizes, the ratio does not
    rel = lambda r, m: r["tokens_per_s"][m] / r["tokens_per_s"]["lm"]  # noqa: E731
    rows = sorted(res["sizes"], key=lambda r: r["n"])
    for kind, marker in (("auto", "o"), ("flat", "s")):
        pts = [r for r in rows if r["index"] == kind]
        if not pts:
            continue
        xs = [r["n"] for r in pts]
        ax1.plot(xs, [rel(r, "lm+knn") for r in pts], marker=marker, label=f"LM + kNN-LM ({kind} index)")
        ax2.plot(xs, [cost(r, "knn_search") for r in pts], marker=marker, label=f"kNN search ({kind} index)")
    for kind, f in res["fits"].items():
        if f:
            grid = np.logspace(np.log10(min(q[0] for q in f["points"])), np.log10(f["extrapolate_to"]), 50)
            g = grid if f["form"] == "linear" else np.sqrt(grid)
            ax2.plot(grid, f["a"] + f["b"] * g, ls=":", label=f"fit a + b·{'N' if f['form'] == 'linear' else '√N'} ({kind})")
    rows = [r for r in rows if r["index"] == "auto"]  # one LM and memory timing per size
    xs = [r["n"] for r in rows]
    ax1.plot(xs, [rel(r, "lm+memory") for r in rows], marker="^", label="LM + MLP memory")
    ax1.axhline(1.0, ls="--", color="gray", label="LM alone")
    ax2.plot(xs, [cost(r, "memory") for r in rows], marker="^", label="MLP memory")
    ax2.axhline(1.0, ls="--", color="gray", label="LM forward")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("datastore size (keys)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    ax1.set_ylabel("throughput relative to the LM alone (same pass)")
    ax2.set_ylabel("time per token relative to the LM forward")
    ax1.set_title(f"Relative throughput vs datastore size (k={res['k']}, {res['threads']} thread(s))")
    ax2.set_title("Where the time goes (dotted: fitted, extrapolated)")
    fig.suptitle(
        f"SmolLM2-135M scoring cost vs datastore size ({res['test_tokens']} test tokens, median of {'/'.join(str(n) for n in sorted({len(r['repeats']) for r in res['sizes']}))} passes)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(path: Path) -> None:
    """Recompute the fits and redraw the figure from a results file (no measuring)."""
    res = json.loads(path.read_text())
    add_fits(res)
    path.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, path.with_suffix(".png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e4,3e4,1e5,3e5,1e6")
    p.add_argument("--flat-max", type=float, default=1e6, help="also time an exact Flat index up to this size")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--real", type=Path, default=Path("runs/sotu200k/datastore"), help="datastore whose real keys seed the synthetic ones")
    p.add_argument("--corpus", type=Path, default=Path("runs/sotu200k/corpus"))
    p.add_argument("--memory", type=Path, default=Path("runs/sotu200k/train/memory"))
    p.add_argument("--work", type=Path, default=Path("runs/bench_scaling"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="two small sizes, 256 tokens, one repeat")
    p.add_argument("--force", action="store_true")
    p.add_argument("--replot", action="store_true", help="only recompute the fits and redraw from the results file")
    args = p.parse_args()
    started = start()
    logging.basicConfig(level=logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.tokens, args.repeats, args.work = "1e4,3e4", 256, 1, args.work.with_name(args.work.name + "_quick")
    out = results_dir() / ("scaling_quick.json" if args.quick else "scaling.json")
    if args.replot:
        return replot(out)
    res = json.loads(out.read_text()) if out.exists() and not args.force else {"sizes": []}
    done = {(r["n"], r["index"]) for r in res["sizes"]}

    model, tok, model_id = load_model()
    tokens = test_tokens(args.corpus, args.tokens, tok)
    if args.memory.exists():
        from mlpmem.memory import load_memory

        mem, meta = load_memory(args.memory)
        mem_site = ReadSite(meta["layer"], meta["site"])
    else:  # timing only: the memory's cost does not depend on its weights
        from mlpmem.memory import MemoryConfig, MLPMemory

        mem, mem_site = MLPMemory(MemoryConfig(d_in=576, vocab_size=49152)).eval(), ReadSite(29, "output")
    if args.real.exists():
        real_ds = Datastore(args.real)
        real, key_site = real_ds.load("keys"), ReadSite(real_ds.layer, real_ds.site)
    else:
        sys.exit(f"{args.real} is missing: run `mlpmem run bench/recipes/sotu200k.yaml` first (its datastore seeds the keys)")
    # jitter of about one nearest-neighbour distance: squared NN distance ~12 for these keys (SPEC), spread over d dims
    sigma = float(np.sqrt(12.0 / real.shape[1]))
    res.update(
        {
            "model": model_id,
            "d": int(real.shape[1]),
            "k": args.k,
            "test_tokens": len(tokens) - 1,
            "batch_windows": args.batch_size,
            "context": 512,
            "stride": 256,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "jitter_sigma": sigma,
            "memory_params": sum(p.numel() for p in mem.parameters()),
            "key_site": [key_site.layer, key_site.site],
            "memory_site": [mem_site.layer, mem_site.site],
        }
    )
    args.work.mkdir(parents=True, exist_ok=True)
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        kinds = ["auto"] + (["flat"] if n <= args.flat_max and n > 200_000 else [])
        if all((n, kind) in done for kind in kinds):
            continue
        ds_dir = args.work / f"ds_{n}"
        shutil.rmtree(ds_dir, ignore_errors=True)
        jittered_datastore(ds_dir, n, real, sigma)
        for kind in kinds:
            if (n, kind) in done:
                continue
            idx_dir = args.work / f"index_{n}_{kind}"
            shutil.rmtree(idx_dir, ignore_errors=True)
            t = time.perf_counter()
            build_index(ds_dir, idx_dir, IndexConfig(kind=kind, recall_k=args.k, recall_sample=200))
            build_s = time.perf_counter() - t
            index = KnnIndex.open(idx_dir)
            values = index.datastore.load("values")
            row = {
                "n": n,
                "index": kind,
                "factory": index.manifest["factory"],
                "nprobe": index.nprobe,
                "recall_at_k": index.manifest.get("recall_at_k"),
                "build_s": build_s,
                **measure(model, tokens, key_site, mem, mem_site, index, values, args.k, args.repeats, args.batch_size),
            }
            print(json.dumps({k: v for k, v in row.items() if k != "repeats"}), flush=True)
            res["sizes"] = [r for r in res["sizes"] if (r["n"], r["index"]) != (n, kind)] + [row]
            write_result(out, res, started, indent=1)  # after every size: an interruption keeps what was measured
            del index
            shutil.rmtree(idx_dir)
        shutil.rmtree(ds_dir)
    rows = res["sizes"]
    add_fits(res)
    largest = max(rows, key=lambda r: (r["n"], r["index"] == "auto"))
    res["largest"] = {"n": largest["n"], "index": largest["index"], "speed_memory_over_knn": largest["speed_memory_over_knn"]}
    write_result(out, res, started, indent=1)
    plot(res, out.with_suffix(".png"))
    print(json.dumps(res["largest"]), json.dumps({k: v["extrapolated_speed_memory_over_knn"] for k, v in res["fits"].items()}))


if __name__ == "__main__":
    main()
