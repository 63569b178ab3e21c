"""Gated mixing: lambda per token from a small gate over cheap features of the LM's and the memory's distributions.

A fixed lambda cannot know when the memory is out of its depth (BENCHMARKS.md section 3: the
memory costs +2.1% perplexity on text from another domain). The gate reads, at every position,
:data:`~mlpmem.modeling_mlpmem.GATE_FEATURES` (entropies, largest log-probs, both KL divergences,
argmax agreement) and outputs lambda in [0, 1] through a sigmoid. Two kinds, same file format:

- ``mlp``: a few hundred parameters, trained to maximise the mixture's likelihood on the valid
  split of the memory's domain (plus, optionally, generic text where the memory should step back),
  starting from the EM-fitted fixed lambda and stopped early on held-out blocks;
- ``binned``: the cheapest closed form, one EM-fitted lambda per quantile bin of the LM's entropy.

The gate's forward and its files live in :mod:`mlpmem.modeling_mlpmem` (an exported model mixes
without mlpmem); this module scores text for it, fits it and saves it with its meta (the memory's
fingerprint, which is checked whenever the gate is paired with a memory).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlpmem.errors import MlpmemError
from mlpmem.modeling.mixing import GATE_FEATURES, GATE_INPUTS, MIXINGS, check_mixing, gate_features, mixture_nll_logit  # noqa: F401
from mlpmem.modeling.gating import GATE_KINDS, MixingGate, check_gate, memory_fingerprint, read_gate_folder, write_gate_folder

log = logging.getLogger(__name__)


@dataclass
class GateConfig:
    """How a gate is fitted (the recipe's ``gate:`` section)."""

    kind: str = "mlp"  # mlp | binned (closed form: lambda per bin of LM entropy)
    hidden: int = 32
    bins: int = 8
    steps: int = 2000  # full-batch Adam steps at most (early stopping on held-out blocks)
    lr: float = 0.01
    weight_decay: float = 1e-3
    holdout: float = 0.2  # share of valid blocks (256 positions each) held out for early stopping
    # generic (out-of-domain) text where the memory should step back: "lm" (sampled from the LM itself, the default:
    # it needs no data and is the LM's own domain, where the memory has least to add; BENCHMARKS.md section 7), a
    # .txt/.jsonl/.parquet file or folder, as corpus sources, or null (none: the valid split alone)
    generic: str | None = "lm"
    # chosen on valid text by bench/bench_gate_select.py (gate_select.json): among gates keeping >= 90% of the fixed
    # lambda's gain on held-out halves of the demo's valid split and costing <= +0.2% on GCIDE and Python valid, 4000
    # LM-sample tokens at weight 1 with 64 centres kept most (141%; +0.05% / +0.18% out of domain)
    generic_tokens: int = 4000
    generic_weight: float = 1.0  # weight of a generic position in the loss, relative to an in-domain one
    # the mlp gate also reads how far the memory's input lies from the nearest of this many k-means centres of its
    # train inputs (mixing.novelty; 0: the two distributions alone), the centres fitted on about centroid_tokens
    # positions of the train split, in windows spread over it
    centroids: int = 64
    centroid_tokens: int = 8192
    seed: int = 0

    def problems(self) -> list[str]:
        from mlpmem.typed_config import one_of, positive

        out = one_of(self, "kind", GATE_KINDS) + positive(self, "hidden") + positive(self, "bins") + positive(self, "steps")
        out += positive(self, "lr") + positive(self, "generic_tokens") + positive(self, "centroids", zero=True)
        out += positive(self, "centroid_tokens")
        if not 0 <= self.weight_decay < float("inf"):
            out.append(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0 < self.holdout < 1:
            out.append(f"holdout: must lie in (0, 1), got {self.holdout}")
        if self.generic not in (None, "lm") and not Path(str(self.generic)).expanduser().exists():
            out.append(
                f'generic: {self.generic!r} does not exist ("lm" samples generic text from the LM; else a .txt/.jsonl/.parquet file or folder)'
            )
        if not 0 <= self.generic_weight < float("inf"):
            out.append(f"generic_weight: must be >= 0, got {self.generic_weight}")
        return out


@dataclass
class MixScores:
    """Per-position scores for gating. Shapes: labels, lm_logprob, memory_logprob [N]; features [N, F] float32."""

    labels: np.ndarray
    lm_logprob: np.ndarray
    memory_logprob: np.ndarray
    features: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.labels)

    def take(self, idx) -> "MixScores":
        return MixScores(self.labels[idx], self.lm_logprob[idx], self.memory_logprob[idx], self.features[idx])

    def save(self, path: Path) -> None:
        np.savez(
            path,
            labels=self.labels,
            lm_logprob=self.lm_logprob,
            memory_logprob=self.memory_logprob,
            features=self.features,
            seconds=np.array([self.seconds.get(k, 0.0) for k in ("lm", "memory", "gate")]),
        )

    @classmethod
    def load(cls, path: Path) -> "MixScores":
        z = np.load(path, allow_pickle=False)
        return cls(
            z["labels"], z["lm_logprob"], z["memory_logprob"], z["features"], dict(zip(("lm", "memory", "gate"), map(float, z["seconds"])))
        )


def concat(parts: list[MixScores]) -> MixScores:
    return MixScores(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("labels", "lm_logprob", "memory_logprob", "features")))


# ----------------------------------------------------------------------------- scoring


def score_mixing(
    model,
    tokens: np.ndarray,
    context: int,
    stride: int,
    memory,
    memory_site,
    batch_size: int = 8,
    desc: str = "scoring for the gate",
    chunk: int = 512,
    gate: MixingGate | None = None,
    prefix: tuple[int, ...] = (),
    centroids=None,
) -> MixScores:
    """Run the LM over ``tokens`` (windows as the evaluator's) and keep, per predicted position, the LM's and the
    memory's log-prob of the true token and the gate's features. Timed per part (LM forward, memory, features and
    gate; ``gate`` if given is run too, so its cost is in the timing). ``memory_site``: a read_site.ReadSite; ``prefix``:
    the datastore's window prefix (datastore.bos), as in evaluate.score_online. ``centroids`` [C, d] (or a gate that
    reads the memory's input): the features gain the ``novelty`` column (mixing.GATE_INPUTS)."""
    if centroids is None and gate is not None and gate.reads_hidden:
        centroids = gate.centroids
    labels, lp, feats, secs = score_memories(
        model, tokens, context, stride, [(memory, memory_site)], batch_size, desc, chunk, gate, prefix, centroids
    )
    return MixScores(labels, lp[:, 0], lp[:, 1], feats[:, 0], secs)


def score_memories(
    model,
    tokens: np.ndarray,
    context: int,
    stride: int,
    memories: list,
    batch_size: int = 8,
    desc: str = "scoring memories",
    chunk: int = 512,
    gate=None,
    prefix: tuple[int, ...] = (),
    centroids=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """One LM pass for K memories (each a (memory, read_site.ReadSite) pair): (labels [N], log-probs of the true token
    [N, K + 1] (column 0 the LM), gate_features of each memory against the LM [N, K, F], seconds per part).
    ``prefix``: token ids in front of every window (the datastore's, see datastore.Extractor); never rows.
    ``centroids`` [C, d]: each memory's features gain its input's novelty (mixing.novelty), F = len(GATE_INPUTS)."""
    import torch

    from mlpmem.modeling.mixing import novelty
    from tqdm.auto import tqdm

    from mlpmem.corpus import window_batches, windows
    from mlpmem.datastore import window_ids
    from mlpmem.modeling.read_site import capture

    if not memories:
        raise MlpmemError("no memory to score", "pass at least one (memory, site) pair")
    p = len(prefix)
    W = windows(len(tokens), context - p, stride)  # datastore.Extractor.windows
    tok_t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    n_tokens = len(tok_t)
    sites = list(dict.fromkeys(site for _, site in memories))
    cents = [None if centroids is None else torch.as_tensor(centroids).to(next(m.parameters()).device) for m, _ in memories]
    out: dict[str, list] = {"y": [], "lp": [], "f": []}
    secs = {"lm": 0.0, "memory": 0.0, "gate": 0.0}
    bar = tqdm(total=max(0, n_tokens - 1), desc=desc, unit="tok", dynamic_ncols=True)
    for group in window_batches(W, batch_size):
        ids = window_ids(tok_t, group, prefix).to(model.device)
        stops = np.minimum(group[:, 1], n_tokens - 1)
        keep = int((group[:, 1] - group[:, 2]).max())
        t0 = time.perf_counter()
        with torch.inference_mode(), capture(model, sites) as store:
            res = model(input_ids=ids, use_cache=False, logits_to_keep=keep)
        logits, hs = [], {site: [] for site in sites}
        for w, (b, e, k) in enumerate(group):
            s, t = k - b, stops[w] - b
            logits.append(res.logits[w, s - (e - b) + keep : t - (e - b) + keep])  # counted from the end: the prefix shifts nothing
            for site in sites:
                hs[site].append(store[site][w, s + p : t + p])
        logits, hs = torch.cat(logits), {site: torch.cat(v) for site, v in hs.items()}
        secs["lm"] += time.perf_counter() - t0
        y = tok_t[int(group[0, 2]) + 1 : int(stops[-1]) + 1]
        with torch.inference_mode():
            for a in range(0, len(y), chunk):
                yy = y[a : a + chunk][:, None]
                t0 = time.perf_counter()
                lm_lp = logits[a : a + chunk].float().log_softmax(-1)
                secs["lm"] += time.perf_counter() - t0
                lps, fs = [lm_lp.gather(-1, yy.to(lm_lp.device))[:, 0].double().cpu()], []
                for (memory, site), c in zip(memories, cents):
                    dev = next(memory.parameters()).device
                    t0 = time.perf_counter()
                    mem_lp = memory(hs[site][a : a + chunk].to(dev).float()).float().log_softmax(-1)
                    secs["memory"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    f = gate_features(lm_lp.to(dev), mem_lp)
                    if c is not None:
                        f = torch.cat([f, novelty(hs[site][a : a + chunk].to(dev), c).unsqueeze(-1)], -1)
                    if gate is not None:
                        gate(f)
                    secs["gate"] += time.perf_counter() - t0
                    lps.append(mem_lp.gather(-1, yy.to(dev))[:, 0].double().cpu())
                    fs.append(f.cpu())
                out["lp"].append(torch.stack(lps, 1).numpy())
                out["f"].append(torch.stack(fs, 1).numpy())
        out["y"].append(y.numpy().astype(np.int32))
        bar.update(len(y))
    bar.close()
    k = len(memories)
    labels = np.concatenate(out["y"]).astype(np.int32) if out["y"] else np.zeros(0, np.int32)
    lp = np.concatenate(out["lp"]).astype(np.float64) if out["lp"] else np.zeros((0, k + 1))
    n_feats = len(GATE_INPUTS) if centroids is not None else len(GATE_FEATURES)
    feats = np.concatenate(out["f"]).astype(np.float32) if out["f"] else np.zeros((0, k, n_feats), np.float32)
    return labels, lp, feats, secs


# ----------------------------------------------------------------------------- the pure maths


def holdout_mask(n: int, share: float, block: int = 256, seed: int = 0) -> np.ndarray:
    """Boolean [n]: whole blocks of ``block`` consecutive positions held out (neighbouring tokens are not independent)."""
    n_blocks = -(-n // block)
    rng = np.random.default_rng(seed)
    k = min(n_blocks - 1, max(1, round(share * n_blocks))) if n_blocks > 1 else 0
    held = np.zeros(n_blocks, bool)
    held[rng.choice(n_blocks, size=k, replace=False)] = True
    return np.repeat(held, block)[:n]


def fit_binned_gate(feature: np.ndarray, lp_lm: np.ndarray, lp_mem: np.ndarray, bins: int = 8, name: str = "lm_entropy") -> MixingGate:
    """The closed form: quantile bins of one feature, one lambda per bin fitted by EM (interpolate.fit_lambda_em)."""
    import torch

    from mlpmem.interpolate import fit_lambda_em

    feature = np.asarray(feature, np.float64)
    edges = np.unique(np.quantile(feature, np.linspace(0, 1, bins + 1)[1:-1])) if bins > 1 else np.zeros(0)
    gate = MixingGate("binned", bins=len(edges) + 1, bin_feature=name)
    which = np.searchsorted(edges, feature, side="left")  # torch.bucketize(right=False) puts x == edge in the lower bin, as this
    global_lam = fit_lambda_em(lp_lm, lp_mem)
    logits = []
    for b in range(len(edges) + 1):
        sel = which == b
        lam = fit_lambda_em(lp_lm[sel], lp_mem[sel]) if sel.any() else global_lam
        logits.append(-math.inf if lam <= 0 else math.inf if lam >= 1 else math.log(lam) - math.log1p(-lam))
    with torch.no_grad():
        gate.edges.copy_(torch.tensor(edges, dtype=torch.float32))
        gate.bin_logits.copy_(torch.tensor(logits, dtype=torch.float32))
    return gate.eval()


def fit_mlp_gate(
    features: np.ndarray,
    lp_lm: np.ndarray,
    lp_mem: np.ndarray,
    cfg: GateConfig,
    weight: np.ndarray | None = None,
    holdout: np.ndarray | None = None,
    centroids: np.ndarray | None = None,
) -> tuple[MixingGate, dict[str, Any]]:
    """Train the MLP gate: maximise the mixture likelihood (weighted), full-batch Adam, early stopping on ``holdout``.

    Starts at the EM-fitted fixed lambda of the training positions (output weights zero), so a
    gate that learns nothing is the fixed mixture. With ``centroids`` [C, d] the gate reads the novelty column of
    ``features`` too (mixing.GATE_INPUTS) and keeps the centres. Returns (gate, training record).
    """
    with _one_thread():
        return _fit_mlp_gate(features, lp_lm, lp_mem, cfg, weight, holdout, centroids)


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread: for a gate or router (a few hundred parameters) and for sampling (many small steps), one thread
    is fastest and immune to a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_full_batch(module, train_loss, held_out_nll, cfg: GateConfig, check_every: int = 20, patience: int = 15) -> dict[str, Any]:
    """The one training loop of the gate and the router: full-batch Adam on ``train_loss()``, ``held_out_nll()`` every
    ``check_every`` steps; keeps the best state on held-out data and stops after ``patience`` checks without a gain.
    Returns the record (held-out NLL at the start and at the best step, steps run)."""
    import torch

    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)

    def held() -> float:
        with torch.no_grad():
            return float(held_out_nll())

    best = start = held()
    best_state, best_step, bad, step = {k: v.clone() for k, v in module.state_dict().items()}, 0, 0, 0
    for step in range(1, cfg.steps + 1):
        loss = train_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0:
            h = held()
            if h < best - 1e-6:
                best, best_state, best_step, bad = h, {k: v.clone() for k, v in module.state_dict().items()}, step, 0
            else:
                bad += 1
                if bad >= patience:
                    break
    module.load_state_dict(best_state)
    return {"held_out_nll_start": start, "held_out_nll": best, "best_step": best_step, "steps_run": step}


def _fit_mlp_gate(features, lp_lm, lp_mem, cfg: GateConfig, weight, holdout, centroids) -> tuple[MixingGate, dict[str, Any]]:
    import torch

    from mlpmem.interpolate import fit_lambda_em

    torch.manual_seed(cfg.seed)
    n = len(lp_lm)
    holdout = holdout_mask(n, cfg.holdout, seed=cfg.seed) if holdout is None else holdout
    train = ~holdout
    w = np.ones(n) if weight is None else np.asarray(weight, np.float64)
    if centroids is None:
        gate = MixingGate("mlp", hidden=cfg.hidden)
    else:
        if features.shape[1] != len(GATE_INPUTS):
            raise ValueError("a gate fitted with centroids needs the novelty column (score with centroids)")  # a bug
        gate = MixingGate("mlp", GATE_INPUTS, cfg.hidden, centroids=centroids.shape[0], d=centroids.shape[1])
        gate.centroids.copy_(torch.as_tensor(centroids, dtype=torch.float32))
    x = torch.tensor(features[:, gate.index], dtype=torch.float32)
    a, b, wt = (torch.tensor(v, dtype=torch.float32) for v in (lp_lm, lp_mem, w))
    lam0 = min(max(fit_lambda_em(lp_lm[train], lp_mem[train]), 1e-4), 1 - 1e-4)
    with torch.no_grad():
        gate.shift.copy_(x[train].mean(0))
        gate.scale.copy_(x[train].std(0).clamp_min(1e-3))
        gate.out.bias.fill_(math.log(lam0) - math.log1p(-lam0))
    tr, ho = torch.from_numpy(train), torch.from_numpy(holdout)
    xs = {"tr": (x[tr] - gate.shift) / gate.scale, "ho": (x[ho] - gate.shift) / gate.scale}  # standardised once
    decay = [gate.inner.weight, gate.out.weight]

    def logit(part):
        return gate.out(torch.tanh(gate.inner(xs[part])))[:, 0]

    a_tr, b_tr, w_tr = a[tr], b[tr], wt[tr]
    fit = fit_full_batch(
        gate,
        lambda: mixture_nll_logit(logit("tr"), a_tr, b_tr, w_tr) + cfg.weight_decay * sum((p * p).sum() for p in decay),
        lambda: mixture_nll_logit(logit("ho"), a[ho], b[ho], wt[ho]),
        cfg,
    )
    record = {"lambda_start": lam0, **fit, "n_train": int(train.sum()), "n_held_out": int(holdout.sum())}
    log.info(
        "gate: held-out NLL %.5f -> %.5f (fixed lambda %.3f), best step %d of %d",
        *(fit["held_out_nll_start"], fit["held_out_nll"], lam0, fit["best_step"], fit["steps_run"]),
    )
    return gate.eval(), record


def gate_lambdas(gate: MixingGate, features: np.ndarray, block: int = 65536) -> np.ndarray:
    """lambda per position [N] (float64) from features [N, F]."""
    import torch

    with torch.no_grad():
        return np.concatenate(
            [
                gate(torch.from_numpy(np.ascontiguousarray(features[s : s + block]))).double().numpy()
                for s in range(0, max(1, len(features)), block)
            ]
        )[: len(features)]


# ----------------------------------------------------------------------------- fitting, saving, loading


def fit_gate(
    valid: MixScores, cfg: GateConfig, generic: MixScores | None = None, centroids: np.ndarray | None = None
) -> tuple[MixingGate, dict[str, Any]]:
    """Fit a gate of ``cfg.kind`` on the memory's valid scores (+ generic scores, weighted by cfg.generic_weight);
    ``centroids``: the mlp gate reads the scores' novelty column too (score_mixing with the same centroids)."""
    from mlpmem.interpolate import fit_lambda_em

    parts = [valid] + ([generic] if generic is not None and generic.n else [])
    data = concat(parts)
    if data.n < 2:
        raise MlpmemError(f"a gate needs scored positions to learn from, got {data.n}", "score a larger valid split")
    weight = np.concatenate([np.ones(valid.n)] + ([np.full(generic.n, cfg.generic_weight)] if len(parts) > 1 else []))
    record: dict[str, Any] = {
        "kind": cfg.kind,
        "n_valid": valid.n,
        "n_generic": generic.n if generic is not None else 0,
        "lambda_fixed_valid": fit_lambda_em(valid.lm_logprob, valid.memory_logprob),
    }
    if cfg.kind == "binned":
        col = GATE_FEATURES.index("lm_entropy")
        gate = fit_binned_gate(data.features[:, col], data.lm_logprob, data.memory_logprob, cfg.bins)
    else:
        holdout = np.concatenate([holdout_mask(p.n, cfg.holdout, seed=cfg.seed + i) for i, p in enumerate(parts)])
        gate, rec = fit_mlp_gate(data.features, data.lm_logprob, data.memory_logprob, cfg, weight, holdout, centroids)
        record.update(rec)
    return gate, record


def gate_meta(memory, cfg: GateConfig, record: dict[str, Any], memory_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a saved gate records: the memory it belongs to (fingerprint), how it was fitted."""
    from mlpmem.files import to_jsonable

    m = memory_meta or {}
    return {
        "memory_fingerprint": memory_fingerprint(memory),
        "model_id": m.get("model_id"),
        "tokenizer_hash": m.get("tokenizer_hash"),
        "layer": m.get("layer"),
        "site": m.get("site"),
        "fit": to_jsonable(cfg),
        "record": to_jsonable(record),
    }


def save_gate(folder: Path, gate: MixingGate, meta: dict[str, Any]) -> Path:
    return write_gate_folder(folder, gate, meta)


def load_gate(folder: Path, memory=None) -> tuple[MixingGate, dict[str, Any]]:
    """(gate, meta) from a gate folder; with ``memory``, refused unless the gate was trained for it."""
    gate, meta = read_gate_folder(folder)
    if memory is not None:
        check_gate(meta, memory, f"the gate in {folder}")
    return gate, meta


def find_gate(memory_dir: Path) -> Path | None:
    """The gate a run trained for the memory in RUN/train/memory: RUN/gate, if it holds one."""
    from mlpmem.modeling.gating import GATE_CONFIG

    for cand in (Path(memory_dir).parent.parent / "gate", Path(memory_dir).parent / "gate"):
        if (cand / GATE_CONFIG).is_file():
            return cand
    return None


def generic_tokens(source: str, tok, max_tokens: int, model=None, seed: int = 0) -> np.ndarray:
    """Generic text for the gate as one token stream: ``"lm"`` (text sampled from the LM itself: no data needed), or a
    .txt/.jsonl/.parquet file or folder, as corpus sources."""
    from mlpmem.corpus import CorpusConfig, load_documents, tokenize_split
    from mlpmem.models import separator_id

    sep = separator_id(tok)
    if source == "lm":
        if model is None:
            raise MlpmemError("generic text 'lm' is sampled from the LM, and no LM was given", "pass the model")
        return lm_samples(model, sep, max_tokens, seed)
    docs = load_documents(CorpusConfig(source=str(source)))
    tokens, _ = tokenize_split([d.text for d in docs], tok, sep, max_tokens)
    return np.concatenate([[sep], tokens]).astype(np.int32)


def lm_samples(model, sep: int, n_tokens: int, seed: int = 0, n_seqs: int = 8) -> np.ndarray:
    """``n_tokens`` of text sampled from ``model`` (temperature 1, top-p 0.95), ``n_seqs`` sequences started from the
    separator, joined by it: text of the LM's own kind, none of the memory's domain in particular."""
    with _one_thread():  # decoding is many small steps: extra threads only spin, and cost a lot on a loaded machine
        return _lm_samples(model, sep, n_tokens, seed, n_seqs)


def _lm_samples(model, sep: int, n_tokens: int, seed: int, n_seqs: int) -> np.ndarray:
    import torch

    per = -(-n_tokens // n_seqs)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    start = torch.full((n_seqs, 1), sep, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        out = model.generate(
            start,
            attention_mask=torch.ones_like(start),
            do_sample=True,
            top_p=0.95,
            temperature=1.0,
            top_k=0,
            max_new_tokens=per,
            min_new_tokens=per,
            pad_token_id=sep,
        )
    rows = [np.concatenate([[sep], r[1:]]) for r in out.cpu().numpy()]
    return np.concatenate(rows)[: n_tokens + 1].astype(np.int32)


def fit_memory_centroids(
    model,
    tokens: np.ndarray,
    site,
    n_centroids: int,
    n_tokens: int,
    context: int,
    stride: int,
    batch_size: int = 8,
    prefix: tuple[int, ...] = (),
    seed: int = 0,
) -> np.ndarray:
    """k-means centres [C, d] (float32) of the memory's input at ``site`` over about ``n_tokens`` positions of
    ``tokens`` (its train split): windows spread evenly over the stream, as the datastore cuts them, so the centres see
    every part of the corpus. FAISS k-means (20 iterations); C is capped at the number of positions."""
    import faiss
    import torch

    from mlpmem.datastore import RecomputeExtractor

    ext = RecomputeExtractor(model, context, stride, batch_size, prefix)
    W = ext.windows(len(tokens))
    pick = np.unique(np.linspace(0, len(W) - 1, max(1, min(len(W), -(-n_tokens // stride)))).round().astype(int))
    with torch.inference_mode():
        h = ext.features(torch.from_numpy(np.asarray(tokens, dtype=np.int64)), W[pick], {"memory": site})["memory"]
    x = np.ascontiguousarray(h.float().cpu().numpy())
    km = faiss.Kmeans(x.shape[1], min(n_centroids, len(x)), niter=20, seed=seed, verbose=False)
    km.train(x)
    return np.asarray(km.centroids, np.float32)


def build_gate_stage(
    out_dir: Path,
    cfg: GateConfig,
    model,
    tok,
    valid_tokens: np.ndarray,
    memory,
    memory_meta: dict[str, Any],
    memory_site,
    context: int,
    stride: int,
    batch_size: int = 8,
    overwrite: bool = False,
    prefix: tuple[int, ...] = (),
    train_tokens: np.ndarray | None = None,
) -> tuple[MixingGate, dict[str, Any]]:
    """The pipeline's gate stage: score the valid split (and cfg.generic), fit a gate, save it to ``out_dir``.
    With ``train_tokens`` (the memory's train split) and cfg.centroids > 0, the mlp gate also reads the novelty of the
    memory's input against k-means centres of its train inputs (fit_memory_centroids).

    A finished folder with the same settings and the same memory (fingerprint) is reused. Returns (gate, meta).
    """
    from mlpmem.files import file_record, sha256_bytes
    from mlpmem.folders import prepare_out
    from mlpmem.manifest import write_manifest
    from mlpmem.modeling.gating import GATE_CONFIG, GATE_WEIGHTS

    out_dir = Path(out_dir)
    fp = memory_fingerprint(memory)
    config = {
        "gate": cfg,
        "memory_fingerprint": fp,
        "valid_tokens_sha256": sha256_bytes(np.ascontiguousarray(valid_tokens, dtype=np.int32).tobytes()),
        "context": context,
        "stride": stride,
        **({"prefix": list(prefix)} if prefix else {}),
    }  # no key without one: older gates stay valid
    reads_hidden = cfg.kind == "mlp" and cfg.centroids > 0 and train_tokens is not None
    if reads_hidden:
        config["train_tokens_sha256"] = sha256_bytes(np.ascontiguousarray(train_tokens, dtype=np.int32).tobytes())
    if prepare_out(out_dir, config, overwrite, kind="gate") == "done":
        return load_gate(out_dir, memory)
    cents = None
    if reads_hidden:
        cents = fit_memory_centroids(
            model, train_tokens, memory_site, cfg.centroids, cfg.centroid_tokens, context, stride, batch_size, prefix, cfg.seed
        )
    valid = score_mixing(
        model, valid_tokens, context, stride, memory, memory_site, batch_size, "scoring valid (gate)", prefix=prefix, centroids=cents
    )
    generic = None
    if cfg.generic:
        toks = generic_tokens(cfg.generic, tok, cfg.generic_tokens, model, cfg.seed)
        generic = score_mixing(
            model, toks, context, stride, memory, memory_site, batch_size, "scoring generic text (gate)", prefix=prefix, centroids=cents
        )
    gate, record = fit_gate(valid, cfg, generic, cents)
    from mlpmem.interpolate import interpolate_logprobs, interpolate_per_token, perplexity

    lam = gate_lambdas(gate, valid.features)
    record.update(
        {
            "valid_ppl_fixed": perplexity(interpolate_logprobs(valid.lm_logprob, valid.memory_logprob, record["lambda_fixed_valid"])),
            "valid_ppl_gated": perplexity(interpolate_per_token(valid.lm_logprob, valid.memory_logprob, lam)),
            "valid_mean_lambda": float(lam.mean()),
            "params": gate.num_parameters(),
        }
    )
    meta = gate_meta(memory, cfg, record, memory_meta)
    save_gate(out_dir, gate, meta)
    write_manifest(
        out_dir,
        "gate",
        {
            "files": [file_record(out_dir, out_dir / GATE_WEIGHTS), file_record(out_dir, out_dir / GATE_CONFIG)],
            "memory_fingerprint": fp,
            "record": meta["record"],
        },
    )
    log.info(
        "gate (%s, %d parameters) saved to %s: valid ppl fixed %.3f, gated %.3f (of which part was its training data)",
        cfg.kind,
        gate.num_parameters(),
        out_dir,
        record["valid_ppl_fixed"],
        record["valid_ppl_gated"],
    )
    return gate, meta


# ----------------------------------------------------------------------------- several memories: a router (issue 12 item 2, scoring path)


def fit_router(lp: np.ndarray, features: np.ndarray, cfg: GateConfig, holdout: np.ndarray | None = None):
    """Train a :class:`~mlpmem.modeling_mlpmem.MemoryRouter` on per-token log-probs ``lp`` [N, K + 1] (column 0 the LM,
    then each memory) and features [N, K, F] (gate_features of each memory against the LM): maximise the routed
    mixture's likelihood, starting from the EM-fitted fixed weights, early stopping on ``holdout``. Returns (router, record).
    """
    with _one_thread():
        return _fit_router(lp, features, cfg, holdout)


def _fit_router(lp, features, cfg: GateConfig, holdout):
    import torch

    from mlpmem.interpolate import fit_mixture_em
    from mlpmem.modeling.gating import MemoryRouter

    lp, features = np.asarray(lp, np.float64), np.asarray(features, np.float32)
    if lp.ndim != 2 or lp.shape[1] < 2 or features.shape[:2] != (lp.shape[0], lp.shape[1] - 1):
        raise MlpmemError(
            f"a router needs log-probs [N, K + 1] and features [N, K, F] with K >= 1, got {lp.shape} and {features.shape}",
            "score the LM and every memory on the same positions",
        )
    torch.manual_seed(cfg.seed)
    n = len(lp)
    holdout = holdout_mask(n, cfg.holdout, seed=cfg.seed) if holdout is None else holdout
    train = ~holdout
    router = MemoryRouter(lp.shape[1] - 1, cfg.hidden)
    x = torch.tensor(features.reshape(n, -1))
    y = torch.tensor(lp, dtype=torch.float32)
    w0 = np.maximum(fit_mixture_em([lp[train, k] for k in range(lp.shape[1])]), 1e-6)
    with torch.no_grad():
        router.shift.copy_(x[train].mean(0))
        router.scale.copy_(x[train].std(0).clamp_min(1e-3))
        router.out.bias.copy_(torch.tensor(np.log(w0), dtype=torch.float32))
    tr, ho = torch.from_numpy(train), torch.from_numpy(holdout)
    xs = {"tr": (x[tr] - router.shift) / router.scale, "ho": (x[ho] - router.shift) / router.scale}
    ys = {"tr": y[tr], "ho": y[ho]}

    def nll(part):
        z = router.out(torch.tanh(router.inner(xs[part])))
        return -torch.logsumexp(z.log_softmax(-1) + ys[part], -1).mean()

    fit = fit_full_batch(
        router,
        lambda: nll("tr") + cfg.weight_decay * ((router.inner.weight**2).sum() + (router.out.weight**2).sum()),
        lambda: nll("ho"),
        cfg,
    )
    return router.eval(), {"weights_start": [float(w) for w in w0], **fit}


def router_weights(router, features: np.ndarray) -> np.ndarray:
    """Per-token weights [N, K + 1] (column 0 the LM) from features [N, K, F]."""
    import torch

    with torch.no_grad():
        return router(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).double().numpy()
