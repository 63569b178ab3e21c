"""Stage 2: run the frozen LM over a split and store (hidden state -> next token).

Row i of a datastore is position i of the split's token stream: its key is
the hidden state that predicts token i+1, its value is token i+1, and the
corpus's ``doc_index`` gives the document. Arrays are written in shards of
whole windows, each shard atomically, so a killed run resumes at the first
missing shard and ends byte-identical to an uninterrupted one.

Two extraction modes predict the same rows in the same order:

- ``recompute``: every scoring window (context C, stride S) is run from
  scratch, so each token is computed C/S times (twice for 512/256).
- ``cache``: the attention KV cache is carried from one window to the next
  and only the S new tokens are computed. Each shard is split into up to
  ``batch_size * C // S`` contiguous lanes run as one batch; a lane starts with a full
  window and then feeds chunks of S tokens that attend to the previous C-S
  tokens plus the lane's first ``SINK_TOKENS`` tokens. Those "attention sinks"
  are essential: a plain sliding cache (sinks dropped) raised SmolLM2's
  perplexity from 36.7 to 66.2, with sinks it stays within 0.3% of recompute
  (the StreamingLLM effect). Cached keys are re-based (rotated back by the
  RoPE angle) so that positions stay in 0..SINK_TOKENS+C-1, inside the range
  the model was trained on. Only RoPE decoders whose rotation we can
  reproduce are supported; ``auto`` (the default) falls back to recompute for the rest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mlpmem.corpus import SPLITS, Corpus, window_batches, windows
from mlpmem.errors import MlpmemError
from mlpmem.files import CONFIG, MANIFEST, check_disk_space, load_npy, read_json, save_npy, sha256_file
from mlpmem.folders import ADDED_SETTINGS, prepare_out
from mlpmem.manifest import clear_progress, finished_shards, read_manifest, save_shard_record, write_manifest
from mlpmem.models import DEFAULT_MODEL, dtype_name, load_model, logits_size, model_fingerprint, resolve_device, tokenizer_hash
from mlpmem.modeling.read_site import SITES, ReadSite, capture, parse_site, resolve_layer, run_captured

log = logging.getLogger(__name__)


@dataclass
class DatastoreConfig:
    model: str = DEFAULT_MODEL
    split: str = "train"
    layer: int = -1  # decoder layer of the key; negative counts from the end
    site: str = "ffn_input"  # "ffn_input" (kNN-LM key) or "output"
    extra_sites: list[str] = field(default_factory=list)  # more hidden states to store, as "LAYER:SITE"
    lm_logprob: bool = False  # also store the LM's log-prob of each next token (for scoring splits)
    context: int = 512
    stride: int = 256
    batch_size: int = 8  # windows per forward call
    batch_tokens: int | None = None  # tokens per forward call instead (batch_size = batch_tokens // context): the size a GPU takes
    windows_per_shard: int = 256  # cache mode splits a shard into lanes: long shards make long lanes (see LANE_WINDOWS)
    dtype: str = "float32"  # "auto" resolves (models.resolve_device) before it is recorded: config.json holds what ran
    # "recompute" | "cache" (carry the KV cache across windows: 1.7x faster on SmolLM2, perplexity within 0.3%)
    # | "auto": the mode the folder was made in, else cache where the model supports it (see build_datastore)
    mode: str = "auto"
    # put the tokenizer's <bos> in front of every window (models trained with it first, e.g. Gemma, score much worse
    # without it); windows then hold context - 1 corpus tokens. Scoring against this datastore uses the same prefix
    bos: bool = False

    def problems(self) -> list[str]:
        from mlpmem.typed_config import need, one_of, positive

        bad_sites = []
        for text in self.extra_sites:
            layer, _, site = str(text).partition(":")
            if not layer.lstrip("-").isdigit() or (site or "output") not in SITES:
                bad_sites.append(text)
        return (
            need(isinstance(self.model, str) and self.model != "", "model", "must name a model")
            + one_of(self, "split", SPLITS)
            + one_of(self, "site", SITES)
            + one_of(self, "mode", MODES)
            + one_of(self, "dtype", ("auto", "float32", "bfloat16", "float16"))
            + positive(self, "context", "stride", "batch_size", "windows_per_shard")
            + positive(self, "batch_tokens", allow_none=True)
            + need(
                not (self.context and self.stride) or self.stride <= self.context,
                "stride",
                f"must not exceed the context ({self.context}), got {self.stride}",
            )
            + need(not bad_sites, "extra_sites", f"entries must read LAYER:SITE with SITE in {SITES}, got {bad_sites}")
        )


MODES = ("auto", "recompute", "cache")
SINK_TOKENS = 4  # first tokens of each lane kept in the cache (attention sinks); see the module docstring
# cache mode: a forward call feeds `lanes` chunks of S tokens, where a recompute batch feeds batch_size windows of
# C tokens; lanes = batch_size * C // S keeps the tokens per call (and the memory) the same, and that size
# matters on CPU ([16, 256] steps ran 26% faster than [8, 256]). Each lane's first window costs C tokens
# instead of S, so lanes should be long: a block (one batch) holds up to lanes * LANE_WINDOWS windows, and
# build_datastore's shards (the unit of resume) are as long as a block by default
LANE_WINDOWS = 16
# decoders whose attention applies Llama-style RoPE (rotate_half) to all of each head's dims, with the
# post-RoPE keys in a DynamicCache: re-basing cached keys is one more rotation for these
_ROPE_MODELS = ("llama", "mistral", "qwen2", "qwen3")
_STATIC_ROPE = ("default", "linear", "llama3")  # inv_freq does not depend on the sequence length


@dataclass
class Batch:
    row_start: int  # first datastore row in this batch
    row_end: int
    features: dict[str, "object"]  # name -> float tensor [row_end - row_start, d]
    lm_logprob: "object | None"  # float32 tensor [n] or None
    labels: np.ndarray  # int32 [n], the next tokens
    seconds: float  # wall time of the forward pass


def cache_mode_problem(model, context: int, stride: int) -> str | None:
    """Why the KV-cache mode cannot run ``model`` with these windows, or None when it can."""
    cfg = model.config.get_text_config()
    if stride >= context:
        return "windows do not overlap (stride == context): there is nothing to carry"
    if cfg.model_type not in _ROPE_MODELS:
        return f"model type {cfg.model_type!r} is not a RoPE decoder this mode knows ({', '.join(_ROPE_MODELS)})"
    rot = getattr(model.get_decoder(), "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        return "the model has no single rotary embedding with inv_freq"
    if getattr(rot, "rope_type", "default") not in _STATIC_ROPE:
        return f"RoPE type {rot.rope_type!r} is not a plain rotation with fixed frequencies"
    if getattr(rot, "attention_scaling", 1.0) != 1.0:
        return "the RoPE attention scaling is not 1 (a second rotation would apply it twice)"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "the model has sliding-window or non-attention layers"
    sliding = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if sliding is not None and sliding < context + SINK_TOKENS:
        return f"its sliding window {sliding} is shorter than the cache ({context + SINK_TOKENS})"
    if context + SINK_TOKENS > getattr(cfg, "max_position_embeddings", context + SINK_TOKENS):
        return f"context {context} + {SINK_TOKENS} sink tokens exceed the model's {cfg.max_position_embeddings} positions"
    if model.config._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {model.config._attn_implementation!r} is untested with a re-based cache"
    return None


def resolve_mode(model, mode: str, context: int, stride: int) -> str:
    """``auto`` -> "cache" where supported, else "recompute"; an explicit "cache" that cannot run is an error."""
    if mode not in MODES:
        raise MlpmemError(f"unknown extraction mode {mode!r}", f"choose one of {MODES}")
    if mode == "recompute":
        return mode
    problem = cache_mode_problem(model, context, stride)
    if problem is None:
        return "cache"
    if mode == "cache":
        raise MlpmemError(f"extraction mode 'cache' cannot run here: {problem}", "use mode 'auto' or 'recompute'")
    log.info("extraction falls back to recompute: %s", problem)
    return "recompute"


class Extractor:
    """Runs a frozen LM over the scoring windows of a token stream and yields, batch by batch and in
    row order, the kept positions' hidden states at hooked sites and (on request) the LM's log-prob
    of each next token. Two implementations: :class:`RecomputeExtractor` and :class:`CacheExtractor`
    (see the module docstring); :func:`make_extractor` picks one from a mode name.

    ``prefix``: token ids put in front of every window (e.g. ``(bos,)`` for models such as Gemma that
    were trained with <bos> first and score much worse without it); windows then hold
    ``context - len(prefix)`` stream tokens, and the prefix's own positions are never rows.
    """

    mode = ""

    def __init__(self, model, context: int, stride: int, batch_size: int = 8, prefix: tuple[int, ...] = ()) -> None:
        self.model, self.context, self.stride, self.batch_size, self.prefix = (
            model,
            context,
            stride,
            batch_size,
            tuple(int(t) for t in prefix),
        )
        if not 0 < stride <= context - len(self.prefix):
            raise MlpmemError(
                f"a prefix of {len(self.prefix)} tokens leaves windows of {context - len(self.prefix)} stream tokens, "
                f"shorter than the stride {stride}",
                "use a shorter stride or a longer context",
            )

    def windows(self, n_tokens: int) -> np.ndarray:
        """[n_windows, 3] (begin, end, first kept) over the stream (corpus.windows with the prefix's room taken out)."""
        return windows(n_tokens, self.context - len(self.prefix), self.stride)

    def batches(
        self, tokens: np.ndarray, sites: dict[str, ReadSite], want_logprob: bool = False, window_range: tuple[int, int] | None = None
    ) -> Iterator[Batch]:
        """Batches over the windows ``window_range`` (all by default). Without ``want_logprob`` the forward
        stops after the deepest hooked layer (no later layers, no logits)."""
        W = self.windows(len(tokens))
        lo, hi = window_range or (0, len(W))
        return self._batches(_torch_tokens(tokens), W[lo:hi], sites, want_logprob)

    def _batches(self, tok_t, W: np.ndarray, sites: dict[str, ReadSite], want_logprob: bool) -> Iterator[Batch]:
        raise NotImplementedError


class RecomputeExtractor(Extractor):
    """Every window from scratch (C/S forwards per token); consecutive windows of equal length are batched."""

    mode = "recompute"

    def _batches(self, tok_t, W, sites, want_logprob):
        return _iter_recompute(self.model, tok_t, W, sites, self.batch_size, want_logprob, self.prefix)

    def features(self, tok_t, W: np.ndarray, sites: dict[str, ReadSite]) -> dict[str, object]:
        """Hidden states [rows, d] per site of the kept rows of windows ``W``: rows of :meth:`windows` in order,
        not necessarily consecutive (a window recomputed needs no other), concatenated window by window."""
        import torch

        parts = [_recompute_group(self.model, tok_t, group, sites, False, self.prefix)[0] for group in window_batches(W, self.batch_size)]
        return {name: torch.cat([h for feats in parts for h in feats[name]]) for name in sites}


class CacheExtractor(Extractor):
    """The KV cache carried across windows, with attention sinks (RoPE decoders; see :func:`cache_mode_problem`).
    In cache mode the windows of a range are cut into blocks of ``lanes * LANE_WINDOWS`` windows
    (``lanes = batch_size * context // stride``), one batch each: the result depends on the range, so
    callers that must reproduce rows (resume) pass the same ranges."""

    mode = "cache"

    def __init__(self, model, context: int, stride: int, batch_size: int = 8, prefix: tuple[int, ...] = ()) -> None:
        super().__init__(model, context, stride, batch_size, prefix)
        if self.prefix:
            raise MlpmemError(
                "extraction mode 'cache' takes no prefix (its attention sinks are the lane's first tokens)",
                "use mode 'recompute' with a prefix",
            )
        problem = cache_mode_problem(model, context, stride)
        if problem:
            raise MlpmemError(f"extraction mode 'cache' cannot run here: {problem}", "use mode 'recompute'")

    def _batches(self, tok_t, W, sites, want_logprob):
        context, stride = self.context, self.stride
        # only the stream's last window can be shorter than the context: it runs on its own, from scratch
        short = len(W) and W[-1, 1] - W[-1, 0] < context
        full = W[:-1] if short else W
        lanes = max(1, self.batch_size * context // stride)
        for a in range(0, len(full), lanes * LANE_WINDOWS):
            yield _cached_block(self.model, tok_t, full[a : a + lanes * LANE_WINDOWS], context, stride, sites, lanes, want_logprob)
        if short:
            yield from _iter_recompute(self.model, tok_t, W[-1:], sites, 1, want_logprob)


EXTRACTORS = {"recompute": RecomputeExtractor, "cache": CacheExtractor}


def make_extractor(model, mode: str, context: int, stride: int, batch_size: int = 8, prefix: tuple[int, ...] = ()) -> Extractor:
    """The extractor of ``mode`` (recompute | cache | auto: cache where the model supports it and there is no prefix)."""
    if mode == "auto" and prefix:
        mode = "recompute"
    mode = resolve_mode(model, mode, context, stride)
    return EXTRACTORS[mode](model, context, stride, batch_size, prefix)


def iter_batches(
    model,
    tokens: np.ndarray,
    context: int,
    stride: int,
    sites: dict[str, ReadSite],
    batch_size: int,
    want_logprob: bool,
    window_range: tuple[int, int] | None = None,
    mode: str = "recompute",
    prefix: tuple[int, ...] = (),
) -> Iterator[Batch]:
    """``make_extractor(model, mode, ...).batches(tokens, sites, want_logprob, window_range)``: see :class:`Extractor`.
    ``mode`` is "recompute" or "cache" (resolve "auto" with :func:`resolve_mode` first)."""
    if mode not in EXTRACTORS:
        raise MlpmemError(f"iter_batches takes mode 'recompute' or 'cache', not {mode!r}", "resolve 'auto' with resolve_mode()")
    yield from EXTRACTORS[mode](model, context, stride, batch_size, prefix).batches(tokens, sites, want_logprob, window_range)


def _torch_tokens(tokens: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(tokens, dtype=np.int64))


def window_ids(tok_t, group: np.ndarray, prefix: tuple[int, ...] = ()):
    """Input ids [B, len(prefix) + L] of a batch of equal-length windows (rows (begin, end, ...) of ``group``), ``prefix`` first."""
    import torch

    pre = torch.tensor(prefix, dtype=tok_t.dtype)
    return torch.stack([torch.cat([pre, tok_t[b:e]]) if prefix else tok_t[b:e] for b, e, *_ in group])


def _iter_recompute(
    model, tok_t, W: np.ndarray, sites: dict[str, ReadSite], batch_size: int, want_logprob: bool, prefix: tuple[int, ...] = ()
) -> Iterator[Batch]:
    """Every window from scratch, ``prefix`` in front of each; consecutive windows of equal length are batched."""
    import torch

    for group in window_batches(W, batch_size):
        t0 = time.perf_counter()
        feats, lps = _recompute_group(model, tok_t, group, sites, want_logprob, prefix)
        seconds = time.perf_counter() - t0
        row_start, row_end = int(group[0, 2]), int(min(group[-1, 1], len(tok_t) - 1))
        yield Batch(
            row_start,
            row_end,
            {n: torch.cat(v) for n, v in feats.items()},
            torch.cat(lps) if want_logprob else None,
            tok_t[row_start + 1 : row_end + 1].numpy().astype(np.int32),
            seconds,
        )


def _recompute_group(model, tok_t, group: np.ndarray, sites: dict[str, ReadSite], want_logprob: bool, prefix: tuple[int, ...]):
    """One forward over windows of one length (rows of :func:`windows`, consecutive or not): per site, the kept
    positions' hidden states of each window, and (``want_logprob``) their next tokens' log-probs, window by window."""
    import torch

    p = len(prefix)
    ids = window_ids(tok_t, group, prefix).to(model.device)
    stops = np.minimum(group[:, 1], len(tok_t) - 1)
    keep = int((group[:, 1] - group[:, 2]).max())  # kept positions lie in the last `keep` of each window
    with torch.inference_mode(), capture(model, list(sites.values()), stop_early=not want_logprob) as store:
        out = run_captured(model, input_ids=ids, use_cache=False, **({"logits_to_keep": keep} if want_logprob else {}))
    feats: dict[str, list] = {name: [] for name in sites}
    lps = []
    for w, (b, e, k) in enumerate(group):
        s, t = k - b, stops[w] - b  # local positions kept (in the window without the prefix)
        for name, site in sites.items():
            feats[name].append(store[site][w, s + p : t + p])
        if want_logprob:  # logits of the last `keep` positions: the prefix shifts both ends alike
            lps.append(_gather_logprob(out.logits[w, s - (e - b) + keep : t - (e - b) + keep], tok_t[k + 1 : stops[w] + 1]))
    return feats, lps


def _gather_logprob(logits, y):
    import torch

    return torch.log_softmax(logits.float(), -1).gather(-1, y[:, None].to(logits.device))[:, 0]


def _rebase(cache, n_sink: int, keep: int, inv_freq) -> None:
    """Keep the first ``n_sink`` and the last ``keep`` cached tokens of every layer, the latter rotated
    back so that they sit right after the sinks (cache index == RoPE position, always)."""
    import torch

    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
            continue  # a layer past the early stop never runs
        n = layer.keys.shape[-2]
        if n == n_sink + keep:
            continue
        # RoPE is a rotation by position * inv_freq on each (i, i + d/2) pair: R(a) R(b) = R(a + b)
        freqs = float(n_sink - (n - keep)) * inv_freq.float()
        emb = torch.cat((freqs, freqs))
        cos, sin = emb.cos(), emb.sin()
        tail = layer.keys[:, :, n - keep :].float()
        half = tail.shape[-1] // 2
        tail = tail * cos + torch.cat((-tail[..., half:], tail[..., :half]), -1) * sin
        layer.keys = torch.cat([layer.keys[:, :, :n_sink], tail.to(layer.keys.dtype)], -2)
        layer.values = torch.cat([layer.values[:, :, :n_sink], layer.values[:, :, n - keep :]], -2)


def _cached_block(
    model, tok_t, W: np.ndarray, context: int, stride: int, sites: dict[str, ReadSite], lanes: int, want_logprob: bool
) -> Batch:
    """Full-length windows ``W`` as up to ``lanes`` contiguous lanes sharing one batched KV cache.

    Lane j's first window runs whole (positions 0..C-1); each later window feeds
    only its new tokens (tokens[prev_end:end], S of them) at positions
    n_sink+C-S.. after a cache of n_sink sinks + the previous C-S tokens. Lanes
    are longest first, so the lanes still running at a step are a prefix of the
    batch and a finished lane is dropped by slicing the cache. The first windows run in groups of
    ``lanes * S // C`` lanes (as many tokens as a later step) whose caches are then stacked.
    """
    import torch

    n_tokens = len(tok_t)
    # the first windows feed C tokens a lane where later steps feed S: they run in groups of no more tokens than
    # a later step (lanes * S), each group with its own cache, stacked after. On CPU one [16, 512] call took 1.5x
    # the time of two [8, 512] calls in the MLP (4x in its elementwise ops), probably because its 50 MB activations
    # lie above glibc's 32 MB mmap threshold and are page-faulted anew every call. SmolLM2 keys came out bit-identical
    # to one call (keys, layer 3 outputs, log-probs; 4-8k tokens at batch 1 and 8; tests compare to lanes run alone)
    group = max(1, lanes * stride // context)
    lanes = np.array_split(np.arange(len(W)), max(1, min(lanes, len(W))))  # sizes differ by <= 1, longest first
    n_sink, keep_ctx = min(SINK_TOKENS, stride), context - stride
    inv_freq = model.get_decoder().rotary_emb.inv_freq
    stops = np.minimum(W[:, 1], n_tokens - 1)
    row0, row1 = int(W[0, 2]), int(stops[-1])
    feats, lp = {name: None for name in sites}, None  # allocated on the first step, inside inference mode
    cache = None
    seconds = 0.0
    for step in range(len(lanes[0])):
        active = [lane[step] for lane in lanes if step < len(lane)]
        k = len(active)
        if step == 0:
            starts, pos0, size = W[active, 0], 0, group  # whole first windows
        else:
            starts, pos0, size = W[[w - 1 for w in active], 1], n_sink + keep_ctx, k  # new tokens only: the previous window's end onwards
            for layer in cache.layers:
                if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.shape[0] > k:
                    layer.keys, layer.values = layer.keys[:k], layer.values[:k]
        ends = W[active, 1]
        length = int(ends[0] - starts[0])  # the same for every lane: all windows are full
        ids = torch.stack([tok_t[a : a + length] for a in starts]).to(model.device)
        local = W[active, 2] - starts  # kept rows of each lane, relative to its chunk
        n_keep = int(length - local.min())
        position_ids = torch.arange(pos0, pos0 + length, device=model.device)[None]  # the same for every lane (broadcast)
        t0 = time.perf_counter()
        with torch.inference_mode():
            parts = []
            for g in range(0, k, size):
                part = cache if step else _new_cache(model)
                with capture(model, list(sites.values()), stop_early=not want_logprob) as store:
                    out = run_captured(
                        model,
                        input_ids=ids[g : g + size],
                        position_ids=position_ids,
                        past_key_values=part,
                        use_cache=True,
                        **({"logits_to_keep": n_keep} if want_logprob else {}),
                    )
                parts.append(part)
                for j in range(g, min(g + size, k)):
                    w = active[j]
                    s, t = int(local[j]), int(stops[w] - starts[j])
                    r = slice(int(W[w, 2]) - row0, int(stops[w]) - row0)
                    for name, site in sites.items():
                        h = store[site]
                        if feats[name] is None:
                            feats[name] = torch.empty(row1 - row0, h.shape[-1], dtype=h.dtype, device=h.device)
                        feats[name][r] = h[j - g, s:t]
                    if want_logprob:
                        if lp is None:
                            lp = torch.empty(row1 - row0, device=out.logits.device)
                        lp[r] = _gather_logprob(
                            out.logits[j - g, s - length + n_keep : t - length + n_keep], tok_t[W[w, 2] + 1 : stops[w] + 1]
                        )
            cache = _stack_caches(parts)
            _rebase(cache, n_sink, keep_ctx, inv_freq)
        seconds += time.perf_counter() - t0
    return Batch(row0, row1, feats, lp, tok_t[row0 + 1 : row1 + 1].numpy().astype(np.int32), seconds)


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _stack_caches(parts: list) -> object:
    """One cache holding the lanes of ``parts`` (caches of the same layers and lengths) in order: the first, extended."""
    import torch

    for i, layer in enumerate(parts[0].layers):
        if len(parts) > 1 and getattr(layer, "is_initialized", False) and layer.keys is not None:
            layer.keys = torch.cat([c.layers[i].keys for c in parts])
            layer.values = torch.cat([c.layers[i].values for c in parts])
    return parts[0]


def window_prefix(tok, bos: bool) -> tuple[int, ...]:
    """The token ids put in front of every window: ``(bos,)`` when asked for, else none."""
    if not bos:
        return ()
    if getattr(tok, "bos_token_id", None) is None:
        raise MlpmemError(
            "datastore.bos puts the tokenizer's <bos> in front of every window, but this tokenizer has no bos token",
            "set bos: false for this model",
        )
    return (int(tok.bos_token_id),)


def windows_per_batch(cfg: DatastoreConfig) -> int:
    """Windows per forward call: ``batch_tokens // context`` when batch_tokens is set, else batch_size."""
    return max(1, cfg.batch_tokens // cfg.context) if cfg.batch_tokens else cfg.batch_size


def _sites(model, cfg: DatastoreConfig) -> tuple[ReadSite, dict[str, ReadSite]]:
    if cfg.site not in SITES:
        raise MlpmemError(f"unknown site {cfg.site!r}", f"choose one of {SITES}")
    key = ReadSite(resolve_layer(model, cfg.layer), cfg.site)
    sites = {"keys": key}
    for text in cfg.extra_sites:
        layer, site = parse_site(text)
        if site not in SITES:
            raise MlpmemError(f"unknown site {site!r} in {text!r}", f"choose one of {SITES}")
        s = ReadSite(resolve_layer(model, layer), site)
        sites[feature_name(s.layer, s.site)] = s
    return key, sites


def folder_mode(out_dir: Path) -> str | None:
    """The extraction mode setting an existing datastore folder was made with (None when there is none to read)."""
    path = Path(out_dir) / CONFIG
    try:
        recorded = read_json(path)["config"]
    except (MlpmemError, KeyError, TypeError):  # no folder yet, or not a datastore's: prepare_out decides
        return None
    mode = recorded.get("mode", ADDED_SETTINGS["datastore"]["config.mode"]) if isinstance(recorded, dict) else None
    return mode if mode in MODES else None


def check_context_fits(model, context: int, model_name: str, setting: str = "context") -> None:
    """Refuse windows longer than the model's positions, naming the ``setting`` to change."""
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_pos and context > max_pos:
        raise MlpmemError(
            f"{setting} {context} is longer than the {max_pos} positions {model_name!r} supports",
            f"set {setting} to at most {max_pos} (and the stride below it)",
        )


def build_datastore(
    corpus_dir: Path, out_dir: Path, cfg: DatastoreConfig, model_bundle=None, overwrite: bool = False, device: str = "auto"
) -> Path:
    """Extract keys/values for ``cfg.split`` of a corpus into ``out_dir`` (resumable).

    ``model_bundle`` is an optional already-loaded ``(model, tokenizer, model_id)``
    (it runs where it was placed, and ``device`` is ignored). ``device`` is where
    the LM runs: recorded in the manifest, not in config.json, so a folder built
    on one device stays done when rerun on another.

    Under torchrun / accelerate launch (see mlpmem.dist) each process extracts every
    N-th shard; a shard is a fixed range of windows, so the files are the same for
    any number of processes and a run stopped with N processes resumes with M.
    """
    import dataclasses

    import torch
    from tqdm.auto import tqdm

    from mlpmem import dist
    from mlpmem.typed_config import validate

    out_dir = Path(out_dir)
    validate(cfg, "datastore")
    w = dist.init(device)
    device = dist.local_device(device)
    dev, dt = resolve_device(str(model_bundle[0].device) if model_bundle else device, cfg.dtype)
    cfg = dataclasses.replace(cfg, dtype=dtype_name(dt))  # "auto" is recorded as what it ran as
    corpus = Corpus(corpus_dir)
    model, tok, model_id = model_bundle or load_model(cfg.model, cfg.dtype, dev)
    check_context_fits(model, cfg.context, model_id)
    corpus.check_tokenizer(tokenizer_hash(tok), model_id)
    key, sites = _sites(model, cfg)
    prefix = window_prefix(tok, cfg.bos)
    # "auto" keeps a folder made in recompute (before "auto" was the default) in recompute: shards of two modes are
    # never mixed. Otherwise it runs as it resolves here and is recorded so, except in a folder that recorded "auto"
    # itself. A folder whose mode cannot run with this config (other windows, a prefix) differs in that config too:
    # prepare_out names the difference.
    kept = folder_mode(out_dir) if cfg.mode == "auto" and not overwrite else None
    extractor = make_extractor(
        model, "recompute" if kept == "recompute" else cfg.mode, cfg.context, cfg.stride, windows_per_batch(cfg), prefix
    )
    mode = extractor.mode
    cfg = dataclasses.replace(cfg, mode="auto" if kept == "auto" else mode)
    tokens = corpus.tokens(cfg.split)
    W = extractor.windows(len(tokens))
    n_rows = len(tokens) - 1
    d = model.config.get_text_config().hidden_size
    if n_rows < 1:
        raise MlpmemError(
            f"the {cfg.split} split of {corpus_dir} has {len(tokens)} token(s): nothing to predict",
            "build the corpus with more text in that split",
        )
    resolved = {
        "config": cfg,
        "corpus": str(Path(corpus_dir).resolve()),
        "corpus_manifest_sha256": sha256_file(Path(corpus_dir) / "manifest.json"),
        "model_id": model_id,
        "extract_mode": mode,
    }  # shards of two modes are never mixed on resume

    def claim() -> str:
        if not (out_dir / "manifest.json").exists() or overwrite:  # a finished datastore needs no more space
            check_disk_space(out_dir, n_rows * (2 * d * len(sites) + 4 + 4 * cfg.lm_logprob), "datastore")
        return prepare_out(out_dir, resolved, overwrite, kind="datastore")

    if dist.on_main(claim) == "done":
        log.info("datastore in %s is up to date", out_dir)
        return out_dir
    shard_windows = [(a, min(a + cfg.windows_per_shard, len(W))) for a in range(0, len(W), cfg.windows_per_shard)]
    mine = dist.my_items(len(shard_windows), w)
    done = finished_shards(out_dir, mine, "datastore")
    todo = [s for s in mine if s not in done]
    torch.manual_seed(0)
    bar = tqdm(
        total=sum(_shard_rows(W, shard_windows[s], len(tokens)) for s in todo),
        unit="tok",
        desc=f"datastore {cfg.split}",
        dynamic_ncols=True,
        disable=not w.main,
    )
    t0, new_rows = time.perf_counter(), 0
    copies = _HostCopies()
    with _ShardWriter(out_dir) as writer:  # shard s is written while shard s+1 is extracted
        for s in todo:
            a, b = shard_windows[s]
            start, end = _shard_rows_range(W, (a, b), len(tokens))
            arrays = {name: np.empty((end - start, d), np.float16) for name in sites}
            arrays["values"] = np.empty(end - start, np.int32)
            if cfg.lm_logprob:
                arrays["lm_logprob"] = np.empty(end - start, np.float32)
            for batch in iter_batches(
                model, tokens, cfg.context, cfg.stride, sites, windows_per_batch(cfg), cfg.lm_logprob, (a, b), mode, prefix
            ):
                r0, r1 = batch.row_start - start, batch.row_end - start
                copies.put(
                    [(arrays[name][r0:r1], h, torch.float16) for name, h in batch.features.items()]
                    + ([(arrays["lm_logprob"][r0:r1], batch.lm_logprob, torch.float32)] if cfg.lm_logprob else [])
                )
                arrays["values"][r0:r1] = batch.labels
                bar.update(r1 - r0)
                new_rows += r1 - r0
                bar.set_postfix(tok_s=f"{new_rows / (time.perf_counter() - t0):.0f}")
            copies.flush()  # the shard's last batch is in its arrays before they go to the writer
            writer.put(s, start, end, arrays)
    bar.close()
    elapsed = time.perf_counter() - t0
    rates = dist.all_gather_objects((new_rows, elapsed))
    dist.barrier()  # every shard of every rank is on disk

    def finish() -> None:
        shards = finished_shards(
            out_dir, list(range(len(shard_windows))), "datastore"
        )  # every file the manifest will list is there and whole
        missing = [s for s in range(len(shard_windows)) if s not in shards]
        if missing:
            raise MlpmemError(f"datastore shards {missing[:5]} of {out_dir} were not written", "run the same command again to finish them")
        rows_run, secs = sum(r for r, _ in rates), max(t for _, t in rates)
        per_token: dict[str, float] = {}  # disk per corpus token of each array (keys, values, extra features...)
        for s in range(len(shard_windows)):
            for name, rec in shards[s]["arrays"].items():
                per_token[name] = per_token.get(name, 0.0) + rec["bytes"] / n_rows
        write_manifest(
            out_dir,
            "datastore",
            {
                "model_id": model_id,
                "tokenizer_hash": tokenizer_hash(tok),
                "layer": key.layer,
                "site": key.site,
                "model_fingerprint": model_fingerprint(model),  # memories trained on these keys record it (models.memory_base_fingerprint)
                "features": {name: {"layer": s.layer, "site": s.site} for name, s in sites.items()},
                "d": d,
                "vocab_size": logits_size(model),
                "n_rows": n_rows,
                "split": cfg.split,
                "context": cfg.context,
                "stride": cfg.stride,
                "n_windows": len(W),
                "extract_mode": mode,
                "windows_per_batch": windows_per_batch(cfg),
                **({"prefix": list(prefix)} if prefix else {}),
                **(
                    {
                        "sink_tokens": min(SINK_TOKENS, cfg.stride),
                        "lanes": windows_per_batch(cfg) * cfg.context // cfg.stride,
                        "max_block_windows": windows_per_batch(cfg) * cfg.context // cfg.stride * LANE_WINDOWS,
                    }
                    if mode == "cache"
                    else {}
                ),
                "key_dtype": "float16",
                "value_dtype": "int32",
                "corpus": resolved["corpus"],
                "corpus_hash": corpus.manifest["corpus_hash"],
                "rows": "row i = position i of the split's token stream; value = token i+1; document = corpus doc_index[i]",
                "extract_tokens_per_s": rows_run / secs if rows_run and secs else None,
                "torch_threads": torch.get_num_threads(),
                "device": str(model.device),
                "dtype": cfg.dtype,  # where it ran (not part of the config: see build_datastore)
                "processes": w.size,
                "bytes_per_token": {**per_token, "total": sum(per_token.values())},
                "shards": [shards[s] for s in range(len(shard_windows))],
            },
        )
        clear_progress(out_dir)

    dist.on_main(finish)
    log.info("datastore: %d rows of d=%d at layer %d (%s), %s mode, in %s", n_rows, d, key.layer, key.site, mode, out_dir)
    return out_dir


def _shard_rows_range(W: np.ndarray, shard: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """Datastore rows [start, end) of the windows ``shard`` = (first, last + 1)."""
    a, b = shard
    return int(W[a, 2]), int(min(W[b - 1, 1], n_tokens - 1))


def _shard_rows(W: np.ndarray, shard: tuple[int, int], n_tokens: int) -> int:
    start, end = _shard_rows_range(W, shard, n_tokens)
    return end - start


class _HostCopies:
    """Moves each batch's outputs into the shard's host arrays one batch late.

    A batch's tensors are cast where they live (on a GPU that halves the bytes to move) and
    copied to the host with ``non_blocking``: from a GPU, torch copies into pinned memory from
    its caching host allocator, so the copy runs while the next batch's forward is queued, and
    its event is waited for only when that next batch arrives (or before the shard goes to the
    writer thread). On a CPU the same code runs, with nothing to wait for.
    """

    def __init__(self) -> None:
        self.pending: list = []
        self.event = None

    def put(self, items: list) -> None:
        """``items``: (host array view, tensor, dtype) triples; the views are filled by the next put or flush."""
        import torch

        # copy=True: a fresh tensor even where the cast is a no-op, since the extractor may reuse its buffers
        staged = [(dst, t.to(dtype, copy=True).to("cpu", non_blocking=True)) for dst, t, dtype in items]
        event = None
        if any(t.is_cuda for _, t, _ in items):
            event = torch.cuda.Event()
            event.record()
        self.flush()
        self.pending, self.event = staged, event

    def flush(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        for dst, host in self.pending:
            dst[...] = host.numpy()
        self.pending, self.event = [], None


class _ShardWriter:
    """Writes finished shards on a background thread, one at a time, so that the next shard's
    forward passes run while the last one goes to disk; at most one shard waits in memory."""

    def __init__(self, out_dir: Path) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.out_dir = out_dir
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datastore-writer")
        self.pending = None

    def put(self, s: int, start: int, end: int, arrays: dict[str, np.ndarray]) -> None:
        self.wait()
        self.pending = self.pool.submit(self._write, s, start, end, arrays)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()  # a write error (full disk) surfaces here, in the main thread
            self.pending = None

    def _write(self, s: int, start: int, end: int, arrays: dict[str, np.ndarray]) -> None:
        records = {name: save_npy(self.out_dir / f"{name}-{s:05d}.npy", arr) for name, arr in arrays.items()}
        save_shard_record(self.out_dir, s, {"start": start, "end": end, "arrays": records})

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
            elif self.pending is not None:
                self.pending.exception()  # let an interrupted write finish (files are written atomically)
        finally:
            self.pool.shutdown(wait=True)


# ---------------------------------------------------------------- read side: sharded, row-aligned arrays
#
# A sharded stage (the datastore, the kNN targets) lists its shards in its manifest as
# ``{"start": int, "end": int, "arrays": {name: file record}}``; rows of every array in a shard are global rows
# ``start..end-1``. Several processes can each write their own shards; one manifest then lists them all.


class ShardedArrays:
    """Row-aligned arrays split into shards, opened as memory maps."""

    # arrays whose files must all be there (others may have been removed as a whole: ``absent``)
    REQUIRED: tuple[str, ...] = ()

    def __init__(self, folder: Path, kind: str, verify: bool = False) -> None:
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = read_manifest(self.folder, kind)
        self.starts = np.array([s["start"] for s in self.manifest["shards"]], dtype=np.int64)
        self.ends = np.array([s["end"] for s in self.manifest["shards"]], dtype=np.int64)
        self.n_rows = int(self.manifest["n_rows"])
        if len(self.starts) == 0 or self.starts[0] != 0 or self.ends[-1] != self.n_rows or np.any(self.starts[1:] != self.ends[:-1]):
            raise MlpmemError(
                f"the shards listed in {self.folder}/manifest.json do not cover rows 0..{self.n_rows} contiguously",
                f"delete {self.folder} and run the stage again",
            )
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._resident: dict[str, np.ndarray] = {}
        # an array whose files are *all* gone was removed on purpose (e.g. the keys, once an index
        # that needs none and the targets are built): the rest stays readable. One missing shard is damage.
        self.absent = sorted(
            name
            for name in {n for s in self.manifest["shards"] for n in s["arrays"]}
            if name not in self.REQUIRED
            and not any((self.folder / s["arrays"][name]["file"]).exists() for s in self.manifest["shards"] if name in s["arrays"])
        )
        for shard in self.manifest["shards"]:
            for name, record in shard["arrays"].items():
                if name in self.absent:
                    continue
                arr = load_npy(self.folder, record, verify=verify)
                if arr.shape[0] != shard["end"] - shard["start"]:
                    raise MlpmemError(
                        f"{self.folder / record['file']} has {arr.shape[0]} rows, its shard covers {shard['end'] - shard['start']}",
                        f"delete {self.folder} and run the stage again",
                    )
                self._arrays.setdefault(name, []).append(arr)

    def removed_for(self, name: str, out_dir: Path, overwrite: bool) -> bool:
        """Whether array ``name`` was removed while a stage writing ``out_dir`` still has to read it.
        A finished stage (its manifest there, not overwritten) is not rebuilt, so it stays done
        without the array (the keys, once index.keep_keys: false removed them)."""
        return name in self.absent and (overwrite or not (Path(out_dir) / MANIFEST).exists())

    @property
    def names(self) -> list[str]:
        return list(self._arrays)

    def shards(self, name: str) -> list[np.ndarray]:
        if name in self.absent:
            raise MlpmemError(
                f"the {name!r} files of {self.folder} were removed",
                f"rebuild {self.folder}, or (for the keys) search with an index that reads none (rerank: false, not kind keys)",
            )
        if name not in self._arrays:
            raise MlpmemError(
                f"{self.folder} has no array named {name!r} (it has {self.names})", "rebuild it with the setting that stores it"
            )
        return self._arrays[name]

    def load(self, name: str) -> np.ndarray:
        """The whole array in memory (for small arrays such as values)."""
        return np.concatenate([np.asarray(a) for a in self.shards(name)])

    def iter_blocks(self, name: str, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, block)`` over the array in order, ``block_rows`` at most."""
        for start, arr in zip(self.starts, self.shards(name)):
            for i in range(0, arr.shape[0], block_rows):
                yield int(start + i), np.asarray(arr[i : i + block_rows])

    def rows(self, name: str, start: int, end: int) -> np.ndarray:
        """Rows ``start..end-1`` (may span shards)."""
        out = []
        for s, e, arr in zip(self.starts, self.ends, self.shards(name)):
            lo, hi = max(start, s), min(end, e)
            if lo < hi:
                out.append(np.asarray(arr[lo - s : hi - s]))
        return np.concatenate(out) if out else np.empty((0,) + self.shards(name)[0].shape[1:], self.shards(name)[0].dtype)

    RESIDENT_BYTES = 2 << 30

    def gather(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows by global id, any shape of ``ids``: returns ``ids.shape + row shape``."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.n_rows):
            raise IndexError(f"row ids out of range 0..{self.n_rows - 1}")
        # random reads from a memory map cost a page fault each; an array that fits
        # comfortably in RAM is read once and gathered from memory (many times faster)
        if name not in self._resident and sum(a.nbytes for a in self.shards(name)) <= self.RESIDENT_BYTES:
            self._resident[name] = self.load(name)
        if name in self._resident:
            return self._resident[name][ids]
        shard_of = np.searchsorted(self.starts, flat, side="right") - 1
        first = self.shards(name)[0]
        out = np.empty((flat.size,) + first.shape[1:], dtype=first.dtype)
        for s in np.unique(shard_of):
            sel = shard_of == s
            local = flat[sel] - self.starts[s]
            order = np.argsort(local)  # sorted reads are much kinder to a memory map
            out_idx = np.nonzero(sel)[0][order]
            out[out_idx] = self.shards(name)[s][local[order]]
        return out.reshape(ids.shape + first.shape[1:])


class Datastore(ShardedArrays):
    """The (key -> next token) datastore: arrays ``keys`` [N, d] float16 and ``values`` [N] int32."""

    REQUIRED = ("values",)

    def __init__(self, folder: Path, verify: bool = False) -> None:
        super().__init__(folder, "datastore", verify=verify)
        m = self.manifest
        self.d = int(m["d"])
        self.layer = int(m["layer"])
        self.site = str(m["site"])
        self.model_id = str(m["model_id"])
        self.tokenizer_hash = str(m["tokenizer_hash"])
        self.vocab_size = int(m["vocab_size"])

    def values(self) -> np.ndarray:
        return self.load("values")

    def check_model(self, model_id: str, tokenizer_hash: str, layer: int | None = None, site: str | None = None) -> None:
        """Refuse a datastore built with another model or tokenizer than the one in use."""
        if tokenizer_hash != self.tokenizer_hash:
            raise MlpmemError(
                f"the datastore in {self.folder} was built with the tokenizer of {self.model_id!r}, which differs from the tokenizer of {model_id!r}",
                "use the same model as the datastore, or build a new datastore with this model",
            )
        if model_id != self.model_id:
            raise MlpmemError(
                f"the datastore in {self.folder} was built with model {self.model_id!r}, not {model_id!r}",
                "use the same model as the datastore, or build a new datastore with this model",
            )
        if layer is not None and (layer, site) != (self.layer, self.site):
            raise MlpmemError(
                f"the datastore in {self.folder} holds keys from layer {self.layer} ({self.site}), not layer {layer} ({site})",
                "use the datastore's layer, or build a new datastore for this layer",
            )


def feature_name(layer: int, site: str) -> str:
    """Name of an extra hidden-state array in a datastore, e.g. ``h29.output``."""
    return f"h{layer}.{site}"
