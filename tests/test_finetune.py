"""mlpmem.finetune: the mixture loss against a naive reference, joint vs plain fine-tuning, frozen and
trained memories, LoRA, reruns, and the refusals (tiny random Llama + tiny random memory)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_texts, memory_meta
from mlpmem.errors import MlpmemError
from mlpmem.finetune import FinetuneConfig, chunks_of, finetune, mixture_nll, prepare_lm, train_lm
from mlpmem.memory import MemoryConfig, MLPMemory, save_memory
from mlpmem.models import load_model, logits_size, model_fingerprint

pytest.importorskip("peft")

F32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def corpus(tiny_llama, tmp_path_factory) -> Path:
    from mlpmem.corpus import CorpusConfig, build_corpus

    root = tmp_path_factory.mktemp("ft")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(16)))
    return build_corpus(root / "corpus", CorpusConfig(source=str(src), model=str(tiny_llama), train_tokens=320))


def write_memory(folder: Path, model_dir: Path, seed: int = 1, layer: int = 1, site: str = "output", **meta_override) -> Path:
    lm, tok, model_id = load_model(str(model_dir))
    torch.manual_seed(seed)
    mem = MLPMemory(MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1, zero_init_blocks=False))
    mem.head.weight.data.normal_(0.0, 0.5)  # peaked: the memory matters in the mixture
    meta = memory_meta(model_id, tok, layer, site, lm=lm)
    return save_memory(folder, mem, {**meta, **meta_override})


@pytest.fixture(scope="module")
def memory_dir(tiny_llama, tmp_path_factory) -> Path:
    return write_memory(tmp_path_factory.mktemp("mem") / "memory", tiny_llama)


def config(tiny_llama, **kw) -> FinetuneConfig:
    base = dict(
        model=str(tiny_llama),
        method="full",
        chunk=32,
        batch_size=2,
        epochs=2.0,
        lr=3e-3,
        warmup=0.2,
        lora_r=4,
        lora_alpha=8,
        device="cpu",
        dtype="float32",
        seed=0,
    )
    return FinetuneConfig(**{**base, **kw})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.9, 1.0])
def test_mixture_nll_matches_naive_reference(lam):
    g = torch.Generator().manual_seed(0)
    lm, mem = torch.randn(3, 7, 50, generator=g) * 3, torch.randn(3, 7, 50, generator=g) * 3
    y = torch.randint(0, 50, (3, 7), generator=g)
    p, q = lm.double().softmax(-1).gather(-1, y[..., None])[..., 0], mem.double().softmax(-1).gather(-1, y[..., None])[..., 0]
    naive = -torch.log((1 - lam) * p + lam * q).mean()
    got = mixture_nll(lm, y, mem, lam)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive, rtol=16 * F32, atol=16 * F32)
    # lam = 0 is the LM's own cross-entropy; without a memory too
    torch.testing.assert_close(
        mixture_nll(lm, y), torch.nn.functional.cross_entropy(lm.reshape(-1, 50), y.reshape(-1)), rtol=16 * F32, atol=16 * F32
    )


def test_mixture_gradient_reaches_both_parts():
    g = torch.Generator().manual_seed(1)
    lm, mem = torch.randn(5, 20, generator=g, requires_grad=True), torch.randn(5, 20, generator=g, requires_grad=True)
    y = torch.randint(0, 20, (5,), generator=g)
    mixture_nll(lm, y, mem, 0.4).backward()
    assert lm.grad.abs().sum() > 0 and mem.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- joint vs plain, frozen vs trained


def test_lambda_zero_joint_equals_plain_finetuning(tiny_llama, corpus, memory_dir, tmp_path):
    plain = finetune(config(tiny_llama), corpus, tmp_path / "plain")
    joint0 = finetune(config(tiny_llama, memory=str(memory_dir), lambda_=0.0, memory_trainable=True), corpus, tmp_path / "joint0")
    joint = finetune(config(tiny_llama, memory=str(memory_dir), lambda_=0.5), corpus, tmp_path / "joint")
    a, b, c = weights(tmp_path / "plain/model"), weights(tmp_path / "joint0/model"), weights(tmp_path / "joint/model")
    assert plain["steps"] == joint0["steps"] >= 2
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # the memory in the loop does change what the LM learns
    assert max(float((c[k] - a[k]).abs().max()) for k in a) > 1e-4
    assert joint["loss_first"] != pytest.approx(plain["loss_first"], rel=1e-3)


def test_frozen_memory_stays_bit_identical_trained_one_changes(tiny_llama, corpus, memory_dir, tmp_path):
    before = load_file(str(memory_dir / "model.safetensors"))
    frozen = finetune(config(tiny_llama, memory=str(memory_dir), lambda_=0.5), corpus, tmp_path / "frozen")
    trained = finetune(config(tiny_llama, memory=str(memory_dir), lambda_=0.5, memory_trainable=True), corpus, tmp_path / "trained")
    after_frozen, after_trained = (
        load_file(str(tmp_path / "frozen/memory/model.safetensors")),
        load_file(str(tmp_path / "trained/memory/model.safetensors")),
    )
    assert set(after_frozen) == set(before)
    assert all(torch.equal(after_frozen[k], before[k]) for k in before)
    assert frozen["memory_trainable_params"] == 0 and trained["memory_trainable_params"] > 0
    changed = [k for k in before if not torch.equal(after_trained[k], before[k])]
    assert "head.weight" in changed and len(changed) >= len(before) // 2
    # the source memory folder is never written
    assert all(torch.equal(load_file(str(memory_dir / "model.safetensors"))[k], before[k]) for k in before)
    # the saved memory pairs with the fine-tuned model (its record names that model's weights)
    meta = json.loads((tmp_path / "trained/memory/memory_config.json").read_text())["meta"]
    lm, _, _ = load_model(str(tmp_path / "trained/model"))
    assert meta["model_fingerprint"] == model_fingerprint(lm) and meta["finetuned_with"]["trained"] is True


def test_lora_trains_only_adapters_and_merges(tiny_llama, corpus, tmp_path):
    from mlpmem.corpus import Corpus

    cfg = config(tiny_llama, method="lora")
    lm, _, _ = load_model(str(tiny_llama))
    base = {k: v.clone() for k, v in lm.state_dict().items()}
    model = prepare_lm(lm, cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rec = train_lm(model, chunks_of(Corpus(corpus).tokens("train"), cfg.chunk), cfg)
    after = model.state_dict()
    adapters = [k for k in after if "lora_" in k]
    assert adapters and rec["trainable_params"] == sum(after[k].numel() for k in adapters)
    assert all(torch.equal(after[k], start[k]) for k in after if "lora_" not in k)
    assert any(not torch.equal(after[k], start[k]) for k in adapters if "lora_B" in k)
    # through the stage: merged into the targeted linear weights, the rest of the model untouched
    finetune(cfg, corpus, tmp_path / "lora")
    merged = weights(tmp_path / "lora/model")
    assert not any("lora" in k for k in merged)
    targeted = [k for k in merged if any(f".{t}." in k for t in cfg.lora_targets)]
    assert targeted and all(not torch.equal(merged[k], base[k]) for k in targeted)
    assert all(torch.equal(merged[k], base[k]) for k in merged if k not in targeted)


def test_rerun_is_identical_and_a_finished_folder_is_reused(tiny_llama, corpus, memory_dir, tmp_path):
    cfg = config(tiny_llama, method="lora", memory=str(memory_dir), lambda_=0.3, memory_trainable=True)
    r1, r2 = finetune(cfg, corpus, tmp_path / "a"), finetune(cfg, corpus, tmp_path / "b")
    assert r1["loss_first"] == r2["loss_first"] and r1["loss_last"] == r2["loss_last"]
    for sub in ("model", "memory"):
        a, b = weights(tmp_path / "a" / sub), weights(tmp_path / "b" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a)
    stamp = (tmp_path / "a/model/model.safetensors").stat().st_mtime_ns
    again = finetune(cfg, corpus, tmp_path / "a")  # finished, same config: not trained again
    assert again["loss_last"] == r1["loss_last"] and (tmp_path / "a/model/model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(MlpmemError, match="different configuration"):
        finetune(dataclasses.replace(cfg, lr=1e-4), corpus, tmp_path / "a")
    steps = [json.loads(line) for line in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert len(steps) == r1["steps"] and steps[0]["lr"] < max(s["lr"] for s in steps)  # warm-up


def test_data_order_is_a_function_of_the_step(tiny_llama):
    from mlpmem.finetune import schedule

    cfg = config(tiny_llama, epochs=3.0, batch_size=3)
    s1, s2 = schedule(10, cfg), schedule(10, cfg)
    forward = [s1.rows(i)[0].tolist() for i in range(s1.total)]
    backward = [s2.rows(i)[0].tolist() for i in reversed(range(s2.total))][::-1]  # any step, in any order
    assert forward == backward and s1.total == 10
    stream = [x for r in forward for x in r]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # each epoch sees every chunk once
    assert stream[:10] != stream[10:20]  # and in a new order


# ----------------------------------------------------------------------------- refusals


def test_bad_input_is_refused_before_anything_is_written(tiny_llama, tiny_models, corpus, memory_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def refused(match: str, cfg: FinetuneConfig, corpus_dir=corpus) -> None:
        with pytest.raises(MlpmemError, match=match):
            finetune(cfg, corpus_dir, out)
        assert not out.exists()

    # a memory trained for another base model (same tokenizer, other weights), or another tokenizer
    other = write_memory(tmp_path / "other_mem", tiny_models["gpt2"], layer=0)
    refused("base model|trained on|weights", config(tiny_llama, memory=str(other), lambda_=0.3))
    foreign_tok = write_memory(tmp_path / "tok_mem", tiny_llama, tokenizer_hash="0123456789abcdef")
    refused("tokenizer", config(tiny_llama, memory=str(foreign_tok), lambda_=0.3))
    # lambda outside [0, 1], or with no memory to weigh
    for lam in (-0.1, 1.5, float("nan")):
        refused("lambda_", config(tiny_llama, memory=str(memory_dir), lambda_=lam))
    refused("lambda_", config(tiny_llama, lambda_=0.3))
    # no lambda given, and no run report next to the memory to take it from
    refused("no lambda", config(tiny_llama, memory=str(memory_dir)))
    # a split shorter than one chunk
    refused("fewer than one chunk", config(tiny_llama, tokens=20))
    refused("fewer than one chunk", config(tiny_llama, chunk=100000))
    # lora without peft: the error names the extra
    monkeypatch.setitem(sys.modules, "peft", None)
    refused(r"mlpmem\[finetune\]", config(tiny_llama, method="lora"))
    monkeypatch.undo()
    refused("method", config(tiny_llama, method="qlora"))
