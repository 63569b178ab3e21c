"""Side-by-side continuations: the base LM and LM + memory on the same prompts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mlpmem.errors import MlpmemError

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    max_new_tokens: int = 40
    lambda_: float | None = None  # the memory's weight; None: what its run fitted (its gate, else its valid lambda)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    seed: int = 0
    mixing: str | None = None  # fixed | gated | routed; default: the saved model's (gated when a memory has a gate, routed with a router)


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    out = list(prompts)
    if prompts_file:
        try:
            out += [line.rstrip("\n") for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise MlpmemError(f"cannot read prompts from {prompts_file} ({e})", "pass a UTF-8 text file with one prompt per line")
    if not out:
        raise MlpmemError("no prompts given", "pass prompts as arguments or --prompts-file FILE (one per line)")
    return out


def generate_side_by_side(
    model_path: str, prompts: list[str], cfg: GenerateConfig, base_model: str | None = None, device: str = "auto", dtype: str = "float32"
) -> list[dict[str, str]]:
    """Continue each prompt with the base LM (lambda=0) and with LM + memory (cfg.lambda_, else what its run fitted; or per token: the memory's
    gate, or the router of a model with several memories).

    ``model_path`` is a trained memory folder (``.../train/memory``) or a folder
    written by ``save_pretrained``. Prompts are left-padded into one batch. The LM
    and its memory run together on ``device``, the LM in ``dtype`` (models.resolve_device).
    """
    import torch

    from mlpmem.transformers_integration import MLPMemoryForCausalLM
    from mlpmem.modeling.mixing import check_model_mixing
    from mlpmem.models import dtype_name, resolve_device

    dev, dt = resolve_device(device, dtype)
    mix = {} if cfg.mixing is None else {"mixing": check_model_mixing(cfg.mixing)}
    lam = {} if cfg.lambda_ is None else {"lambda_": cfg.lambda_}
    path = Path(model_path)
    if (path / "memory_config.json").exists():
        model = MLPMemoryForCausalLM.from_memory(path, base_model, dtype=dtype_name(dt), **lam, **mix)
    else:
        model = MLPMemoryForCausalLM.from_pretrained(path, base_model=base_model, dtype=dtype_name(dt), **lam, **mix)
    model.to(dev)  # the memory goes where the LM is
    tok = model.tokenizer if getattr(model, "tokenizer", None) is not None else None
    if tok is None:
        from mlpmem.models import load_tokenizer

        # a full export loads on transformers' standard path, which leaves the tokenizer to the caller: it is saved alongside
        tok = load_tokenizer(str(path) if (path / "tokenizer_config.json").exists() else (base_model or model.config.base_model))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True).to(dev)
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, num_beams=cfg.num_beams, pad_token_id=tok.pad_token_id)
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    out = {}
    per_token = model.mixing_mode in ("gated", "routed")
    for name, lam in (("base", 0.0), ("memory", model.lambda_)):
        torch.manual_seed(cfg.seed)
        # the gate's or the router's weights per token (a lambda_ per call would ask for the fixed mixture)
        mixing = {"mixing": model.mixing_mode} if per_token and name == "memory" else {"lambda_": lam}
        with torch.inference_mode():
            ids = model.generate(**batch, **mixing, **kwargs)
        out[name] = tok.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [
        {"prompt": p, "base": b, "memory": m, "mixing": model.mixing_mode, "lambda": model.lambda_}
        for p, b, m in zip(prompts, out["base"], out["memory"])
    ]
