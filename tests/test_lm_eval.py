"""The lm-eval backend `mlpmem`, offline: local YAML tasks over local JSON files, a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from helpers import make_texts, memory_meta  # noqa: E402

from mlpmem.memory import MemoryConfig, MLPMemory, save_memory  # noqa: E402
from mlpmem.models import load_model, logits_size  # noqa: E402

MC = """task: t_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""

ROLLING = """task: t_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""

GEN = """task: t_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tasks(folder: Path) -> Path:
    texts = make_texts(n_docs=6, words_per_doc=12, seed=3)
    rows = {
        "mc": [
            {"context": t[:30], "choices": [" " + texts[(i + j) % 6][30:50] for j in range(4)], "label": 0} for i, t in enumerate(texts)
        ],
        "rolling": [{"text": t} for t in texts[:3]],
        "gen": [{"prompt": t[:25], "answer": "x"} for t in texts[:2]],
    }
    for name, template in (("mc", MC), ("rolling", ROLLING), ("gen", GEN)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        (folder / f"{name}.yaml").write_text(template.format(data=data))
    return folder


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    lm, tok, model_id = load_model(str(tiny_llama))
    torch.manual_seed(2)
    mem = MLPMemory(MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1, zero_init_blocks=False))
    mem.head.weight.data.normal_(0.0, 0.5)
    meta = memory_meta(model_id, tok, 1, "ffn_input")
    save_memory(root / "memory", mem, meta)
    (root / "tasks").mkdir()
    return root, write_tasks(root / "tasks")


def evaluate(model: str, model_args: dict, task_manager):
    import lm_eval

    import mlpmem.lm_eval_backend  # noqa: F401  registers `mlpmem`

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["t_mc", "t_rolling", "t_gen"],
        task_manager=task_manager,
        batch_size=2,
        device="cpu",
        bootstrap_iters=0,
        log_samples=True,
        random_seed=0,
    )


def test_backend_scores_the_mixture(setup, tiny_llama):
    from lm_eval.tasks import TaskManager

    from mlpmem.lm_eval_backend import load_mixture

    root, tasks_dir = setup
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # the built-in index takes seconds
    mix = evaluate("mlpmem", {"memory": str(root / "memory"), "lambda_": 0.5}, tm)
    base_via_mlpmem = evaluate("mlpmem", {"memory": str(root / "memory"), "base_model": str(tiny_llama), "lambda_": 0.0}, tm)
    base = evaluate("hf", {"pretrained": str(tiny_llama), "dtype": "float32"}, tm)
    r = {k: v["results"] for k, v in (("mix", mix), ("base0", base_via_mlpmem), ("base", base))}
    # lambda = 0 through our backend is the plain HF backend
    for task, metric in (("t_mc", "acc,none"), ("t_rolling", "word_perplexity,none")):
        assert r["base0"][task][metric] == pytest.approx(r["base"][task][metric], rel=1e-6)
    assert r["mix"]["t_rolling"]["word_perplexity,none"] != pytest.approx(r["base"]["t_rolling"]["word_perplexity,none"], rel=1e-3)

    # rolling perplexity equals our own sum of mixture log-probs (one window: the texts are short)
    model, tok = load_mixture(memory=str(root / "memory"), lambda_=0.5)
    total, words = 0.0, 0
    for row in (json.loads(x) for x in (tasks_dir / "rolling.jsonl").read_text().splitlines()):
        ids = torch.tensor([[tok.eos_token_id] + tok(row["text"]).input_ids])
        with torch.no_grad():
            lp = model(ids).logits[0, :-1].gather(-1, ids[0, 1:, None]).sum()
        total += float(lp)
        words += len(row["text"].split())
    assert r["mix"]["t_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)

    # generate_until answers are the model's own greedy continuations, cut at the stop string
    for s in mix["samples"]["t_gen"]:
        prompt = s["doc"]["prompt"]
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        want = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        assert s["resps"][0][0] == want


def test_device_defaults_to_what_is_there(setup, tmp_path, monkeypatch):
    """No device given: the backend (and `mlpmem-lm-eval` for any backend) use what exists, not lm-eval's default cuda."""
    import sys

    from mlpmem import lm_eval_backend
    from mlpmem.transformers_integration import MLPMemoryForCausalLM

    root, _ = setup
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert lm_eval_backend.default_device() == want or torch.backends.mps.is_available()
    lm = lm_eval_backend.MLPMemoryLM(memory=str(root / "memory"), lambda_=0.5, batch_size=1)  # no device, as from the CLI
    assert lm.device.type == lm_eval_backend.default_device()
    from lm_eval.api.instance import Instance

    req = Instance(request_type="loglikelihood", doc={}, arguments=("the union", " and the"), idx=0)
    ((logp, _),) = lm.loglikelihood([req])
    assert math.isfinite(logp) and logp < 0
    # a full export (pretrained=) brings its own tokenizer
    model, tok = lm_eval_backend.load_mixture(memory=str(root / "memory"), lambda_=0.5)
    model.save_pretrained(tmp_path / "full", full_export=True)
    model2, tok2 = lm_eval_backend.load_mixture(pretrained=str(tmp_path / "full"), lambda_=0.5)
    assert isinstance(model2, MLPMemoryForCausalLM) and tok2 is not None and tok2.get_vocab() == tok.get_vocab()

    seen = []
    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: seen.append(list(sys.argv[1:])))
    from mlpmem.lm_eval_cli import main as lm_eval_main

    lm_eval_main(["--model", "hf", "--model_args", "pretrained=x", "--tasks", "t"])
    lm_eval_main(["--model", "hf", "--device", "cpu:0", "--tasks", "t"])
    assert seen[0][-2:] == ["--device", lm_eval_backend.default_device()] and seen[1].count("--device") == 1


def test_a_memory_trained_after_bos_scores_after_bos(setup, tmp_path):
    """A memory whose datastore put <bos> before every window (its meta records the prefix) is scored by lm-eval with
    <bos> in front of every request, as it was trained; other memories keep HFLM's default; add_bos_token= wins."""
    from mlpmem import lm_eval_backend
    from mlpmem.memory import load_memory

    root, _ = setup
    mem, meta = load_memory(root / "memory")
    save_memory(tmp_path / "bos", mem, dict(meta, prefix=[0]))
    assert lm_eval_backend.MLPMemoryLM(memory=str(tmp_path / "bos"), lambda_=0.5, batch_size=1, device="cpu").add_bos_token is True
    assert lm_eval_backend.MLPMemoryLM(memory=str(root / "memory"), lambda_=0.5, batch_size=1, device="cpu").add_bos_token is None
    assert (
        lm_eval_backend.MLPMemoryLM(
            memory=str(tmp_path / "bos"), lambda_=0.5, batch_size=1, device="cpu", add_bos_token=False
        ).add_bos_token
        is False
    )


@pytest.fixture(scope="module")
def mixings(setup, tiny_llama, tmp_path_factory):
    """model_args for each mixing the backend has: fixed lambda, lambda 0, the run's gate, LM + kNN-LM, LM + memory + kNN-LM."""
    from helpers import tiny_knn_run
    from mlpmem.gate import GateConfig, MixingGate, gate_meta, save_gate
    from mlpmem.memory import load_memory

    root, _ = setup
    run = tmp_path_factory.mktemp("mixings") / "run"
    mem, meta = load_memory(root / "memory")
    save_memory(run / "train" / "memory", mem, meta)
    torch.manual_seed(5)
    gate = MixingGate("mlp", hidden=4)
    with torch.no_grad():  # centred on the features' usual values, so that lambda varies from token to token
        gate.shift.copy_(torch.tensor([4.0, -2.0, 3.0, -1.0, 5.0, 4.0, 0.5]))
        gate.inner.weight.normal_(0, 1.0)
        gate.out.weight.normal_(0, 1.0)
    save_gate(run / "gate", gate.eval(), gate_meta(mem, GateConfig(), {}, meta))
    tiny_knn_run(run, tiny_llama)
    mdir, fixed = run / "train" / "memory", root / "memory"
    return {
        "fixed": f"memory={fixed},lambda_=0.5",
        "lambda0": f"memory={fixed},lambda_=0",
        "gated": f"memory={mdir}",
        "knn": f"knn={run},lambda_=0.3",
        "memory+knn": f"memory={fixed},knn={run},lambda_=0.4",
        "routed": f"memory={fixed},knn={run}",
    }


MAX_LENGTH = 40


def scoring_requests(lm) -> list:
    """Multiple-choice-like requests: contexts shared by 1 to 4 continuations of 1 to several tokens, an empty context,
    the model's own greedy continuations (is_greedy true), and pairs of exactly max_length + 1 tokens (HFLM's input
    fits untruncated) and longer (HFLM cuts them from the left: max_length + 2 by one token)."""
    from lm_eval.api.instance import Instance

    from mlpmem.lm_eval_backend import encode_request

    texts = make_texts(n_docs=4, words_per_doc=40, seed=11)
    words = texts[0].split()
    pairs = [
        ("the union of", " the states"),
        ("the union of", " a"),
        ("the union of", " many more of them"),
        ("the union of", " war"),
        (" ".join(words[:6]), " peace"),
        (" ".join(words[:6]), " trade and money"),
        ("", " congress of the nation"),
        ("Question: which?\nAnswer:", " b"),
    ]
    for ctx in ("the union of", " ".join(words[:6])):  # the model's own greedy next tokens
        ids = lm.tok_encode(ctx)
        with torch.no_grad():
            out = lm.model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
        pairs += [(ctx, lm.tokenizer.decode(out[0, len(ids) : len(ids) + 1])), (ctx, lm.tokenizer.decode(out[0, len(ids) :]))]
    total = {}
    for n in range(1, len(words) + 1):
        for cont in (" a", " union", " of the", " peace of", " peace of the people"):
            c, k = encode_request(lm, " ".join(words[:n]), cont)
            total.setdefault(len(c) + len(k), (" ".join(words[:n]), cont))
    assert MAX_LENGTH + 1 in total and MAX_LENGTH + 2 in total, sorted(total)
    pairs += [total[MAX_LENGTH + 1], total[MAX_LENGTH + 2], max(total.items())[1], (max(total.items())[1][0], " states")]
    return [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]


@pytest.mark.parametrize("mixing", ["fixed", "lambda0", "gated", "knn", "memory+knn", "routed"])
def test_shared_context_default_equals_hflm(mixings, mixing):
    """The backend's default loglikelihood (each context once, its continuations over the KV cache) gives HFLM's
    per-request log-likelihoods and greedy flags (shared_context=false), for every mixing and past max_length.
    Red when the fallback is dropped, its length rule is off by one, or the continuations' positions shift by one."""
    from lm_eval.api.registry import get_model

    from mlpmem.lm_eval_backend import encode_request

    extra = {"batch_size": 3, "device": "cpu"}
    new = get_model("mlpmem").create_from_arg_string(f"{mixings[mixing]},max_length={MAX_LENGTH}", extra)
    old = get_model("mlpmem").create_from_arg_string(f"{mixings[mixing]},max_length={MAX_LENGTH},shared_context=false", extra)
    assert new.shared_context and not old.shared_context and new.get_model_info()["mlpmem"]["shared_context"]
    if mixing == "routed":  # a router over the memory and the kNN-LM, with weights that vary per token
        from mlpmem.modeling.gating import MemoryRouter

        torch.manual_seed(0)
        router = MemoryRouter(2, hidden=8)
        with torch.no_grad():
            router.out.weight.normal_(0.0, 2.0)
            router.scale.fill_(3.0)
        for b in (new, old):
            b.model.set_router(router.eval())
    kinds = [type(m).__name__ for m in new.model.components().values()]
    assert new.model.mixing_mode == {"gated": "gated", "routed": "routed"}.get(mixing, "fixed")
    assert ("KNNRetriever" in kinds) == (mixing in ("knn", "memory+knn", "routed"))
    reqs = scoring_requests(new)
    assert max(sum(map(len, encode_request(new, *r.args))) for r in reqs) > MAX_LENGTH + 1
    want = old.loglikelihood(reqs, disable_tqdm=True)
    got = new.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    assert any(g for _, g in want) and not all(g for _, g in want)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-5, abs=1e-4)
    assert len({round(lp, 4) for lp, _ in got}) == len({r.args for r in reqs})  # distinct numbers: a mix-up of rows would show


def test_an_explicit_lambda_means_the_fixed_mixture(mixings):
    """`memory=M,lambda_=0` on a memory whose run has a gate is the base LM (README's baseline), not the gated mixture;
    `memory=M` alone uses the gate the run fitted."""
    from lm_eval.api.registry import get_model

    import mlpmem.lm_eval_backend  # noqa: F401  registers `mlpmem`

    extra = {"batch_size": 1, "device": "cpu"}
    base = get_model("mlpmem").create_from_arg_string(f"{mixings['gated']},lambda_=0", extra)
    assert base.model.mixing_mode == "fixed" and base.model.lambda_ == 0.0 and base.model.gate is None
    gated = get_model("mlpmem").create_from_arg_string(mixings["gated"], extra)
    assert gated.model.mixing_mode == "gated"
