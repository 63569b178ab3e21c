"""The lm-eval backend `mlpmem`, offline: local YAML tasks over local JSON files, a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import make_texts  # noqa: E402

from mlpmem.memory import MemoryConfig, MLPMemory, save_memory  # noqa: E402
from mlpmem.models import load_model, logits_size, tokenizer_hash  # noqa: E402

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
        "mc": [{"context": t[:30], "choices": [" " + texts[(i + j) % 6][30:50] for j in range(4)], "label": 0} for i, t in enumerate(texts)],
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
    meta = {"model_id": model_id, "tokenizer_hash": tokenizer_hash(tok), "layer": 1, "site": "ffn_input"}
    save_memory(root / "memory", mem, meta)
    (root / "tasks").mkdir()
    return root, write_tasks(root / "tasks")


def evaluate(model: str, model_args: dict, task_manager):
    import lm_eval

    import mlpmem.lm_eval_backend  # noqa: F401  registers `mlpmem`

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["t_mc", "t_rolling", "t_gen"], task_manager=task_manager,
        batch_size=2, device="cpu", bootstrap_iters=0, log_samples=True, random_seed=0,
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
        want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        assert s["resps"][0][0] == want


def test_device_defaults_to_what_is_there(setup, tmp_path, monkeypatch):
    """No device given: the backend (and `mlpmem-lm-eval` for any backend) use what exists, not lm-eval's default cuda."""
    import sys

    from mlpmem import lm_eval_backend
    from mlpmem.hf import MLPMemoryForCausalLM

    root, _ = setup
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert lm_eval_backend.default_device() == want or torch.backends.mps.is_available()
    lm = lm_eval_backend.MLPMemoryLM(memory=str(root / "memory"), lambda_=0.5, batch_size=1)  # no device, as from the CLI
    assert lm.device.type == lm_eval_backend.default_device()
    from lm_eval.api.instance import Instance

    req = Instance(request_type="loglikelihood", doc={}, arguments=("the union", " and the"), idx=0)
    (logp, _), = lm.loglikelihood([req])
    assert math.isfinite(logp) and logp < 0
    # a full export (pretrained=) brings its own tokenizer
    model, tok = lm_eval_backend.load_mixture(memory=str(root / "memory"), lambda_=0.5)
    model.save_pretrained(tmp_path / "full", full_export=True)
    model2, tok2 = lm_eval_backend.load_mixture(pretrained=str(tmp_path / "full"), lambda_=0.5)
    assert isinstance(model2, MLPMemoryForCausalLM) and tok2 is not None and tok2.get_vocab() == tok.get_vocab()

    seen = []
    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: seen.append(list(sys.argv[1:])))
    lm_eval_backend.main(["--model", "hf", "--model_args", "pretrained=x", "--tasks", "t"])
    lm_eval_backend.main(["--model", "hf", "--device", "cpu:0", "--tasks", "t"])
    assert seen[0][-2:] == ["--device", lm_eval_backend.default_device()] and seen[1].count("--device") == 1
