import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mlpmem.corpus import Corpus, CorpusConfig, build_corpus, windows
from mlpmem.datastore import DatastoreConfig, build_datastore
from mlpmem.errors import MlpmemError
from mlpmem.models import Site, capture, load_model
from mlpmem.store import Datastore


@pytest.fixture
def corpus_dir(tmp_path, tiny_llama, tiny_corpus_file):
    return build_corpus(tmp_path / "corpus", CorpusConfig(source=str(tiny_corpus_file), model=str(tiny_llama), train_tokens=1200))


def _cfg(model, **kw):
    base = dict(model=str(model), context=64, stride=24, batch_size=3, windows_per_shard=5)
    return DatastoreConfig(**{**base, **kw})


def test_keys_values_aligned_with_positions(tmp_path, tiny_llama, corpus_dir):
    out = build_datastore(corpus_dir, tmp_path / "ds", _cfg(tiny_llama, extra_sites=["0:output"], lm_logprob=True))
    ds = Datastore(out, verify=True)
    tokens = Corpus(corpus_dir).tokens("train")
    assert ds.n_rows == len(tokens) - 1  # every position once: no duplicates from overlapping windows
    assert np.array_equal(ds.values(), tokens[1:])  # value = next token
    assert len(ds.manifest["shards"]) > 2
    # key of a row equals the hidden state computed directly on that row's window
    model, _, _ = load_model(str(tiny_llama))
    W = windows(len(tokens), 64, 24)
    for b, e, k in W[[0, 3, len(W) - 1]]:
        with torch.no_grad(), capture(model, [Site(1, "ffn_input"), Site(0, "output")]) as got:
            out_ = model(input_ids=torch.from_numpy(tokens[b:e].astype(np.int64))[None])
        stop = min(e, len(tokens) - 1)
        ref = got[Site(1, "ffn_input")][0, k - b : stop - b].half().numpy()
        assert np.array_equal(ds.rows("keys", k, stop), ref)
        assert np.array_equal(ds.rows("h0.output", k, stop), got[Site(0, "output")][0, k - b : stop - b].half().numpy())
        lp = torch.log_softmax(out_.logits[0, k - b : stop - b], -1).gather(-1, torch.from_numpy(tokens[k + 1 : stop + 1].astype(np.int64))[:, None])[:, 0]
        assert np.allclose(ds.rows("lm_logprob", k, stop), lp.numpy(), atol=1e-5)


def test_resume_after_crash_is_byte_identical(tmp_path, tiny_llama, corpus_dir, monkeypatch):
    cfg = _cfg(tiny_llama)
    clean = build_datastore(corpus_dir, tmp_path / "clean", cfg)

    import mlpmem.datastore as dsmod

    real, calls = dsmod.write_json, {"n": 0}

    def crash_after_two(path, data):
        real(path, data)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed between shards

    monkeypatch.setattr(dsmod, "write_json", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(corpus_dir, tmp_path / "resumed", cfg)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(MlpmemError, match="interrupted"):
        Datastore(tmp_path / "resumed")
    monkeypatch.setattr(dsmod, "write_json", real)
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
    import mlpmem.manifest as man

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
    f.write_bytes(data[:-8] + b"\x00" * 8)
    Datastore(out)  # same size: only the hash check can tell
    with pytest.raises(MlpmemError, match="corrupted"):
        Datastore(out, verify=True)
