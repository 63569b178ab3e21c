import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mlpmem.corpus import Corpus, CorpusConfig, build_corpus, windows
from mlpmem.datastore import SINK_TOKENS, DatastoreConfig, _cached_block, _rebase, build_datastore, iter_batches, resolve_mode
from mlpmem.errors import MlpmemError
from mlpmem.models import load_model
from mlpmem.modeling.read_site import ReadSite, capture
from mlpmem.datastore import Datastore


@pytest.fixture
def corpus_dir(tmp_path, tiny_llama, tiny_corpus_file):
    return build_corpus(tmp_path / "corpus", CorpusConfig(source=str(tiny_corpus_file), model=str(tiny_llama), train_tokens=1200))


def assert_fp16_close(stored: np.ndarray, ref: torch.Tensor) -> None:
    """``stored`` (float16) is ``ref`` (float32) rounded to float16, give or take one rounding step."""
    ref = ref.float()
    got = torch.from_numpy(np.asarray(stored, dtype=np.float32))
    torch.testing.assert_close(got, ref, rtol=torch.finfo(torch.float16).eps, atol=torch.finfo(torch.float16).tiny)


def _cfg(model, **kw):
    base = dict(model=str(model), context=64, stride=24, batch_size=3, windows_per_shard=5)
    return DatastoreConfig(**{**base, **kw})


def test_keys_values_aligned_with_positions(tmp_path, tiny_llama, corpus_dir, torch_threads):
    out = build_datastore(corpus_dir, tmp_path / "ds", _cfg(tiny_llama, extra_sites=["0:output"], lm_logprob=True, mode="recompute"))
    ds = Datastore(out, verify=True)
    tokens = Corpus(corpus_dir).tokens("train")
    assert ds.n_rows == len(tokens) - 1  # every position once: no duplicates from overlapping windows
    assert np.array_equal(ds.values(), tokens[1:])  # value = next token
    assert len(ds.manifest["shards"]) > 2
    # key of a row equals the hidden state computed directly on that row's window
    model, _, _ = load_model(str(tiny_llama))
    W = windows(len(tokens), 64, 24)
    for b, e, k in W[[0, 3, len(W) - 1]]:
        with torch.no_grad(), capture(model, [ReadSite(1, "ffn_input"), ReadSite(0, "output")]) as got:
            out_ = model(input_ids=torch.from_numpy(tokens[b:e].astype(np.int64))[None])
        stop = min(e, len(tokens) - 1)
        # the datastore ran windows in batches of 3, the reference one window alone: another matrix shape may
        # take another kernel path, so equal within one float16 rounding step, not bit for bit
        ref = got[ReadSite(1, "ffn_input")][0, k - b : stop - b]
        assert_fp16_close(ds.rows("keys", k, stop), ref)
        assert_fp16_close(ds.rows("h0.output", k, stop), got[ReadSite(0, "output")][0, k - b : stop - b])
        lp = torch.log_softmax(out_.logits[0, k - b : stop - b], -1).gather(
            -1, torch.from_numpy(tokens[k + 1 : stop + 1].astype(np.int64))[:, None]
        )[:, 0]
        assert np.allclose(ds.rows("lm_logprob", k, stop), lp.numpy(), atol=1e-5)


@pytest.mark.parametrize("mode", ["recompute", "cache"])
def test_resume_after_crash_is_byte_identical(tmp_path, tiny_llama, corpus_dir, monkeypatch, mode):
    # cache mode: batch 1 -> 64 // 24 = 2 lanes of 4 windows per shard of 8
    cfg = _cfg(tiny_llama, mode=mode, **({"batch_size": 1, "windows_per_shard": 8} if mode == "cache" else {}))
    clean = build_datastore(corpus_dir, tmp_path / "clean", cfg)

    import mlpmem.datastore as dsmod

    real, calls = dsmod.save_shard_record, {"n": 0}

    def crash_after_two(folder, shard, record):  # the record of a finished shard
        real(folder, shard, record)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed between shards

    monkeypatch.setattr(dsmod, "save_shard_record", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(corpus_dir, tmp_path / "resumed", cfg)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(MlpmemError, match="interrupted"):
        Datastore(tmp_path / "resumed")
    monkeypatch.setattr(dsmod, "save_shard_record", real)
    # a half-written shard file left by a kill is overwritten, never trusted
    (tmp_path / "resumed" / "keys-00002.npy.partial").write_bytes(b"junk")
    build_datastore(corpus_dir, tmp_path / "resumed", cfg)
    for f in sorted(Path(clean).glob("*.npy")):
        assert f.read_bytes() == (tmp_path / "resumed" / f.name).read_bytes(), f.name


def test_wrong_tokenizer_is_refused(tmp_path, tiny_models, corpus_dir):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_models["gpt2"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zzzextra"])
    tok.save_pretrained(other)
    with pytest.raises(MlpmemError, match="tokenizer"):
        build_datastore(corpus_dir, tmp_path / "ds", _cfg(other))
    assert not (tmp_path / "ds").exists()


def test_model_mismatch_is_refused(tmp_path, tiny_llama, corpus_dir):
    ds = Datastore(build_datastore(corpus_dir, tmp_path / "ds", _cfg(tiny_llama)))
    with pytest.raises(MlpmemError, match="built with model"):
        ds.check_model("another-model", ds.tokenizer_hash)


def test_layer_out_of_range_writes_nothing(tmp_path, tiny_llama, corpus_dir):
    with pytest.raises(MlpmemError, match="out of range"):
        build_datastore(corpus_dir, tmp_path / "ds", _cfg(tiny_llama, layer=5))
    assert not (tmp_path / "ds").exists()


def test_not_enough_disk(tmp_path, tiny_llama, corpus_dir, monkeypatch):
    import mlpmem.files as man

    monkeypatch.setattr(man.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(MlpmemError, match="not enough disk space"):
        build_datastore(corpus_dir, tmp_path / "ds", _cfg(tiny_llama))
    assert not (tmp_path / "ds").exists()


def test_truncated_or_corrupt_npy(tmp_path, tiny_llama, corpus_dir):
    out = build_datastore(corpus_dir, tmp_path / "ds", _cfg(tiny_llama))
    f = out / "keys-00001.npy"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(MlpmemError, match="truncated"):
        Datastore(out)
    f.write_bytes(data[:-8] + b"\x00" * 8)  # same size: only a hash can tell (a small file's sampled hash covers it all)
    with pytest.raises(MlpmemError, match="corrupted"):
        Datastore(out)


# ---------------------------------------------------------------- cache mode (KV cache carried across windows)


def test_cache_mode_rows_aligned_and_deterministic(tmp_path, tiny_llama, corpus_dir):
    # context - stride = 40 >= the chunk of 24 new tokens; batch 1 -> 64 // 24 = 2 lanes of 4 windows per shard
    cfg = _cfg(tiny_llama, extra_sites=["0:output"], lm_logprob=True, mode="cache", batch_size=1, windows_per_shard=8)
    ds = Datastore(build_datastore(corpus_dir, tmp_path / "a", cfg), verify=True)
    tokens = Corpus(corpus_dir).tokens("train")
    assert ds.manifest["extract_mode"] == "cache" and ds.manifest["sink_tokens"] == SINK_TOKENS
    assert ds.n_rows == len(tokens) - 1
    assert np.array_equal(ds.values(), tokens[1:])
    assert np.isfinite(ds.rows("lm_logprob", 0, ds.n_rows)).all()
    ref = Datastore(
        build_datastore(corpus_dir, tmp_path / "r", _cfg(tiny_llama, extra_sites=["0:output"], lm_logprob=True, mode="recompute"))
    )
    assert ref.manifest["extract_mode"] == "recompute"
    # other contexts, so other keys, but close: the same tokens with at least C - S of context in both modes
    a, b = ds.rows("keys", 0, ds.n_rows).astype(np.float32), ref.rows("keys", 0, ref.n_rows).astype(np.float32)
    assert not np.array_equal(a, b)
    assert np.median(((a - b) ** 2).sum(-1)) < 0.05 * np.median((b**2).sum(-1))
    again = build_datastore(corpus_dir, tmp_path / "b", cfg)
    for f in sorted((tmp_path / "a").glob("*.npy")):
        assert f.read_bytes() == (again / f.name).read_bytes(), f.name


def _run(model, tokens, mode, batch_size=1, context=16, stride=4, sites=None, logprob=True, window_range=None):
    sites = sites or {"keys": ReadSite(1, "ffn_input"), "h0": ReadSite(0, "output")}
    bs = list(iter_batches(model, tokens, context, stride, sites, batch_size, logprob, window_range, mode=mode))
    assert all(x.row_end == y.row_start for x, y in zip(bs, bs[1:]))  # contiguous, in row order
    return {n: torch.cat([b.features[n] for b in bs]) for n in sites}, (torch.cat([b.lm_logprob for b in bs]) if logprob else None), bs


def test_cache_mode_equals_recompute_where_contexts_coincide(tiny_llama, corpus_dir, torch_threads):
    model, _, _ = load_model(str(tiny_llama))
    tokens = Corpus(corpus_dir).tokens("train")
    # a window-sized stream: one window, computed whole in both modes
    f_r, lp_r, _ = _run(model, tokens[:16], "recompute")
    f_c, lp_c, _ = _run(model, tokens[:16], "cache")
    assert all(torch.equal(f_r[n], f_c[n]) for n in f_r) and torch.equal(lp_r, lp_c)
    # with stride <= SINK_TOKENS the sinks plus the carried context are the whole previous window, so the
    # second window sees exactly the first C + S tokens: it must equal one plain forward over them
    C, S = 16, 4
    assert S <= SINK_TOKENS
    f_c, lp_c, _ = _run(model, tokens, "cache", context=C, stride=S, window_range=(0, 8))  # 4 lanes of 2 windows
    with torch.inference_mode(), capture(model, [ReadSite(1, "ffn_input")]) as got:
        out = model(input_ids=torch.from_numpy(tokens[: C + S].astype(np.int64))[None])
    assert torch.allclose(f_c["keys"][: C + S], got[ReadSite(1, "ffn_input")][0], atol=1e-5)
    lp = torch.log_softmax(out.logits[0], -1).gather(-1, torch.from_numpy(tokens[1 : C + S + 1].astype(np.int64))[:, None])[:, 0]
    assert torch.allclose(lp_c[: C + S], lp, atol=1e-5)
    # lanes: every lane starts with a whole window, whose rows equal the recompute rows of that window
    W = windows(len(tokens), C, S)
    f_r, lp_r, _ = _run(model, tokens, "recompute", batch_size=1, context=C, stride=S, window_range=(0, 40))
    f_c, lp_c, bs = _run(model, tokens, "cache", batch_size=1, context=C, stride=S, window_range=(0, 40))
    assert len(f_c["keys"]) == len(f_r["keys"]) == W[39, 1]
    lane_starts = np.cumsum([0] + [len(x) for x in np.array_split(np.arange(40), 4)])[:-1]  # batch 1 * C / S = 4 lanes of 10
    for w in lane_starts:
        r = slice(int(W[w, 2]), int(W[w, 1]))
        assert torch.allclose(f_c["keys"][r], f_r["keys"][r], atol=1e-5) and torch.allclose(lp_c[r], lp_r[r], atol=1e-5)
    assert not torch.allclose(f_c["keys"], f_r["keys"], atol=1e-5)  # elsewhere the contexts differ


def test_cache_mode_lanes_equal_each_lane_run_alone(tiny_llama, corpus_dir, torch_threads):
    """A block runs its lanes as one batch: the first windows in groups whose caches are then stacked, finished
    lanes sliced off. Naive reference: each lane alone, as a batch of one (float32 tolerance: other GEMM shapes)."""
    model, _, _ = load_model(str(tiny_llama))
    tokens = Corpus(corpus_dir).tokens("train")
    C, S, sites = 16, 4, {"keys": ReadSite(1, "ffn_input"), "h0": ReadSite(0, "output")}
    W, tok_t = windows(len(tokens), C, S)[:30], torch.from_numpy(tokens.astype(np.int64))
    block = _cached_block(
        model, tok_t, W, C, S, sites, 8, True
    )  # lanes of 4, 4, 4, 4, 4, 4, 3, 3; first windows in groups of 8 * S // C = 2
    for lane in np.array_split(np.arange(len(W)), 8):
        alone = _cached_block(model, tok_t, W[lane], C, S, sites, 1, True)
        r = slice(alone.row_start - block.row_start, alone.row_end - block.row_start)
        for n in sites:
            torch.testing.assert_close(block.features[n][r], alone.features[n])
        torch.testing.assert_close(block.lm_logprob[r], alone.lm_logprob)
        assert np.array_equal(block.labels[r], alone.labels)


def test_rebase_equals_keys_computed_at_the_new_positions(tiny_llama, torch_threads):
    from transformers import DynamicCache

    model, _, _ = load_model(str(tiny_llama))
    x = torch.arange(3, 23)[None]  # 20 tokens
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=x, use_cache=True, past_key_values=cache)
        _rebase(cache, n_sink=2, keep=7, inv_freq=model.get_decoder().rotary_emb.inv_freq)
        ref = DynamicCache(config=model.config)
        model(input_ids=torch.cat([x[:, :2], x[:, -7:]], 1), use_cache=True, past_key_values=ref)
    # layer 0 keys depend on the token and its position only: re-based keys == keys computed at positions 0..8
    assert cache.layers[0].keys.shape[-2] == 9
    assert torch.allclose(cache.layers[0].keys, ref.layers[0].keys, atol=1e-5)
    # values are not rotated, but the two forwards saw 20 and 9 tokens: other GEMM shapes, so float32 tolerances
    torch.testing.assert_close(cache.layers[0].values, ref.layers[0].values)


def test_cache_mode_falls_back_for_absolute_positions(tmp_path, tiny_models, corpus_dir):
    model, _, _ = load_model(str(tiny_models["gpt2"]))
    assert resolve_mode(model, "auto", 64, 24) == "recompute"
    with pytest.raises(MlpmemError, match="not a RoPE decoder"):
        resolve_mode(model, "cache", 64, 24)
    llama, _, _ = load_model(str(tiny_models["llama"]))
    assert resolve_mode(llama, "auto", 64, 24) == "cache"
    assert resolve_mode(llama, "auto", 64, 64) == "recompute"  # no overlap: nothing to carry
    with pytest.raises(MlpmemError, match="unknown extraction mode"):
        resolve_mode(llama, "fast", 64, 24)


def test_default_mode_is_cache_and_keeps_a_folders_own_mode(tmp_path, tiny_llama, corpus_dir):
    from mlpmem.files import read_json

    cfg = _cfg(tiny_llama)  # mode "auto", the default
    assert cfg.mode == "auto"
    fresh = Datastore(build_datastore(corpus_dir, tmp_path / "fresh", cfg))
    assert fresh.manifest["extract_mode"] == "cache" and read_json(tmp_path / "fresh" / "config.json")["config"]["mode"] == "cache"
    # a folder made in recompute mode, cut short, resumes in recompute under the default: no refusal, no mixed shards
    old = build_datastore(corpus_dir, tmp_path / "old", _cfg(tiny_llama, mode="recompute"))
    n = Datastore(old).n_rows
    ref = np.asarray(Datastore(old).rows("keys", 0, n)).copy()
    (old / "manifest.json").unlink()
    resumed = Datastore(build_datastore(corpus_dir, old, cfg))
    assert resumed.manifest["extract_mode"] == "recompute"
    assert np.array_equal(np.asarray(resumed.rows("keys", 0, n)), ref)
    # --overwrite starts afresh: the default then means cache again
    assert Datastore(build_datastore(corpus_dir, old, cfg, overwrite=True)).manifest["extract_mode"] == "cache"
    # a cache-mode folder rerun with windows that leave nothing to carry: the refusal names the changed setting
    with pytest.raises(MlpmemError, match="different configuration.*stride: 24 -> 64"):
        build_datastore(corpus_dir, old, _cfg(tiny_llama, stride=64))


def test_manifest_fingerprints_the_model(tmp_path, tiny_llama, corpus_dir):
    from mlpmem.models import model_fingerprint

    out = build_datastore(corpus_dir, tmp_path / "ds", _cfg(tiny_llama))
    model, _, _ = load_model(str(tiny_llama))
    assert Datastore(out).manifest["model_fingerprint"] == model_fingerprint(model)  # memories trained on it inherit it


def test_batch_tokens_sizes_the_forward_calls(tmp_path, tiny_llama, corpus_dir, monkeypatch):
    """batch_tokens = 3 windows' tokens runs the batches batch_size=3 runs (and writes the same bytes)."""
    import mlpmem.datastore as dsmod

    sizes = []
    real = dsmod.iter_batches
    monkeypatch.setattr(
        dsmod,
        "iter_batches",
        lambda model, tokens, c, s, sites, bs, *a, **k: sizes.append(bs) or real(model, tokens, c, s, sites, bs, *a, **k),
    )
    by_windows = build_datastore(corpus_dir, tmp_path / "w", _cfg(tiny_llama, batch_size=3))
    by_tokens = build_datastore(corpus_dir, tmp_path / "t", _cfg(tiny_llama, batch_size=8, batch_tokens=3 * 64 + 5))
    assert set(sizes) == {3}
    for p in sorted(by_windows.glob("*.npy")):
        assert p.read_bytes() == (by_tokens / p.name).read_bytes(), p.name
    assert Datastore(by_tokens).manifest["windows_per_batch"] == 3


def test_a_prefix_goes_in_front_of_every_window_against_a_naive_reference(tmp_path, tiny_llama, corpus_dir):
    """RecomputeExtractor with prefix (bos,): each kept row's hidden state and log-prob equal one plain forward over
    [bos] + that row's window (context - 1 stream tokens); every position is a row once; the datastore's bos option
    uses it and records the prefix; the cache mode refuses a prefix, auto falls back to recompute."""
    from mlpmem.datastore import CacheExtractor, RecomputeExtractor, make_extractor

    model, tok, model_id = load_model(str(tiny_llama))
    tokens = Corpus(corpus_dir).tokens("train")[:70]
    bos = 1
    C, S = 16, 6
    ex = RecomputeExtractor(model, C, S, batch_size=2, prefix=(bos,))
    site = ReadSite(1, "output")
    bs = list(ex.batches(tokens, {"h": site}, want_logprob=True))
    h = torch.cat([b.features["h"] for b in bs])
    lp = torch.cat([b.lm_logprob for b in bs])
    assert len(h) == len(lp) == len(tokens) - 1 and [b.row_start for b in bs][0] == 0
    W = windows(len(tokens), C - 1, S)
    assert np.array_equal(ex.windows(len(tokens)), W)
    for b, e, k in W:
        ids = torch.from_numpy(np.concatenate([[bos], tokens[b:e]]).astype(np.int64))[None]
        with torch.inference_mode(), capture(model, [site]) as got:
            logits = model(input_ids=ids).logits[0].float()
        stop = min(e, len(tokens) - 1)
        ref_h = got[site][0, 1 + k - b : 1 + stop - b]
        ref_lp = torch.log_softmax(logits[1 + k - b : 1 + stop - b], -1).gather(
            -1, torch.from_numpy(tokens[k + 1 : stop + 1].astype(np.int64))[:, None]
        )[:, 0]
        torch.testing.assert_close(h[k:stop], ref_h, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lp[k:stop], ref_lp, atol=1e-5, rtol=1e-4)
    plain = torch.cat([b.features["h"] for b in RecomputeExtractor(model, C, S).batches(tokens, {"h": site})])
    assert not torch.allclose(plain, h)  # the prefix changes the states
    assert make_extractor(model, "auto", C, S, prefix=(bos,)).mode == "recompute"
    with pytest.raises(MlpmemError, match="no prefix"):
        CacheExtractor(model, C, S, prefix=(bos,))
    with pytest.raises(MlpmemError, match="stride"):
        RecomputeExtractor(model, 8, 8, prefix=(bos,))
    # the datastore option: <bos> in front of every window, recorded; its keys are the extractor's
    with pytest.raises(MlpmemError, match="no bos token"):  # the tiny tokenizer has none
        build_datastore(corpus_dir, tmp_path / "nobos", _cfg(tiny_llama, bos=True), (model, tok, model_id))
    tok.bos_token = "<eos>"
    out = build_datastore(corpus_dir, tmp_path / "bos", _cfg(tiny_llama, bos=True, site="output", layer=1), (model, tok, model_id))
    ds = Datastore(out)
    assert ds.manifest["prefix"] == [tok.bos_token_id]
    full = Corpus(corpus_dir).tokens("train")
    want = torch.cat([b.features["h"] for b in RecomputeExtractor(model, 64, 24, 3, (tok.bos_token_id,)).batches(full, {"h": site})])
    assert_fp16_close(ds.rows("keys", 0, ds.n_rows), want)


def test_host_copies_land_one_batch_late_and_all_by_flush():
    """Extraction hands a batch's tensors to _HostCopies and fills the shard's arrays one batch later
    (on a GPU the copy overlaps the next forward); flush puts in the last batch. The tensors may be
    reused by the extractor after put, so what lands is what they held at put time."""
    import torch

    from mlpmem.datastore import _HostCopies

    out = np.zeros((4, 3), np.float16)
    c = _HostCopies()
    a = torch.arange(6, dtype=torch.float16).reshape(2, 3)  # already float16: the cast alone would not copy
    c.put([(out[0:2], a, torch.float16)])
    a += 100  # the extractor reuses its buffer
    assert not out.any()  # nothing lands before the next batch
    c.put([(out[2:4], torch.ones(2, 3, dtype=torch.float16), torch.float16)])
    np.testing.assert_array_equal(out[0:2], np.arange(6).reshape(2, 3))
    assert not out[2:].any()
    c.flush()
    np.testing.assert_array_equal(out[2:], 1)
    c.flush()  # nothing pending: no-op
