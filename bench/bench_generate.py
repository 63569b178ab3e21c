"""Generation speed: base LM against LM + MLP memory, batch 1 and 8 (not a test).

    python bench/bench_generate.py [--model smollm2-135m] [--blocks 4] [--new-tokens 32] [--prompt-tokens 32] [--repeats 3] [--quick]

The memory is built from its config with random weights (speed does not depend on
the weights): width = the LM's hidden size, ``--blocks`` residual blocks, a head
over the LM's logits size; it reads the last layer's FFN input. Greedy decoding
with the KV cache, exactly ``--new-tokens`` new tokens per sequence. Alongside the
measured tokens/s it gives the arithmetic ratio LM / (LM + memory) per token, with
2 * parameters as the FLOPs of one token (attention over the context left out: it
only adds to the LM side). Prints one JSON line and writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from provenance import results_dir, start, write_result

from mlpmem.hf import MLPMemoryForCausalLM
from mlpmem.memory import MemoryConfig, MLPMemory
from mlpmem.models import load_model, logits_size, num_parameters, tokenizer_hash


def tokens_per_s(model, ids: torch.Tensor, new_tokens: int, repeats: int, **kw) -> float:
    """Median over ``repeats`` of batch * new_tokens / seconds of one greedy generate call (after one warm-up)."""
    args = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids), **kw)
    model.generate(ids, **args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = model.generate(ids, **args)
        times.append(time.perf_counter() - t)
        assert out.shape[1] == ids.shape[1] + new_tokens
    return ids.shape[0] * new_tokens / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lambda", dest="lam", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="default: bench/results/generate.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 new tokens, batch 1, 1 repeat, writes generate_quick.json")
    a = p.parse_args()
    started = start()
    a.out = a.out or str(results_dir() / "generate.json")
    if a.quick:
        a.new_tokens, a.batches, a.repeats = 8, [1], 1
        a.out = a.out.replace("generate.json", "generate_quick.json")

    if a.threads:
        # on a loaded machine, multi-threaded tiny decode ops spin-wait on each other
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    lm, tok, model_id = load_model(a.model)
    d = lm.config.get_text_config().hidden_size
    memory = MLPMemory(MemoryConfig(d_in=d, vocab_size=logits_size(lm), n_blocks=a.blocks)).eval().requires_grad_(False)
    meta = {"model_id": model_id, "tokenizer_hash": tokenizer_hash(tok), "layer": -1, "site": "ffn_input"}
    mixed = MLPMemoryForCausalLM.from_parts(lm, memory, meta, tokenizer=tok, lambda_=a.lam).eval()

    n_lm, n_mem = num_parameters(lm), memory.num_parameters()
    result = {
        "model": model_id,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "load_average_at_start": os.getloadavg()[0],  # other jobs on the cores skew small-op timings
        "torch": torch.__version__,
        "memory": {"blocks": a.blocks, "width": d, "vocab": logits_size(lm), "params": n_mem},
        "lm_params": n_lm,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "lambda": a.lam,
        # 2 * params FLOPs per token for each part; the memory runs once per generated token
        "flops_ratio_lm_over_lm_plus_memory": n_lm / (n_lm + n_mem),
        "batches": {},
    }
    with torch.inference_mode():
        for b in a.batches:
            ids = torch.randint(100, min(len(tok), logits_size(lm)), (b, a.prompt_tokens))
            base = tokens_per_s(lm, ids, a.new_tokens, a.repeats)
            mix = tokens_per_s(mixed, ids, a.new_tokens, a.repeats)
            lam0 = tokens_per_s(mixed, ids, a.new_tokens, a.repeats, lambda_=0.0)  # wrapper overhead without the memory
            result["batches"][str(b)] = {
                "base_tokens_per_s": round(base, 1),
                "lm_plus_memory_tokens_per_s": round(mix, 1),
                "wrapper_lambda0_tokens_per_s": round(lam0, 1),
                "measured_ratio": round(mix / base, 3),
            }
    print(json.dumps(result))
    write_result(a.out, result, started)


if __name__ == "__main__":
    main()
