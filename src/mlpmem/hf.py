"""mlpmem's side of the Hugging Face model class: constructors from mlpmem folders, checks, registration.

The class itself, ``MLPMemoryForCausalLM`` with its composite ``MLPMemoryConfig``,
lives in :mod:`mlpmem.modeling_mlpmem`, a self-contained file that
``save_pretrained`` copies next to the weights (see there for the forward pass,
saving and loading). This module adds what needs the rest of mlpmem:

- :func:`from_memory`: pair a memory folder of the train stage with its base model,
  loaded by mlpmem's names (``smollm2-135m``, ``.gguf`` files, folders, hub ids);
- :func:`check_base`: the tokenizer (hash) and the base model's weights
  (:func:`mlpmem.models.model_fingerprint`) against the memory's record; the
  model class calls it whenever it pairs an LM with a memory and mlpmem is installed;
- :func:`export_hf`: a memory folder -> a Hugging Face model folder;
- registration with ``AutoConfig`` / ``AutoModelForCausalLM``, so saved folders load
  without ``trust_remote_code`` once this module is imported.

Setting lambda (the memory's weight) and the memory temperature T:

- at load time: ``from_pretrained(path, lambda_=0.3, memory_temperature=1.0)``;
- persistently: ``model.set_lambda(0.3)``;
- for a block of code: ``with model.mixing(lambda_=0.3): model.generate(...)``;
- per call: ``model(ids, lambda_=0.3)`` or ``model.generate(ids, lambda_=0.3)``.

Gated mixing (lambda per token from the memory's gate, mlpmem.gate): a memory whose run
trained a gate (RUN/gate) loads with it and mixes per token by default; ``mixing="fixed"``
(at load time, in ``set_lambda(mode=...)``, ``mixing(mode=...)`` or per call) uses lambda_
instead, and a call that passes ``lambda_`` gets the fixed mixture with that lambda.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM

from mlpmem.errors import MlpmemError
from mlpmem.memory import load_memory
from mlpmem.modeling_mlpmem import (  # noqa: F401  (re-exported)
    MEMORY_DIR,
    MLPMemoryConfig,
    MLPMemoryForCausalLM,
    check_parts,
    check_temperature,
)
from mlpmem.models import check_fingerprint, tokenizer_hash

log = logging.getLogger(__name__)


def check_base(lm: Any, meta: dict[str, Any], tokenizer: Any = None) -> None:
    """Refuse a base model that is not the one the memory was trained on: its tokenizer hash and its weights' fingerprint."""
    fix = "use the base model (and tokenizer) the memory was trained for, or train a memory for this model"
    name = str(getattr(lm.config, "name_or_path", "") or type(lm).__name__)
    if tokenizer is not None and meta.get("tokenizer_hash") and tokenizer_hash(tokenizer) != meta["tokenizer_hash"]:
        raise MlpmemError(
            f"the tokenizer of the base model {name} differs from the one the memory was trained with "
            f"(hash {tokenizer_hash(tokenizer)} vs {meta['tokenizer_hash']}, memory trained on {meta.get('model_id')!r})", fix,
        )
    check_fingerprint(meta.get("model_fingerprint"), lm, expected_name=str(meta.get("model_id")), model_name=name, fix=fix)


def from_memory(
    cls: type = MLPMemoryForCausalLM,
    memory_dir: str | os.PathLike = "",
    base_model: str | None = None,
    *,
    lambda_: float = 0.25,
    memory_temperature: float = 1.0,
    dtype: str = "float32",
    gate: str | os.PathLike | None = "auto",
    mixing: str | None = None,
) -> MLPMemoryForCausalLM:
    """Pair a memory folder (from the train stage) with its base model, loaded by name (``MLPMemoryForCausalLM.from_memory``).

    ``base_model`` defaults to the model the memory was trained on (its meta's
    model_id). The run's results found next to the memory (the train stage's
    manifest, the pipeline's report) go into the meta, so a saved model card shows them.
    ``gate``: a gate folder (mlpmem.gate), ``"auto"`` (the run's RUN/gate next to
    RUN/train/memory, if there is one) or None; a gate trained for another memory is
    refused. ``mixing``: ``"fixed"`` or ``"gated"``; default gated when a gate is found.
    """
    from mlpmem.gate import find_gate, load_gate
    from mlpmem.models import load_model

    memory, meta = load_memory(Path(memory_dir))
    ref = base_model or meta.get("model_id")
    if not ref:
        raise MlpmemError(f"the memory in {memory_dir} does not record its base model", "pass base_model=MODEL")
    gate_dir = find_gate(Path(memory_dir)) if gate == "auto" else (Path(gate) if gate else None)
    if mixing == "gated" and gate_dir is None:
        raise MlpmemError(f"mixing='gated' needs a gate, and none was found for the memory in {memory_dir}",
                          "train one (recipe `eval: {mixing: gated}`), pass gate=FOLDER, or use mixing='fixed'")
    gate_module, gate_meta = load_gate(gate_dir, memory) if gate_dir is not None else (None, None)
    if gate_dir is not None:
        log.info("mixing gate: %s", gate_dir)
    lm, tok, model_id = load_model(str(ref), dtype=dtype)
    meta = dict(meta)
    results = meta.get("results") or run_results(Path(memory_dir))
    if results:
        meta["results"] = results
    return cls.from_parts(lm, memory, meta, tokenizer=tok, base_model=model_id, lambda_=lambda_, memory_temperature=memory_temperature,
                          gate=gate_module, gate_meta=gate_meta, mixing=mixing)


def run_results(memory_dir: Path) -> dict[str, Any]:
    """What the run that trained this memory measured, from the files the stages leave next to it (or {})."""
    from mlpmem.manifest import read_json

    out: dict[str, Any] = {}
    train_manifest = memory_dir.parent / "manifest.json"
    report = memory_dir.parent.parent / "report.json"
    try:
        if train_manifest.is_file():
            m = read_json(train_manifest)
            out.update({k: m[k] for k in ("valid", "steps", "epochs", "n_rows") if m.get(k) is not None})
        if report.is_file():
            r = read_json(report)
            out.update({k: r[k] for k in ("ppl", "lambda", "corpus", "n_train_tokens", "n_test_tokens") if r.get(k) is not None})
    except (OSError, ValueError, MlpmemError) as e:  # results are a courtesy for the model card, never a reason to fail
        log.info("no run results read next to %s (%s)", memory_dir, e)
    return out


def export_hf(
    memory_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model: str | None = None,
    lambda_: float = 0.25,
    memory_temperature: float = 1.0,
    full_export: bool = False,
    gate: str | os.PathLike | None = "auto",
    mixing: str | None = None,
) -> Path:
    """Turn a trained memory folder into a Hugging Face model folder (``AutoModelForCausalLM`` loads it). Returns out_dir."""
    from mlpmem.manifest import claim_out

    claim_out(Path(out_dir), "export")  # never into a stage folder or a folder of the user's
    model = MLPMemoryForCausalLM.from_memory(memory_dir, base_model, lambda_=lambda_, memory_temperature=memory_temperature, gate=gate, mixing=mixing)
    model.save_pretrained(out_dir, full_export=full_export)
    log.info("LM + memory saved to %s (%s)", out_dir, "self-contained" if full_export else f"base model: {model.config.base_model}")
    return Path(out_dir)


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` load ``model_type: mlpmem`` folders (idempotent)."""
    AutoConfig.register("mlpmem", MLPMemoryConfig, exist_ok=True)
    AutoModelForCausalLM.register(MLPMemoryConfig, MLPMemoryForCausalLM, exist_ok=True)


register()
