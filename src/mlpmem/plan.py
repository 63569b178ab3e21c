"""`mlpmem plan RECIPE`: what each stage will need (disk, RAM, GPU memory, time) before anything runs.

Sizes follow from the recipe, the model's shape and the corpus size; times from
throughputs measured on this machine by a short calibration (:func:`calibrate`:
a few extraction and scoring batches of the real model, a FAISS search over
random keys (and, for a PQ index, a search of its codes), a few training steps of
the recipe's memory), or supplied as JSON (``--throughputs``, e.g. measured on the
target machine with ``--calibrate-only``).

The time model is deliberately simple and says so: extraction and scoring scale
with rows; a Flat search with the number of keys it scans (all of them), an IVF
search with ``IVF_SCAN`` keys whatever N, at the Flat rate per key, or for a PQ index
at the rate its codes are scanned (on the 1M-token SOTU run the Flat rate planned the
codes-only targets at 0.37 of their real time, the codes rate at 0.59: real keys scan
about 1.3x slower than random ones, and the stage does more than search); training
with epochs x rows, plus an LM pass per row for online training. Nothing is written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpmem.errors import MlpmemError
from mlpmem.index import auto_nlist, pq_size
from mlpmem.files import human_bytes
from mlpmem.memory import resolve_memory_input
from mlpmem.targets import id_dtype

log = logging.getLogger(__name__)

PQ_KINDS = ("ivfpq", "ivfopq", "mlpmemory")  # index kinds that search PQ codes
IVF_SCAN = 20_000  # keys an IVF query scans plus its exact re-rank, roughly constant in N (see index.IndexConfig)
SOTU_TRAIN_TOKENS = 1_700_000  # builtin:sotu's train split with no cap (about 2.1M tokens, 80%), SmolLM2 tokens
CALIBRATE_TOKENS = 65_536  # the calibration times at most this many tokens per forward call (a GPU batch, datastore.batch_tokens)
CALIBRATE_POSITIONS = 8192  # and training steps of at most this many positions


@dataclass
class Throughputs:
    extract_rows_s: float  # datastore rows per second (train split: hooks only, early stop)
    score_rows_s: float  # rows per second of a scored split (full forward with log-probs)
    search_qps: float  # queries per second of a Flat search over `search_rows` keys at k
    search_rows: int
    train_positions_s: float  # memory training positions per second
    device: str = "cpu"
    pq_codes_s: float | None = None  # PQ codes an IVF-PQ search scans per second (measured for recipes with a PQ index)
    seconds: float = 0.0  # what the calibration cost

    def problems(self) -> list[str]:
        from mlpmem.typed_config import positive

        return (
            positive(self, "extract_rows_s", "score_rows_s", "search_qps", "search_rows", "train_positions_s")
            + positive(self, "pq_codes_s", allow_none=True)
            + positive(self, "seconds", zero=True)
        )


@dataclass
class StageNeed:
    stage: str  # named as the pipeline's report names them (report.json seconds_this_run)
    seconds: float
    disk_bytes: int
    ram_bytes: int
    gpu_bytes: int = 0


def split_tokens(recipe, train_tokens: int | None = None) -> dict[str, int]:
    """Tokens per split: the recipe's caps, an already-built corpus's manifest, or ``train_tokens``."""
    from mlpmem.files import read_json

    c = recipe.sections["corpus"]
    if train_tokens is not None and (isinstance(train_tokens, bool) or not isinstance(train_tokens, int) or train_tokens < 2):
        raise MlpmemError(
            f"--train-tokens must be a whole number of tokens of at least 2, got {train_tokens!r}",
            "pass the train split's size, e.g. --train-tokens 2000000",
        )
    built = Path(recipe.out) / "corpus" / "manifest.json"
    if built.exists():
        splits = read_json(built)["splits"]
        tokens = {s: int(splits[s]["n_tokens"]) for s in ("train", "valid", "test")}
        if train_tokens is not None and train_tokens != tokens["train"]:
            raise MlpmemError(
                f"--train-tokens {train_tokens} contradicts the corpus already built in {built.parent} ({tokens['train']} train tokens)",
                "drop --train-tokens: the plan reads the built corpus",
            )
        return tokens
    if train_tokens is not None and c.train_tokens is not None and train_tokens > c.train_tokens:
        raise MlpmemError(
            f"--train-tokens {train_tokens} is more than the recipe's cap corpus.train_tokens={c.train_tokens}",
            f"drop --train-tokens, or raise the cap (corpus.train_tokens={train_tokens})",
        )
    n = train_tokens or c.train_tokens or (SOTU_TRAIN_TOKENS if c.source == "builtin:sotu" else None)
    if n is None:
        raise MlpmemError(
            f"the size of corpus {c.source!r} is not known before it is built",
            "pass --train-tokens N (the train split's size), set corpus.train_tokens in the recipe, or build the corpus first",
        )
    total = n / max(1e-9, 1 - c.valid_fraction - c.test_fraction)
    return {
        "train": int(n),
        "valid": int(c.valid_tokens or total * c.valid_fraction),
        "test": int(c.test_tokens or total * c.test_fraction),
    }


def calibrate(model, recipe, d_in: int, vocab: int, device) -> Throughputs:
    """Measure this machine: a few batches of the real model, a FAISS search, a few memory steps."""
    import torch

    from mlpmem.datastore import iter_batches, resolve_mode, windows_per_batch
    from mlpmem.modeling.read_site import ReadSite, resolve_layer
    from mlpmem.train import build_memory, build_optimizer
    from mlpmem.losses import sparse_kd_loss

    t_all = time.perf_counter()
    ds = recipe.sections["datastore"]
    C, S = ds.context, ds.stride
    B = min(windows_per_batch(ds), max(1, CALIBRATE_TOKENS // C))  # rows/s no longer change with the batch long before this size
    mode = resolve_mode(model, ds.mode, C, S)
    sites = {"keys": ReadSite(resolve_layer(model, ds.layer), ds.site)}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, min(vocab, model.config.get_text_config().vocab_size), size=C + S * B + 1).astype(np.int32)

    def rows_per_s(want_logprob: bool) -> float:
        """One window to warm up, then one timed batch of B windows (a cache-mode block when extracting)."""
        m = mode if not want_logprob else "recompute"
        list(iter_batches(model, tokens[: C + 1], C, S, sites, 1, want_logprob, None, "recompute"))
        timed = list(iter_batches(model, tokens, C, S, sites, B, want_logprob, (1, B + 1), m))
        return sum(b.row_end - b.row_start for b in timed) / max(1e-9, sum(b.seconds for b in timed))

    extract, score = rows_per_s(False), rows_per_s(True)
    import faiss

    n_keys, k = 50_000, min(recipe.sections["knn"].k, 1024)
    d = model.config.get_text_config().hidden_size
    keys = rng.standard_normal((n_keys, d), dtype=np.float32)
    index = faiss.IndexFlatL2(d)
    index.add(keys)
    qps = 256 / _timed_search(index, keys, k)
    pq_rate = pq_codes_per_s(keys, k) if recipe.sections["index"].kind in PQ_KINDS else None
    tcfg = recipe.sections["train"]
    cfg = dataclasses.replace(tcfg, init="plain")  # the same size and cost; no copy from the LM needed to time it
    memory = build_memory(cfg, d_in, vocab).to(device)
    opt = build_optimizer(memory, cfg)
    m = min(recipe.sections["targets"].top_m, vocab)
    bs = min(cfg.batch_size // cfg.grad_accum, CALIBRATE_POSITIONS)
    h = torch.randn(bs, d_in, device=device)
    ids = torch.from_numpy(rng.integers(0, vocab, (bs, m))).to(device)
    probs = torch.full((bs, m), 1.0 / m, device=device)
    labels = ids[:, 0]
    steps, t_train = 0, 0.0
    for i in range(3):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss, _ = sparse_kd_loss(memory(h), ids, probs, labels, cfg.alpha)
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            steps, t_train = steps + 1, t_train + time.perf_counter() - t0
    return Throughputs(
        extract, score, qps, n_keys, steps * bs / t_train, str(device), seconds=time.perf_counter() - t_all, pq_codes_s=pq_rate
    )


def pq_codes_per_s(keys: np.ndarray, k: int) -> float:
    """Codes per second an IVF-PQ search (the library's code size, distances from the codes) scans over ``keys``,
    counted by FAISS itself (indexIVF_stats.ndis). A few seconds: 64 lists and their codebooks trained on 10k keys."""
    import faiss

    from mlpmem.index import faiss_threads

    d = keys.shape[1]
    index = faiss.index_factory(d, f"IVF64,PQ{pq_size(d)}np")
    with faiss_threads():
        index.train(keys[:10_000])
        index.add(keys)
    index.nprobe = 24  # about IVF_SCAN codes per query over 50k keys
    seconds = _timed_search(index, keys, k)
    return faiss.cvar.indexIVF_stats.ndis / seconds


def _timed_search(index, keys: np.ndarray, k: int) -> float:
    """Seconds of one search of 256 of ``keys`` (after a warm-up of 16), at torch's thread count; FAISS's IVF
    counters (indexIVF_stats) then hold that search alone."""
    import faiss

    from mlpmem.index import faiss_threads

    with faiss_threads():
        index.search(keys[:16], k)
        faiss.cvar.indexIVF_stats.reset()
        t0 = time.perf_counter()
        index.search(keys[16:272], k)
        return time.perf_counter() - t0


def search_qps(tp: Throughputs, n_keys: int, flat: bool, pq: bool = False) -> float:
    """Queries/s over ``n_keys``: Flat scans every key, IVF about IVF_SCAN of them (PQ codes at their own rate, when measured)."""
    scanned = n_keys if flat else min(n_keys, IVF_SCAN)
    if pq and not flat and tp.pq_codes_s:
        return tp.pq_codes_s / max(1, scanned)
    return tp.search_qps * tp.search_rows / max(1, scanned)


def estimate(
    recipe, tokens: dict[str, int], tp: Throughputs, d: int, vocab: int, model_bytes: int, memory_params: int, n_layers: int | None = None
) -> list[StageNeed]:
    """Per stage: seconds, disk, RAM and GPU memory, from sizes and throughputs (see the module docstring).
    ``n_layers``: the model's decoder layers (unknown: layers counted from the end are told apart from the others all the same)."""
    s = recipe.sections
    ds, ix, tg, tr, knn = s["datastore"], s["index"], s["targets"], s["train"], s["knn"]
    N, Nv, Nt = tokens["train"], tokens["valid"], tokens["test"]
    n = n_layers or 1_000_000
    spec = resolve_memory_input(tr.input_layer, tr.input_site, tr.init, tr.mode, ds.layer % n, ds.site, n_layers=n)  # as the run decides it
    # the memory's input, when it is not the key, is stored for offline training only (online training recomputes it)
    n_feat = 1 + len(ds.extra_sites) + (spec.source == "stored" and spec.array != "keys")
    row_bytes = 2 * d * n_feat + 4
    flat = ix.kind in ("flat", "keys") or (ix.kind == "auto" and N <= ix.auto_flat_max_rows)
    index_bytes = {"flat": 4 * d * N, "keys": 0}.get(
        ix.kind, 4 * d * N if flat else (d + 8) * N
    )  # SQ8: a byte per dimension + an 8-byte id
    if ix.kind in PQ_KINDS:  # PQ codes + ids, the float32 centroids (24 B per token at 200k keys) and codebooks
        index_bytes = (pq_size(d) + 8) * N + ((4096 if ix.kind == "mlpmemory" else auto_nlist(N)) + 256) * d * 4
    qps = search_qps(tp, N, flat, ix.kind in PQ_KINDS)
    gpu = tp.device.startswith("cuda")
    from mlpmem.datastore import windows_per_batch

    B = windows_per_batch(ds)
    act = B * ds.context * d * 4 * 8  # activations of one batch, generously
    logits = B * ds.stride * vocab * 4  # scored splits keep the logits of the kept positions
    shard = ds.windows_per_shard * ds.stride * row_bytes
    search_block = 1024 * knn.k * 12  # distances + ids of one block of queries
    opt_bytes = memory_params * 4 * 4  # weights, gradients, two AdamW moments
    train_act = tr.batch_size // tr.grad_accum * vocab * 4 * 4
    lm_gpu = model_bytes + act + logits if gpu else 0
    return [
        StageNeed("corpus", 0.0, 4 * (N + Nv + Nt), 8 * (N + Nv + Nt)),
        StageNeed(
            "datastore (train) and scored valid split",
            N / tp.extract_rows_s + Nv / tp.score_rows_s,
            N * row_bytes + Nv * (row_bytes + 4),
            model_bytes + 2 * shard + act + logits,
            lm_gpu,
        ),
        StageNeed(
            "index",
            (60.0 if not flat else 0.0) + N * d * 4 / 2e9,
            index_bytes,
            index_bytes + (0 if flat else min(N, ix.train_sample) * d * 4),
        ),
        StageNeed(
            "kNN-LM temperature and lambda on valid",
            Nv / tp.score_rows_s + Nv / qps,
            0,
            model_bytes + index_bytes + Nv * knn.k * 12 + logits,
            lm_gpu,
        ),
        StageNeed("kNN targets", (N + Nv) / qps, (N + Nv) * tg.top_m * (id_dtype(vocab).itemsize + 2), index_bytes + search_block),
        # online training runs the LM over every batch's windows again, as scoring does: at 200k SOTU tokens the
        # memory trained at 140 positions/s online against 291 offline (BENCHMARKS section 8)
        StageNeed(
            "memory training",
            tr.epochs * N * (1 / tp.train_positions_s + (1 / tp.score_rows_s if tr.mode == "online" else 0.0)),
            memory_params * 4 * (3 * checkpoints_on_disk(tr, N) + 1),
            opt_bytes + train_act + (model_bytes if tr.mode == "online" else 0),
            opt_bytes + train_act if gpu else 0,
        ),
        StageNeed(
            f"evaluation: lambda on valid, then the {s['eval'].split} split",
            (Nv + Nt) * (1 / tp.score_rows_s + 1 / qps),
            0,
            model_bytes + index_bytes + (Nv + Nt) * knn.k * 12 + logits,
            lm_gpu + (opt_bytes // 4 if gpu else 0),
        ),
    ]


def checkpoints_on_disk(tr, n_rows: int) -> int:
    """Checkpoints at once at the peak: keep_last, plus the one being written, but no more than the run writes."""
    from mlpmem.train import Schedule

    steps = Schedule(n_rows, tr).total
    written = (steps // tr.ckpt_every if tr.ckpt_every else 0) + (0 if tr.ckpt_every and steps % tr.ckpt_every == 0 else 1)
    return min(tr.keep_last + 1, written)


def _free_disk(path: Path) -> int:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def batch_problems(recipe, d: int, vocab: int, dtype_bytes: int, capacity: int, memory: str = "RAM") -> list[str]:
    """Batch sizes whose one batch cannot fit ``capacity`` bytes whatever else happens, as ``"key: message"`` lines: a
    datastore forward call's hidden states at one layer (windows x context x d) or a scored batch's log-probabilities
    (windows x stride x vocab, float32); a training step's logits ((batch_size / grad_accum) x vocab, float32)."""
    from mlpmem.datastore import windows_per_batch

    ds, tr = recipe.sections["datastore"], recipe.sections["train"]
    out = []
    B = windows_per_batch(ds)
    need = max(B * ds.context * d * dtype_bytes, B * ds.stride * vocab * 4)
    key = f"datastore.batch_tokens={ds.batch_tokens}" if ds.batch_tokens else f"datastore.batch_size={ds.batch_size}"
    if need > capacity:
        out.append(
            f"{key}: a forward call over {B:,} windows of {ds.context} tokens holds at least {human_bytes(need)}, "
            f"more than the {human_bytes(capacity)} of {memory}"
        )
    step = tr.batch_size // tr.grad_accum
    need = step * vocab * 4
    if need > capacity:
        out.append(
            f"train.batch_size={tr.batch_size}: a step's logits over {step:,} positions and {vocab:,} tokens take {human_bytes(need)}, "
            f"more than the {human_bytes(capacity)} of {memory}"
        )
    return out


def check_output_file(path: Path, flag: str = "--json") -> None:
    """Refuse at once, before any work, a file that cannot be written: a folder, a folder that is missing or a file,
    no permission. (write_json then writes it whole or not at all.)"""
    p = Path(path).expanduser()
    parent = p.parent
    if p.is_dir():
        raise MlpmemError(f"{flag} {path} is a folder", f"pass a file path, e.g. {flag} {p / 'plan.json'}")
    if not parent.exists():
        raise MlpmemError(f"{flag} {path}: the folder {parent} does not exist", "create it first, or pass a path in a folder that exists")
    if not parent.is_dir():
        raise MlpmemError(f"{flag} {path}: {parent} is a file, not a folder", "pass a path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise MlpmemError(f"{flag} {path} cannot be written (permission denied)", "pass a path in a folder you can write to")


def fit_warnings(needs: list[StageNeed], out: Path, gpu_total: int | None) -> list[str]:
    """Stages that will not fit this machine: disk (all stages' files together), RAM and GPU memory (each stage alone)."""
    out_warn = []
    disk = sum(n.disk_bytes for n in needs)
    free = _free_disk(out)
    if disk > free:
        out_warn.append(f"the run needs {human_bytes(disk)} of disk, {out} has {human_bytes(free)} free")
    ram = _total_ram()
    for n in needs:
        if n.ram_bytes > 0.9 * ram:
            out_warn.append(f"{n.stage} needs about {human_bytes(n.ram_bytes)} of RAM, the machine has {human_bytes(ram)}")
        if gpu_total and n.gpu_bytes > 0.9 * gpu_total:
            out_warn.append(f"{n.stage} needs about {human_bytes(n.gpu_bytes)} of GPU memory, the GPU has {human_bytes(gpu_total)}")
    return out_warn


def plan(recipe, train_tokens: int | None = None, throughputs: Throughputs | None = None) -> dict:
    """The plan for ``recipe`` as a dict (stages, totals, throughputs, warnings); loads the model to read its shape."""
    import torch

    from mlpmem import dist
    from mlpmem.memory import MLPMemory
    from mlpmem.models import dtype_name, load_model, logits_size, model_label, num_parameters, resolve_device
    from mlpmem.modeling.read_site import decoder_layers

    from mlpmem.typed_config import validate
    from mlpmem.pipeline import check_k

    if throughputs is not None:
        validate(throughputs, "throughputs")
    tokens = split_tokens(recipe, train_tokens)
    check_k(recipe.sections["knn"].k, tokens["train"], f"a train split of {tokens['train']} tokens")  # the run's own check of knn.k
    dev, dt = resolve_device(dist.local_device(recipe.device), recipe.sections["datastore"].dtype)
    model, _, model_id = load_model(recipe.model, dtype_name(dt), dev)
    d, vocab = model.config.get_text_config().hidden_size, logits_size(model)
    gpu_total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    too_big = batch_problems(recipe, d, vocab, torch.finfo(dt).bits // 8, gpu_total or _total_ram(), "GPU memory" if gpu_total else "RAM")
    if too_big:
        raise MlpmemError(
            "batches that cannot fit this machine:\n  " + "\n  ".join(too_big),
            "lower these batch sizes (datastore.batch_tokens sets the datastore's by tokens, train.grad_accum splits a training batch)",
        )
    tcfg = recipe.sections["train"]
    with torch.device("meta"):
        memory_params = MLPMemory(tcfg.memory_config(d, vocab)).num_parameters()
    tp = throughputs or calibrate(model, recipe, d, vocab, dev)
    model_bytes = num_parameters(model) * torch.finfo(dt).bits // 8
    needs = estimate(recipe, tokens, tp, d, vocab, model_bytes, memory_params, len(decoder_layers(model)))
    return {
        "recipe_out": recipe.out,
        "model": model_label(model_id),
        "device": str(dev),
        "tokens": tokens,
        "d": d,
        "vocab": vocab,
        "memory_params": memory_params,
        "throughputs": dataclasses.asdict(tp),
        "stages": [dataclasses.asdict(n) for n in needs],
        "total": {
            "seconds": sum(n.seconds for n in needs),
            "disk_bytes": sum(n.disk_bytes for n in needs),
            "peak_ram_bytes": max(n.ram_bytes for n in needs),
            "peak_gpu_bytes": max(n.gpu_bytes for n in needs),
        },
        "warnings": fit_warnings(needs, Path(recipe.out), gpu_total),
        "model_of_time": f"extraction/scoring scale with rows, Flat search with N, IVF search with ~{IVF_SCAN} keys (PQ: codes), training with epochs x rows",
    }


def render_plan(p: dict) -> str:
    rows = [
        f"plan for {p['recipe_out']} ({p['model']}, {p['device']}): train {p['tokens']['train']:,} / valid {p['tokens']['valid']:,} / "
        f"test {p['tokens']['test']:,} tokens, memory {p['memory_params'] / 1e6:.1f}M parameters",
        f"{'stage':<48} {'time':>9} {'disk':>10} {'RAM':>10} {'GPU':>10}",
    ]
    for n in p["stages"]:
        rows.append(
            f"{n['stage'][:48]:<48} {_dur(n['seconds']):>9} {human_bytes(n['disk_bytes']):>10} {human_bytes(n['ram_bytes']):>10} "
            f"{human_bytes(n['gpu_bytes']) if n['gpu_bytes'] else '-':>10}"
        )
    t = p["total"]
    rows.append(
        f"{'total (disk: all files; RAM/GPU: the peak stage)':<48} {_dur(t['seconds']):>9} {human_bytes(t['disk_bytes']):>10} "
        f"{human_bytes(t['peak_ram_bytes']):>10} {human_bytes(t['peak_gpu_bytes']) if t['peak_gpu_bytes'] else '-':>10}"
    )
    tp = p["throughputs"]
    rows.append(
        f"measured: extraction {tp['extract_rows_s']:.0f} rows/s, scoring {tp['score_rows_s']:.0f} rows/s, "
        f"search {tp['search_qps']:.0f} q/s over {tp['search_rows']:,} keys"
        + (f" ({tp['pq_codes_s'] / 1e6:.1f}M PQ codes/s)" if tp.get("pq_codes_s") else "")
        + f", training {tp['train_positions_s']:.0f} positions/s"
    )
    rows += [f"WARNING: {w}" for w in p["warnings"]]
    return "\n".join(rows)


def _dur(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def read_throughputs(path: Path) -> Throughputs:
    """The throughputs in ``path`` (a plan's --json, or the throughputs alone), checked like a recipe section."""
    from mlpmem.typed_config import from_dict
    from mlpmem.files import read_json

    data = read_json(path)
    data = data.get("throughputs", data) if isinstance(data, dict) else data
    fields = dataclasses.fields(Throughputs)
    names = {f.name for f in fields}
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    fix = "pass a JSON written by `mlpmem plan --json`, with every throughput a positive number"
    if not isinstance(data, dict) or any(n not in data for n in required):
        raise MlpmemError(f"{path} holds no throughputs ({', '.join(sorted(names))})", fix)
    try:
        return from_dict(Throughputs, {k: v for k, v in data.items() if k in names}, where="throughputs")
    except MlpmemError as e:
        raise MlpmemError(f"{path}: {e.problem}", fix)
