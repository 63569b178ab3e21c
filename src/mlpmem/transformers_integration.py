"""mlpmem's side of the Hugging Face model class: constructors from mlpmem folders, checks, registration.

The class itself, ``MLPMemoryForCausalLM`` with its composite ``MLPMemoryConfig``,
lives in :mod:`mlpmem.modeling` (``modeling_mlpmem.py`` and its siblings), self-contained files that
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

Several memories on one LM (issue 12): ``from_memory([dir_a, dir_b])`` or
``model.add_memory(dir_or_module, name=...)`` / ``model.remove_memory(name)``; the LM runs
once, with a hook at each distinct read site. Fixed weights ``weights=[w_LM, w_a, w_b]``
(default lambda_ split evenly), or per-token weights from a router: :func:`fit_router`
(model, valid tokens) fits and attaches one, ``model.set_router`` attaches one fitted
elsewhere (refused if fitted for other memories). ``knn=RUN`` mixes a kNN-LM retriever
(mlpmem.retrieval) through the same class.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM

from mlpmem.errors import MlpmemError
from mlpmem.memory import load_memory, run_results
from mlpmem.modeling.mlp_memory import MEMORY_DIR, check_memory_dtype  # noqa: F401  (MEMORY_DIR re-exported)
from mlpmem.modeling.configuration_mlpmem import MLPMemoryConfig
from mlpmem.modeling.modeling_mlpmem import MLPMemoryForCausalLM
from mlpmem.models import check_fingerprint, tokenizer_hash

log = logging.getLogger(__name__)


def check_base(lm: Any, meta: dict[str, Any], tokenizer: Any = None) -> None:
    """Refuse a base model that is not the one the memory was trained on: its tokenizer hash and its weights' fingerprint."""
    fix = "use the base model (and tokenizer) the memory was trained for, or train a memory for this model"
    name = str(getattr(lm.config, "name_or_path", "") or type(lm).__name__)
    if tokenizer is not None and meta.get("tokenizer_hash") and tokenizer_hash(tokenizer) != meta["tokenizer_hash"]:
        raise MlpmemError(
            f"the tokenizer of the base model {name} differs from the one the memory was trained with "
            f"(hash {tokenizer_hash(tokenizer)} vs {meta['tokenizer_hash']}, memory trained on {meta.get('model_id')!r})",
            fix,
        )
    check_fingerprint(meta.get("model_fingerprint"), lm, expected_name=str(meta.get("model_id")), model_name=name, fix=fix)


def load_base(ref: str, dtype: str) -> tuple[Any, Any]:
    """A base model by mlpmem's names (aliases such as ``smollm2-135m``, ``.gguf`` files, folders, hub ids),
    refusing non-causal models: (LM in eval mode, tokenizer). The model class's loader by reference."""
    from mlpmem.models import load_model

    lm, tok, _ = load_model(ref, dtype=dtype)
    return lm, tok


def from_memory(
    cls: type = MLPMemoryForCausalLM,
    memory_dir: "str | os.PathLike | list[str | os.PathLike]" = "",
    base_model: str | None = None,
    *,
    lambda_: float | None = None,
    memory_temperature: float = 1.0,
    dtype: str = "float32",
    gate: str | os.PathLike | None = "auto",
    mixing: str | None = None,
    names: list[str] | None = None,
    weights: list[float] | None = None,
    router: str | os.PathLike | None = None,
    knn: "str | os.PathLike | list[str | os.PathLike] | None" = None,
    memory_dtype: str | None = None,
) -> MLPMemoryForCausalLM:
    """Pair one or more memory folders (from the train stage) with their base model, loaded by name (``MLPMemoryForCausalLM.from_memory``).

    ``base_model`` defaults to the model the (first) memory was trained on (its meta's
    model_id). The mixing defaults to what the memory's run fitted on valid: its gate when there is
    one, else its lambda (the run's report, else the train stage's valid fit); an explicit ``lambda_``
    (or ``weights``) asks for the fixed mixture with it, and then no gate is loaded. The run's results found next to the memory (the train stage's
    manifest, the pipeline's report) go into the meta, so a saved model card shows them.
    ``gate``: a gate folder (mlpmem.gate), ``"auto"`` (the run's RUN/gate next to
    RUN/train/memory, if there is one) or None; a gate trained for another memory is
    refused; with several memories it is looked for only when named. ``mixing``:
    ``"fixed"``, ``"gated"`` (one memory) or ``"routed"``; default gated when a gate is found
    for a single memory, routed when a router is given.

    Several memories: ``memory_dir`` a list of folders (``names``: their names, default each
    run's folder name for RUN/train/memory, else the folder's name); ``knn``: kNN-LM run folders
    (mlpmem.retrieval.KNNRetriever.from_run) mixed as more components, after the memories (a run
    folder alone, with ``memory_dir`` empty, gives LM + kNN-LM); ``weights``: fixed weights [LM,
    each memory] (default lambda_ split evenly); ``router``: a router folder saved for these
    memories (a model's ``router/``), or fit one afterwards with :func:`fit_router`. ``memory_dtype="int8"``: the
    memories' linear layers run in int8 at inference (CPU, float32 model; the weights stay float32); unset, what the
    memory's run scored it with (``eval.memory_dtype``, in its report), float32 for a run that recorded none.
    """
    from mlpmem.gate import find_gate, load_gate
    from mlpmem.models import load_model
    from mlpmem.modeling.gating import GATE_WEIGHTS, ROUTER_CONFIG, read_router_folder

    dirs = [Path(d) for d in (memory_dir if isinstance(memory_dir, (list, tuple)) else [memory_dir] if str(memory_dir) else [])]
    knn_dirs = [Path(d) for d in (knn if isinstance(knn, (list, tuple)) else [knn] if knn else [])]
    if not dirs and not knn_dirs:
        raise MlpmemError("no memory to load", "pass a memory folder (RUN/train/memory), several, or knn=RUN")
    parts = [(d, *load_memory(d)) for d in dirs] + [(d, *_load_knn(d)) for d in knn_dirs]
    if names is None:
        names = (["memory"] if dirs else ["knn"]) if len(parts) == 1 else _default_names([d for d, _, _ in parts], [m for _, m, _ in parts])
    if len(names) != len(parts):
        raise MlpmemError(f"{len(names)} names for {len(parts)} memories", "pass one name per memory folder (and kNN run), in order")
    first_dir, memory, meta = parts[0]
    ref = base_model or meta.get("model_id") or meta.get("base_model")
    if not ref:
        raise MlpmemError(f"the memory in {first_dir} does not record its base model", "pass base_model=MODEL")
    single_mlp = len(parts) == 1 and not knn_dirs
    # what each run measured, read once: the model card shows it, and the default lambda comes from it
    metas = []
    for d, _, m in parts:
        m = dict(m)
        results = m.get("results") or (run_results(d) if (d / "memory_config.json").is_file() else {})
        if results:
            m["results"] = results
        metas.append(m)
    if (lambda_ is not None or weights is not None) and mixing is None:
        mixing = "fixed"  # an explicit lambda_ means the fixed mixture with it, whatever the run fitted
    if lambda_ is None:
        lambda_ = default_lambda([m.get("results") or {} for m in metas[: len(dirs)]], dirs)
    if mixing == "fixed" and gate == "auto":
        gate = None  # a gate the mixing does not use is neither loaded nor checked
    gate_dir = (find_gate(first_dir) if single_mlp else None) if gate == "auto" else (Path(gate) if gate else None)
    if mixing == "gated" and gate_dir is None:
        raise MlpmemError(
            f"mixing='gated' needs a gate, and none was found for the memory in {memory_dir}",
            "train one (recipe `eval: {mixing: gated}`), pass gate=FOLDER, or use mixing='fixed'",
        )
    gate_module, gate_meta = load_gate(gate_dir, memory) if gate_dir is not None else (None, None)
    if gate_dir is not None:
        log.info("mixing gate: %s", gate_dir)
    router_module, router_meta = (None, None)
    if router is not None:
        router_module, router_meta = read_router_folder({f: str(Path(router) / f) for f in (ROUTER_CONFIG, GATE_WEIGHTS)})
    check_memory_dtype(memory_dtype)  # before the LM loads
    lm, tok, model_id = load_model(str(ref), dtype=dtype)
    model = cls.from_parts(
        lm,
        memory,
        metas[0],
        tokenizer=tok,
        base_model=model_id,
        lambda_=lambda_,
        memory_temperature=memory_temperature,
        gate=gate_module,
        gate_meta=gate_meta,
        mixing=mixing,
        name=names[0],
        memories=[(n, m, mt) for n, (_, m, _), mt in zip(names[1:], parts[1:], metas[1:])],
        weights=weights,
        router=router_module,
        router_meta=router_meta,
    )
    model.apply_memory_dtype(memory_dtype)  # unset: int8 where the memory's run was scored in int8
    return model


def default_lambda(results: list[dict[str, Any]], memory_dirs: list[Path]) -> float:
    """The lambda each memory's run fitted on valid (``results``: what :func:`run_results` read next to each of
    ``memory_dirs``; the pipeline's report, else the train stage's own valid fit), the mean over several memories.
    0.25, with a warning, only for memories whose run recorded none."""
    fitted = []
    for r in results:
        lam = (r.get("lambda") or {}).get("mlp_memory")
        if lam is None:
            lam = (r.get("valid") or {}).get("lambda")
        if lam is not None:
            fitted.append(float(lam))
    if memory_dirs and len(fitted) == len(memory_dirs):
        return sum(fitted) / len(fitted)
    log.warning(
        "no lambda fitted on valid is recorded next to %s: mixing with lambda 0.25; pass lambda_= to choose",
        [str(d) for d in memory_dirs] or "the kNN-LM runs",
    )
    return 0.25


def _load_knn(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """A kNN-LM retriever over a finished run's datastore and index (mlpmem.retrieval, issue 12 item 3)."""
    try:
        from mlpmem.retrieval import KNNRetriever
    except ImportError:
        raise MlpmemError("this mlpmem has no kNN-LM component (mlpmem.retrieval)", "update mlpmem, or leave out knn=")
    knn = KNNRetriever.from_run(run_dir)
    return knn, dict(knn.meta)


def _default_names(dirs: list[Path], modules: list) -> list[str]:
    """Names for several memories: the run's name for RUN/train/memory (and a kNN-LM run's name + "_knn"),
    else the folder's; made valid and unique."""
    import re

    from mlpmem.modeling.mlp_memory import MLPMemory
    from mlpmem.modeling.modeling_mlpmem import RESERVED_NAMES

    out: list[str] = []
    for d, m in zip(dirs, modules):
        d = d.resolve()
        base = d.parent.parent.name if (d.name == "memory" and d.parent.name == "train") else d.name
        base = re.sub(r"\W", "_", base).strip("_") or "memory"
        if not base[0].isalpha():
            base = "m_" + base
        base = base[:56] + ("" if isinstance(m, MLPMemory) else "_knn")
        name, i = base, 1
        while name in out or name in RESERVED_NAMES:
            name, i = f"{base}_{i}", i + 1
        out.append(name)
    return out


def fit_router(
    model: MLPMemoryForCausalLM,
    tokens: "Any",
    context: int = 512,
    stride: int = 256,
    cfg: Any = None,
    batch_size: int = 8,
    holdout: Any = None,
) -> dict[str, Any]:
    """Fit a router over the model's memories on ``tokens`` (one token array, or a list of them, e.g. the valid split of
    each memory's domain) and attach it (``mixing="routed"``). Scores with :func:`mlpmem.gate.score_memories` (windows
    ``context`` / ``stride``, the LM run once), fits with :func:`mlpmem.gate.fit_router` (``cfg``: a GateConfig).
    Returns the fit's record (also kept in the router's meta, saved with the model)."""
    import numpy as np
    import torch

    from mlpmem.gate import GateConfig
    from mlpmem.gate import fit_router as fit
    from mlpmem.gate import score_memories
    from mlpmem.modeling.modeling_mlpmem import component_logprobs
    from mlpmem.modeling.read_site import ReadSite

    class Scored(torch.nn.Module):  # the component as the model mixes it (temperature applied, log-probs out)
        def __init__(self, m: torch.nn.Module, temperature: float, device: torch.device) -> None:
            super().__init__()
            self.m, self.t = m, temperature
            self.anchor = torch.nn.Parameter(
                torch.zeros(0, device=device), requires_grad=False
            )  # says the device (a retriever has no weights)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return component_logprobs(self.m, h, self.t)

    arrays = tokens if isinstance(tokens, (list, tuple)) else [tokens]
    device = next(model.lm.parameters()).device
    mems = [(Scored(m, model.memory_temperature, device), ReadSite(*model.sites[n])) for n, m in model.components().items()]
    lps, feats = [], []
    for i, toks in enumerate(arrays):
        _, lp, f, _ = score_memories(
            model.lm, np.asarray(toks), context, stride, mems, batch_size, desc=f"scoring for the router ({i + 1}/{len(arrays)})"
        )
        lps.append(lp)
        feats.append(f)
    router, record = fit(np.concatenate(lps), np.concatenate(feats), cfg or GateConfig(), holdout)
    model.set_router(router, {**model.router_meta(), "record": record, "n_tokens": int(sum(len(x) for x in lps))})
    return record


def export_hf(
    memory_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model: str | None = None,
    lambda_: float | None = None,
    memory_temperature: float = 1.0,
    full_export: bool = False,
    gate: str | os.PathLike | None = "auto",
    mixing: str | None = None,
) -> Path:
    """Turn a trained memory folder into a Hugging Face model folder (``AutoModelForCausalLM`` loads it). Returns out_dir."""
    from mlpmem.folders import claim_out

    claim_out(Path(out_dir), "export")  # never into a stage folder or a folder of the user's
    model = MLPMemoryForCausalLM.from_memory(
        memory_dir, base_model, lambda_=lambda_, memory_temperature=memory_temperature, gate=gate, mixing=mixing
    )
    model.save_pretrained(out_dir, full_export=full_export)
    log.info("LM + memory saved to %s (%s)", out_dir, "self-contained" if full_export else f"base model: {model.config.base_model}")
    return Path(out_dir)


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` load ``model_type: mlpmem`` folders (idempotent)."""
    AutoConfig.register("mlpmem", MLPMemoryConfig, exist_ok=True)
    AutoModelForCausalLM.register(MLPMemoryConfig, MLPMemoryForCausalLM, exist_ok=True)


register()
