"""Memory training: it learns, writes its folder, resumes exactly, refuses bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fake_train_data import write_train_data
from mlpmem.datastore import Datastore
from mlpmem.errors import MlpmemError
from mlpmem.manifest import read_manifest
from mlpmem.memory import load_memory
from mlpmem.train import Schedule, TrainConfig, build_memory, list_checkpoints, read_metrics, train_memory

TINY = dict(init="plain", n_blocks=2, batch_size=50, epochs=2.0, lr=1e-2, eval_every=5, ckpt_every=4, log_every=5, precision="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    ds, tg = write_train_data(root, n=500, features={"h0.output": (0, "output")})
    vds, vtg = write_train_data(root, n=200, seed=1, split="valid", lm_logprob=True, features={"h0.output": (0, "output")})
    return {"ds": ds, "tg": tg, "vds": vds, "vtg": vtg}


def run(data, out, cfg, **kw):
    losses = {}
    kw.setdefault("valid_datastore_dir", data["vds"])
    kw.setdefault("valid_targets_dir", data["vtg"])
    train_memory(data["ds"], data["tg"], out, cfg, on_step=lambda s, r, m: losses.__setitem__(s, r["loss"]), **kw)
    return losses


def test_trains_and_writes_folder(data, tmp_path):
    cfg = TrainConfig(**TINY)
    losses = run(data, tmp_path / "run", cfg)
    assert len(losses) == 20  # 2 epochs of 500 rows in batches of 50
    assert np.mean([losses[s] for s in range(16, 21)]) < 0.85 * np.mean([losses[s] for s in range(1, 6)])
    out = tmp_path / "run"
    m = read_manifest(out, "memory")
    assert m["steps"] == 20 and m["tokens_per_s"] > 0 and m["peak_rss_mb"] > 0
    assert {"kl", "ce", "ppl_memory", "ppl_lm", "ppl_interp", "lambda"} <= set(m["valid"])
    # the memory learned the retriever: held-out KL to the kNN targets and CE both fell from the start
    start, end = m["valid_start"], m["valid"]
    assert end["kl"] < 0.9 * start["kl"] and end["ce"] < start["ce"], (start, end)
    assert m["worse_than_start"] is False
    valid = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [0, 5, 10, 15, 20]
    assert valid[-1]["ppl_memory"] < valid[0]["ppl_memory"]
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-000016", "step-000020"]  # keep_last=2
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    memory, meta = load_memory(out / "memory", expect={"model_id": "test/model", "layer": 1, "site": "ffn_input"})
    assert meta["tokenizer_hash"] == "tok0" and memory.config.d_in == 16 and memory.config.vocab_size == 50
    assert (meta["input_source"], meta["input_array"]) == ("stored", "keys")  # the memory's input, decided once, in its meta
    # a finished folder with the same config is skipped
    assert run(data, out, cfg) == {}
    with pytest.raises(MlpmemError, match="different configuration"):
        run(data, out, TrainConfig(**{**TINY, "lr": 1e-3}))


def test_resume_gives_the_same_steps(data, tmp_path):
    cfg = TrainConfig(**TINY)
    straight = run(data, tmp_path / "straight", cfg)

    class Crash(Exception):
        pass

    def crash_at_7(step, rec, memory):
        seen[step] = rec["loss"]
        if step == 7:
            raise Crash

    seen = {}
    with pytest.raises(Crash):
        train_memory(data["ds"], data["tg"], tmp_path / "crashed", cfg, data["vds"], data["vtg"], on_step=crash_at_7)
    assert [c.name for c in list_checkpoints(tmp_path / "crashed" / "checkpoints")] == ["step-000004"]
    resumed = run(data, tmp_path / "crashed", cfg)
    assert min(resumed) == 5  # steps 5..7 run again from the checkpoint of step 4
    assert {s: seen[s] for s in range(1, 8)} == {s: straight[s] for s in range(1, 8)}
    assert resumed == {s: straight[s] for s in range(5, 21)}  # exactly equal, not just close
    a, _ = load_memory(tmp_path / "straight" / "memory")
    b, _ = load_memory(tmp_path / "crashed" / "memory")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    steps = [(r["split"], r["step"]) for r in read_metrics(tmp_path / "crashed" / "metrics.jsonl")]
    assert len(steps) == len(set(steps))  # no duplicate records from the steps run twice
    assert steps == [(r["split"], r["step"]) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]


def test_resume_false_starts_over(data, tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 0.5})
    run(data, tmp_path / "r", cfg, valid_datastore_dir=None, valid_targets_dir=None)
    (tmp_path / "r" / "manifest.json").unlink()  # interrupted after its last checkpoint
    assert run(data, tmp_path / "r", cfg, valid_datastore_dir=None, valid_targets_dir=None) == {}
    assert read_manifest(tmp_path / "r", "memory")["steps"] == 5
    (tmp_path / "r" / "manifest.json").unlink()
    assert len(run(data, tmp_path / "r", cfg, valid_datastore_dir=None, valid_targets_dir=None, resume=False)) == 5


def test_grad_accum_is_the_same_maths(data, tmp_path):
    a = run(data, tmp_path / "a", TrainConfig(**{**TINY, "epochs": 0.5}), valid_datastore_dir=None, valid_targets_dir=None)
    b = run(data, tmp_path / "b", TrainConfig(**{**TINY, "epochs": 0.5, "grad_accum": 5}), valid_datastore_dir=None, valid_targets_dir=None)
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in b], rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_checkpoint(data, tmp_path, monkeypatch):
    import mlpmem.train.loop as train  # the loop calls the loss

    real = train.sparse_kd_loss
    calls = []

    def poisoned(*args):
        calls.append(torch.is_grad_enabled())  # validation calls it too, without gradients
        loss, parts = real(*args)
        return (loss * float("nan"), parts) if sum(calls) == 6 and calls[-1] else (loss, parts)

    monkeypatch.setattr(train, "sparse_kd_loss", poisoned)
    with pytest.raises(MlpmemError, match="non-finite at step 6.*step-000004.*lower lr"):
        run(data, tmp_path / "nan", TrainConfig(**TINY))
    assert [c.name for c in list_checkpoints(tmp_path / "nan" / "checkpoints")] == ["step-000004"]
    assert not (tmp_path / "nan" / "manifest.json").exists()


def test_feature_input_and_meta(data, tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 0.5, "input_layer": 0, "input_site": "output", "width": 24})
    run(data, tmp_path / "f", cfg)
    memory, meta = load_memory(tmp_path / "f" / "memory")
    assert (meta["layer"], meta["site"], meta["input_array"]) == (0, "output", "h0.output")
    assert memory.proj is not None
    with pytest.raises(MlpmemError, match="no hidden states of layer 5"):
        run(data, tmp_path / "g", TrainConfig(**{**TINY, "input_layer": 5}))


def test_refuses_misaligned_targets(data, tmp_path):
    _, other_tg = write_train_data(tmp_path, n=400, split="other")
    with pytest.raises(MlpmemError, match="another datastore"):
        train_memory(data["ds"], other_tg, tmp_path / "x", TrainConfig(**TINY))


@pytest.mark.parametrize(
    "bad",
    [
        dict(alpha=1.5),
        dict(lr=0.0),
        dict(batch_size=50, grad_accum=3),
        dict(precision="fp16"),
        dict(schedule="step"),
        dict(mode="streaming"),
        dict(warmup_frac=1.0),
        dict(activation="relu"),
        dict(dropout=1.0),
        dict(dropout=-0.1),
    ],
)
def test_config_validation(bad, data, tmp_path):
    with pytest.raises(MlpmemError):
        train_memory(data["ds"], data["tg"], tmp_path / "x", TrainConfig(**{**TINY, **bad}))
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_lm_copy_init(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    )
    ds, tg = write_train_data(tmp_path, n=200, layer=1, site="output")
    cfg = TrainConfig(**{**TINY, "epochs": 0.5, "init": "lm_copy", "freeze_head": True})
    with pytest.raises(MlpmemError, match="no LM was given"):
        build_memory(cfg, 16, 50)
    train_memory(ds, tg, tmp_path / "m", cfg, init_lm=lm)
    memory, _ = load_memory(tmp_path / "m" / "memory")
    assert memory.config.norm == "rmsnorm" and memory.config.norm_eps == lm.config.rms_norm_eps
    assert torch.equal(memory.head.weight, lm.lm_head.weight)  # frozen head stayed the LM's


def test_schedule():
    cfg = TrainConfig(batch_size=50, epochs=2.0, warmup_frac=0.1, lr=1.0, grad_accum=2)
    s = Schedule(500, cfg)
    assert s.total == 20 and s.warmup == 2
    epoch0 = np.concatenate([np.concatenate(s.rows(i)) for i in range(10)])
    assert sorted(epoch0) == list(range(500))  # each row once per epoch
    assert not np.array_equal(epoch0, np.concatenate([np.concatenate(s.rows(i)) for i in range(10, 20)]))
    assert np.array_equal(Schedule(500, cfg).rows(13)[1], s.rows(13)[1])  # reproducible from the step alone
    assert [round(s.lr(i), 6) for i in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert s.lr(19) < 0.01
    lin = Schedule(500, TrainConfig(batch_size=50, epochs=2.0, schedule="linear", lr=1.0, min_lr_frac=0.1))
    assert lin.lr(2) == pytest.approx(1.0) and lin.lr(19) == pytest.approx(0.1 + 0.9 / 18)
    # an epoch count that does not divide evenly: batches run on into the next epoch
    assert Schedule(500, TrainConfig(batch_size=300, epochs=1.0)).rows(1)[0].shape == (300,)


def test_bf16_autocast_trains(data, tmp_path):
    losses = run(data, tmp_path / "bf16", TrainConfig(**{**TINY, "precision": "bf16", "epochs": 1.0}))
    assert all(np.isfinite(list(losses.values()))) and losses[10] < losses[1]
    m = read_manifest(tmp_path / "bf16", "memory")
    assert m["precision"] == "bf16" and np.isfinite(m["valid"]["ppl_memory"])
    memory, _ = load_memory(tmp_path / "bf16" / "memory")
    assert memory.head.weight.dtype == torch.float32  # autocast: weights stay float32


def test_online_mode_recomputes_the_stored_features(tmp_path, tiny_llama, tiny_corpus_file):
    """Online features equal the ones the datastore stored, and an online run trains."""
    from mlpmem.corpus import CorpusConfig, build_corpus
    from mlpmem.datastore import DatastoreConfig, build_datastore
    from mlpmem.index import IndexConfig, build_index
    from mlpmem.models import load_model
    from mlpmem.targets import TargetsConfig, build_targets
    from mlpmem.train import OnlineData, TrainData

    lm = load_model(str(tiny_llama))[0]
    corpus = build_corpus(tmp_path / "c", CorpusConfig(source=str(tiny_corpus_file), model=str(tiny_llama), train_tokens=1500))
    # recompute: online training runs every window from scratch, so its features equal these stored ones
    ds = build_datastore(
        corpus, tmp_path / "ds", DatastoreConfig(model=str(tiny_llama), context=64, stride=32, extra_sites=["1:output"], mode="recompute")
    )
    build_index(ds, tmp_path / "ix", IndexConfig(kind="flat"))
    tg = build_targets(ds, tmp_path / "ix", tmp_path / "tg", TargetsConfig(k=16, temperature=1.0, top_m=8))
    idx = np.random.default_rng(0).choice(1499, 100, replace=False)
    stored = TrainData(ds, tg, 1, "output").batch(idx)
    online = OnlineData(ds, tg, 1, "output", lm).batch(idx)
    assert torch.allclose(stored["h"].float(), online["h"], atol=2e-3)  # stored copy is float16
    assert torch.equal(stored["labels"], online["labels"]) and torch.equal(stored["ids"], online["ids"])
    cfg = TrainConfig(mode="online", input_layer=1, input_site="output", n_blocks=1, epochs=1.0, batch_size=128, eval_every=0, ckpt_every=0)
    out = train_memory(ds, tg, tmp_path / "mem", cfg, init_lm=lm)
    assert (out / "memory" / "model.safetensors").exists()
    meta = load_memory(out / "memory")[1]
    assert (meta["layer"], meta["site"], meta["input_source"], meta["input_array"]) == (1, "output", "recomputed", "online")


def test_a_sign_flipped_loss_is_caught(data, tmp_path, monkeypatch, caplog):
    """The check above can fail: training on the negated loss ends worse than its start, and says so."""
    import mlpmem.train.loop as train  # the loop calls the loss

    real = train.sparse_kd_loss

    def negated(*args):
        loss, parts = real(*args)
        return -loss, parts

    monkeypatch.setattr(train, "sparse_kd_loss", negated)
    with caplog.at_level("WARNING", logger="mlpmem.train"):
        run(data, tmp_path / "neg", TrainConfig(**{**TINY, "lr": 1e-3}))
    m = read_manifest(tmp_path / "neg", "memory")
    assert m["valid"]["kl"] > m["valid_start"]["kl"]
    assert m["valid"]["ppl_memory"] > m["valid_start"]["ppl_memory"] and m["worse_than_start"] is True
    assert "WORSE than it started" in caplog.text


def test_worse_than_start_judges_the_mixture():
    """lm_copy's memory gets worse alone while the mixture improves (SOTU 60k): not flagged; a memory whose
    lambda went to ~0 leaves the mixture at the LM's perplexity: flagged, however its own perplexity moved."""
    from mlpmem.train import worse_than_start

    start = {"ppl_memory": 34.36, "ppl_interp": 34.35}
    assert worse_than_start(start, {"ppl_memory": 43.24, "ppl_interp": 32.42}) is False
    assert worse_than_start({"ppl_memory": 49000.0, "ppl_interp": 11.5}, {"ppl_memory": 21846.0, "ppl_interp": 11.499}) is True
    assert worse_than_start(start, {"ppl_memory": 30.0, "ppl_interp": 34.36}) is True
    # no LM log-probs on valid: the memory alone decides
    assert (
        worse_than_start({"ppl_memory": 7.4}, {"ppl_memory": 6.7}) is False
        and worse_than_start({"ppl_memory": 7.4}, {"ppl_memory": 7.5}) is True
    )
    assert worse_than_start(None, {"ppl_memory": 6.7}) is None


def test_resume_without_a_checkpoint_starts_metrics_clean(data, tmp_path):
    cfg = TrainConfig(**{**TINY, "ckpt_every": 0})

    class Crash(Exception):
        pass

    def crash_at_6(step, rec, memory):
        if step == 6:
            raise Crash

    with pytest.raises(Crash):  # after a train and a valid record, before any checkpoint
        train_memory(data["ds"], data["tg"], tmp_path / "r", cfg, data["vds"], data["vtg"], on_step=crash_at_6)
    assert read_metrics(tmp_path / "r" / "metrics.jsonl")
    run(data, tmp_path / "r", cfg)
    run(data, tmp_path / "straight", cfg)
    steps = lambda d: [(r["split"], r["step"]) for r in read_metrics(d / "metrics.jsonl")]  # noqa: E731
    assert steps(tmp_path / "r") == steps(tmp_path / "straight")


def test_keeps_the_best_validated_memory_and_stops_early(data, tmp_path):
    """The final memory is the validation's best (by interpolated perplexity), the manifest names its step,
    and patience stops training after that many validations without a new best."""
    from safetensors.numpy import load_file

    # a large learning rate without warm-up makes validation go up and down
    cfg = TrainConfig(**{**TINY, "lr": 3.0, "warmup_frac": 0.0, "eval_every": 1, "ckpt_every": 1, "keep_last": 100, "epochs": 1.0})
    run(data, tmp_path / "best", cfg)
    out = tmp_path / "best"
    m = read_manifest(out, "memory")
    valid = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "valid" and r["step"] > 0]
    best = min(valid, key=lambda r: r["ppl_interp"])
    assert best["step"] != valid[-1]["step"], "training improved at every validation: the test needs a noisier run"
    assert m["kept_step"] == best["step"] and m["kept_by"] == "ppl_interp" and m["valid"]["ppl_interp"] == best["ppl_interp"]
    assert m["valid_last"]["ppl_interp"] == valid[-1]["ppl_interp"]
    kept = load_file(str(out / "memory" / "model.safetensors"))
    ckpt = load_file(str(out / "checkpoints" / f"step-{best['step']:06d}" / "model.safetensors"))
    assert all(np.array_equal(kept[k], ckpt[k]) for k in kept) and not (out / "best").exists()

    # patience 1: the first validation that is no better than the best so far ends training
    run(data, tmp_path / "early", TrainConfig(**{**cfg.__dict__, "patience": 1}))
    m = read_manifest(tmp_path / "early", "memory")
    first_worse = next(r["step"] for i, r in enumerate(valid) if i and r["ppl_interp"] >= min(v["ppl_interp"] for v in valid[:i]))
    assert m["stopped_early"] == first_worse and m["kept_step"] < first_worse
    assert max(r["step"] for r in read_metrics(tmp_path / "early" / "metrics.jsonl")) == first_worse


def _tiny_lm(seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    ).eval()


def test_the_default_start_is_lm_copy_with_the_datastores_lm(tmp_path, monkeypatch):
    """TrainConfig() starts as the LM (lm_copy); without an LM given, train_memory loads the datastore's model;
    when that cannot load, the error names init plain. init plain stays available explicitly."""
    from mlpmem import models

    assert TrainConfig().init == "lm_copy"
    lm, loaded = _tiny_lm(), []
    ds, tg = write_train_data(tmp_path, n=200, layer=1, site="output")  # a datastore of model "test/model", keys = the last layer's output
    monkeypatch.setattr(models, "load_model", lambda name, *a, **k: loaded.append(name) or (lm, None, name))
    cfg = TrainConfig(n_blocks=1, batch_size=50, epochs=0.5, precision="fp32", eval_every=0, ckpt_every=0)
    starts = []
    train_memory(ds, tg, tmp_path / "m", cfg, on_step=lambda s, r, m: starts.append(m.head.weight.detach().clone()) if s == 1 else None)
    assert loaded[0] == "test/model"  # (loaded again to fingerprint: this fake datastore records none)
    memory, meta = load_memory(tmp_path / "m" / "memory")
    assert memory.config.init == "lm_copy" and memory.config.norm == "rmsnorm" and (meta["layer"], meta["site"]) == (1, "output")
    assert (starts[0] - lm.lm_head.weight).abs().max() < 5e-3  # one small step away from the LM's head, not a random N(0, 0.02) matrix

    def fails(name, *a, **k):
        raise MlpmemError(f"cannot load {name}", "x")

    monkeypatch.setattr(models, "load_model", fails)
    with pytest.raises(MlpmemError, match="init plain") as e:
        train_memory(ds, tg, tmp_path / "m2", cfg)
    assert "test/model" in str(e.value) and not (tmp_path / "m2").exists()
    train_memory(ds, tg, tmp_path / "m3", TrainConfig(**{**cfg.__dict__, "init": "plain"}))  # needs no LM
    assert load_memory(tmp_path / "m3" / "memory")[0].config.init == "plain"
    # a datastore keyed elsewhere (`mlpmem datastore`'s default: the FFN input) does not hold lm_copy's input: the error says how to go on
    monkeypatch.setattr(models, "load_model", lambda name, *a, **k: (lm, None, name))
    ds2, tg2 = write_train_data(tmp_path / "ffn", n=200, layer=1, site="ffn_input")
    with pytest.raises(MlpmemError, match="mode online") as e:
        train_memory(ds2, tg2, tmp_path / "m4", cfg)
    assert "--extra-sites 1:output" in e.value.fix and not (tmp_path / "m4").exists()


def test_the_memory_records_the_datastores_window_prefix(tmp_path):
    """A memory trained on a <bos> datastore (datastore.bos) says so in its meta, for whoever computes its inputs later."""
    ds, tg = write_train_data(tmp_path, n=100, prefix=[7])
    train_memory(ds, tg, tmp_path / "m", TrainConfig(**{**TINY, "epochs": 0.5, "eval_every": 0, "ckpt_every": 0}))
    assert load_memory(tmp_path / "m" / "memory")[1]["prefix"] == [7]
    ds0, tg0 = write_train_data(tmp_path / "plain", n=100)
    train_memory(ds0, tg0, tmp_path / "m0", TrainConfig(**{**TINY, "epochs": 0.5, "eval_every": 0, "ckpt_every": 0}))
    assert "prefix" not in load_memory(tmp_path / "m0" / "memory")[1]


def test_dropout_trains_and_old_folders_without_it_stay_done(data, tmp_path):
    """dropout changes the training (the runs differ) but not the saved memory's layout; a folder
    trained before the setting existed (no dropout in its config) matches dropout 0 and is not retrained."""
    cfg = TrainConfig(**{**TINY, "epochs": 0.5})
    plain = run(data, tmp_path / "a", cfg)
    dropped = run(data, tmp_path / "b", TrainConfig(**{**cfg.__dict__, "dropout": 0.3}))
    assert plain[5] != dropped[5]
    a, _ = load_memory(tmp_path / "a" / "memory")
    b, _ = load_memory(tmp_path / "b" / "memory")
    assert a.state_dict().keys() == b.state_dict().keys()
    resolved = json.loads((tmp_path / "a" / "config.json").read_text())
    del resolved["config"]["dropout"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(resolved))
    assert run(data, tmp_path / "a", cfg) == {}  # done, not retrained


def test_head_vocab_corpus_prunes_the_kept_memorys_head_to_the_train_tokens(data, tmp_path):
    run(data, tmp_path / "full", TrainConfig(**{**TINY, "epochs": 1.0}))
    run(data, tmp_path / "pruned", TrainConfig(**{**TINY, "epochs": 1.0, "head_vocab": "corpus"}))
    full, _ = load_memory(tmp_path / "full" / "memory")
    pruned, _ = load_memory(tmp_path / "pruned" / "memory")
    tokens = np.unique(Datastore(data["ds"]).values())
    assert len(tokens) < 50 and torch.equal(pruned.head_ids, torch.from_numpy(tokens).long())
    assert read_manifest(tmp_path / "pruned", "memory")["memory_config"]["head_tokens"] == len(tokens)
    h = torch.randn(4, 16)
    with torch.no_grad():  # the same training; the head keeps the train text's rows
        assert torch.allclose(pruned(h)[:, tokens], full(h)[:, tokens], atol=1e-5)
