"""A Hugging Face model class: any causal LM + a trained MLP memory, mixed at every position.

``MLPMemoryForCausalLM`` wraps a frozen HF causal LM (``.lm``) and an
:class:`~mlpmem.memory.MLPMemory` (``.memory``). Its forward returns, as ``logits``,
the interpolated log-probabilities

    log p = logaddexp(log(1 - lambda) + log_softmax(lm_logits), log(lambda) + log_softmax(memory_logits / T))

which are valid logits for greedy search, sampling and beam search, so the whole of
``generate()`` works unchanged. The memory reads the LM's hidden state at the
recorded (layer, site) through a forward hook that exists only during the LM call
(:func:`mlpmem.models.capture`); the LM's ``forward`` is never replaced.

Setting lambda (the memory's weight) and the memory temperature T:

- at load time: ``from_pretrained(path, lambda_=0.3, memory_temperature=1.0)``;
- persistently: ``model.set_lambda(0.3)``;
- for a block of code: ``with model.mixing(lambda_=0.3): model.generate(...)``;
- per call: ``model(ids, lambda_=0.3)`` or ``model.generate(ids, lambda_=0.3)``. The
  keyword reaches every forward of the generation loop because ``generate`` hands
  keywords it does not know to the model's forward at each step.

Saving: ``save_pretrained(dir)`` writes ``config.json`` (model_type ``mlpmem``, the
base model reference, the memory's config and meta, lambda, T), the memory in
``dir/memory/`` (an ordinary memory folder, see :mod:`mlpmem.memory`), the tokenizer
when known, and with ``full_export=True`` the base model in ``dir/base/`` so the
folder is self-contained. Importing this module registers the classes with
``AutoConfig`` and ``AutoModelForCausalLM``; without that import,
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the
folder through the two-line ``modeling_mlpmem.py`` saved in it (it imports this module).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from mlpmem.errors import MlpmemError
from mlpmem.interpolate import check_lambda
from mlpmem.memory import MLPMemory, load_memory, save_memory
from mlpmem.models import SITES, Site, capture, logits_size, resolve_layer, tokenizer_hash

log = logging.getLogger(__name__)

MEMORY_DIR = "memory"
BASE_DIR = "base"
# a two-line module saved next to the config: with trust_remote_code=True, the Auto
# classes (and `lm_eval --model hf`) load the folder without importing mlpmem.hf first
REMOTE_CODE = "modeling_mlpmem.py"
AUTO_MAP = {"AutoConfig": "modeling_mlpmem.MLPMemoryConfig", "AutoModelForCausalLM": "modeling_mlpmem.MLPMemoryForCausalLM"}


class MLPMemoryConfig(PretrainedConfig):
    """Config of an LM + memory pair: where the base LM is and how the memory is mixed in.

    ``base_model``: a hub id, a local folder or an mlpmem alias (``smollm2-135m``).
    ``base_subfolder``: set by a full export, the base lives in that subfolder.
    ``memory_config`` / ``memory_meta``: the memory's :class:`MemoryConfig` as a dict
    and its meta (model_id, tokenizer_hash, layer, site), copied for readers; the
    memory folder itself is the source of truth when loading.
    ``max_position_embeddings`` / ``vocab_size``: copied from the base (tools such as
    lm-eval read them from the top-level config).
    """

    model_type = "mlpmem"

    base_model: str | None = None
    base_subfolder: str | None = None
    memory_config: dict | None = None
    memory_meta: dict | None = None
    lambda_: float = 0.25
    memory_temperature: float = 1.0
    max_position_embeddings: int | None = None
    vocab_size: int | None = None


def check_temperature(t: float) -> float:
    t = float(t)
    if not (t > 0 and math.isfinite(t)):
        raise MlpmemError(f"the memory temperature must be a positive number, got {t}", "pass e.g. memory_temperature=1.0 (the memory's own distribution)")
    return t


class MLPMemoryForCausalLM(PreTrainedModel, GenerationMixin):
    """A frozen causal LM mixed with an MLP memory; ``forward`` returns log-probs as ``logits``.

    Build one from parts with :meth:`from_parts`, or load a saved one with
    :meth:`from_pretrained`. The constructor takes the parts already checked.
    """

    config_class = MLPMemoryConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _supports_cache_class = True

    def __init__(self, config: MLPMemoryConfig, lm: PreTrainedModel, memory: MLPMemory, tokenizer: Any = None) -> None:
        super().__init__(config)
        # post_init before the children exist: it would otherwise re-run weight
        # initialisation over the loaded LM and memory
        self.post_init()
        self.lm = lm
        self.memory = memory
        self.tokenizer = tokenizer  # kept to save it next to the model; not a module
        meta = config.memory_meta or {}
        self.site = Site(resolve_layer(lm, int(meta["layer"])), meta["site"])
        self.lambda_ = check_lambda(config.lambda_)
        self.memory_temperature = check_temperature(config.memory_temperature)
        # the generation defaults (eos, pad, bos, max_length) are the base model's
        self.generation_config = copy.deepcopy(lm.generation_config)
        # older or remote-code models compute every position's logits: slice them here instead
        self._lm_keeps_logits = "logits_to_keep" in inspect.signature(lm.forward).parameters

    # ------------------------------------------------------------------ building

    @classmethod
    def from_parts(
        cls,
        lm: PreTrainedModel,
        memory: MLPMemory,
        meta: dict[str, Any],
        *,
        tokenizer: Any = None,
        base_model: str | None = None,
        lambda_: float = 0.25,
        memory_temperature: float = 1.0,
    ) -> "MLPMemoryForCausalLM":
        """Pair a loaded LM with a memory.

        ``meta`` is the memory's meta (at least ``layer`` and ``site``; ``tokenizer_hash``
        and ``model_id`` when known, as :func:`load_memory` returns them). ``base_model``
        is the reference saved in the config (default: meta's model_id, else the LM's
        name_or_path). With a ``tokenizer`` its hash is checked against the memory's.
        """
        check_parts(lm, memory, meta, tokenizer)
        meta = dict(meta)
        if tokenizer is not None and "tokenizer_hash" not in meta:
            meta["tokenizer_hash"] = tokenizer_hash(tokenizer)
        ref = base_model or meta.get("model_id") or getattr(lm.config, "name_or_path", None) or None
        text_cfg = lm.config.get_text_config()
        config = MLPMemoryConfig(
            base_model=str(ref) if ref else None,
            memory_config=_jsonable(memory.config),
            memory_meta=_jsonable(meta),
            lambda_=check_lambda(lambda_),
            memory_temperature=check_temperature(memory_temperature),
            max_position_embeddings=getattr(text_cfg, "max_position_embeddings", None),
            vocab_size=logits_size(lm),
            eos_token_id=lm.generation_config.eos_token_id,
            bos_token_id=lm.generation_config.bos_token_id,
            pad_token_id=lm.generation_config.pad_token_id,
        )
        return cls(config, lm, memory, tokenizer).eval()  # an inference wrapper: no dropout in the LM

    @classmethod
    def from_memory(
        cls,
        memory_dir: str | os.PathLike,
        base_model: str | None = None,
        *,
        lambda_: float = 0.25,
        memory_temperature: float = 1.0,
        dtype: str = "float32",
    ) -> "MLPMemoryForCausalLM":
        """Pair a memory folder (from the train stage) with its base model, loaded by name.

        ``base_model`` defaults to the model the memory was trained on (its meta's model_id).
        """
        from mlpmem.models import load_model

        memory, meta = load_memory(Path(memory_dir))
        ref = base_model or meta.get("model_id")
        if not ref:
            raise MlpmemError(f"the memory in {memory_dir} does not record its base model", "pass base_model=MODEL")
        lm, tok, model_id = load_model(str(ref), dtype=dtype)
        return cls.from_parts(lm, memory, meta, tokenizer=tok, base_model=model_id, lambda_=lambda_, memory_temperature=memory_temperature)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        base_model: "str | os.PathLike | PreTrainedModel | None" = None,
        tokenizer: Any = None,
        lambda_: float | None = None,
        memory_temperature: float | None = None,
        dtype: Any = None,
        device: str | torch.device | None = None,
        config: MLPMemoryConfig | None = None,
        **kwargs: Any,
    ) -> "MLPMemoryForCausalLM":
        """Load a folder written by :meth:`save_pretrained`.

        The base LM comes from ``base_model`` (a model object or a path/hub id) if
        given, else from the folder's ``base/`` subfolder (full export), else from
        the reference in its config. ``lambda_`` / ``memory_temperature`` override the
        saved values. ``dtype`` applies to the base LM (the memory keeps its own).
        Other keywords (hub options passed by the Auto classes) are ignored.
        """
        folder = Path(pretrained_model_name_or_path)
        fix = "pass a folder written by MLPMemoryForCausalLM.save_pretrained, or save the model again"
        if not (folder / "config.json").is_file():
            raise MlpmemError(f"{folder} holds no saved LM + memory model (config.json is missing)", fix)
        if config is None:
            config = MLPMemoryConfig.from_pretrained(folder)
        if getattr(config, "model_type", None) != "mlpmem":
            raise MlpmemError(f"{folder}/config.json describes a {config.model_type!r} model, not an LM + memory ('mlpmem')", fix)
        if kwargs:
            log.debug("from_pretrained ignores %s", sorted(kwargs))
        memory, meta = load_memory(folder / MEMORY_DIR)
        dtype_name = _dtype_name(dtype)
        lm, tok = _load_base(folder, config, base_model, tokenizer, dtype_name)
        if tok is None:
            log.warning("cannot check that the base model's tokenizer is the memory's: pass tokenizer= to check it")
        check_parts(lm, memory, meta, tok)
        config = copy.deepcopy(config)
        config.memory_meta = _jsonable(meta)
        config.memory_config = _jsonable(memory.config)
        if lambda_ is not None:
            config.lambda_ = check_lambda(lambda_)
        if memory_temperature is not None:
            config.memory_temperature = check_temperature(memory_temperature)
        model = cls(config, lm, memory, tok)
        if device is not None:
            model.to(device)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, full_export: bool = False, tokenizer: Any = None, **kwargs: Any) -> None:  # type: ignore[override]
        """Write config.json, the memory (``memory/``), the tokenizer, and with ``full_export`` the base LM (``base/``).

        Without ``full_export`` the folder names the base model by reference: it
        must still be loadable from there (or be passed as ``base_model=``) later.
        config.json is written last, so a folder without it is unfinished.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "config.json").exists():
            (folder / "config.json").unlink()  # an interrupted overwrite must not look finished
        tok = tokenizer if tokenizer is not None else self.tokenizer
        config = copy.deepcopy(self.config)
        config.lambda_, config.memory_temperature = self.lambda_, self.memory_temperature
        save_memory(folder / MEMORY_DIR, self.memory, dict(config.memory_meta or {}))
        base = folder / BASE_DIR
        if full_export:
            if tok is None:
                raise MlpmemError("a full export needs the tokenizer, and this model has none attached", "pass tokenizer= to save_pretrained")
            if base.exists():
                shutil.rmtree(base)
            self.lm.save_pretrained(base)
            tok.save_pretrained(base)
            config.base_subfolder = BASE_DIR
        else:
            if base.exists():
                shutil.rmtree(base)  # a stale full export would shadow the reference
            config.base_subfolder = None
            if not config.base_model:
                raise MlpmemError("the base model has no reference (hub id or folder) to save", "use full_export=True, or build the model with from_parts(..., base_model=PATH)")
        if tok is not None:
            tok.save_pretrained(folder)
        self.generation_config.save_pretrained(folder)
        (folder / REMOTE_CODE).write_text('"""Loads mlpmem\'s LM + memory class (pip install mlpmem)."""\nfrom mlpmem.hf import MLPMemoryConfig, MLPMemoryForCausalLM  # noqa: F401\n')
        config.auto_map = dict(AUTO_MAP)
        config.save_pretrained(folder)

    # ------------------------------------------------------------------ mixing weight

    def set_lambda(self, lambda_: float | None = None, memory_temperature: float | None = None) -> None:
        """Set the default lambda (and memory temperature) used when a call does not pass one."""
        if lambda_ is not None:
            self.lambda_ = self.config.lambda_ = check_lambda(lambda_)
        if memory_temperature is not None:
            self.memory_temperature = self.config.memory_temperature = check_temperature(memory_temperature)

    @contextlib.contextmanager
    def mixing(self, lambda_: float | None = None, memory_temperature: float | None = None) -> Iterator["MLPMemoryForCausalLM"]:
        """``with model.mixing(lambda_=0.5): ...``: set lambda / T inside the block, restore them after."""
        saved = (self.lambda_, self.memory_temperature)
        self.set_lambda(lambda_, memory_temperature)
        try:
            yield self
        finally:
            self.set_lambda(*saved)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        lambda_: float | None = None,
        memory_temperature: float | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> ``logits`` [B, K, V] = interpolated log-probs (float32).

        K is the number of kept positions (``logits_to_keep`` with the HF meaning:
        0 keeps all, an int n the last n, a tensor the given positions). The LM and
        the memory both run only on the kept positions, so a decode step costs one
        memory call on one row per sequence. lambda = 0 returns exactly
        ``log_softmax(lm_logits.float())`` and skips the memory; lambda = 1 returns
        the memory's log-probs alone. With ``labels`` [B, T] the loss is the mean
        next-token NLL under the mixture (needs all positions kept).
        """
        lam = self.lambda_ if lambda_ is None else check_lambda(lambda_)
        temp = self.memory_temperature if memory_temperature is None else check_temperature(memory_temperature)
        base_kwargs: dict[str, Any] = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        if cache_position is not None:
            base_kwargs["cache_position"] = cache_position
        if self._lm_keeps_logits:
            base_kwargs["logits_to_keep"] = logits_to_keep
        if lam == 0.0:
            out, hidden = self.lm(**base_kwargs), None
        else:
            with capture(self.lm, [self.site]) as store:
                out = self.lm(**base_kwargs)
            hidden = store[self.site]  # [B, T, d]
        logits = out.logits if self._lm_keeps_logits else slice_logits_to_keep(out.logits, logits_to_keep)
        logprobs = logits.float().log_softmax(-1)
        if hidden is not None:
            mem_logits = self.memory(slice_logits_to_keep(hidden, logits_to_keep)).float()
            if temp != 1.0:
                mem_logits = mem_logits / temp
            mem_lp = mem_logits.log_softmax(-1)
            if lam == 1.0:
                logprobs = mem_lp
            else:
                logprobs = torch.logaddexp(logprobs + math.log1p(-lam), mem_lp + math.log(lam))
        loss = None
        if labels is not None:
            if logprobs.shape[1] != labels.shape[1]:
                raise MlpmemError("labels need the log-probs of every position", "call with logits_to_keep=0 when passing labels")
            loss = torch.nn.functional.nll_loss(
                logprobs[:, :-1].reshape(-1, logprobs.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logprobs, past_key_values=getattr(out, "past_key_values", None),
            hidden_states=getattr(out, "hidden_states", None), attentions=getattr(out, "attentions", None),
        )

    # ------------------------------------------------------------------ generation plumbing: the base model decides

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        # the base model knows how to slice its inputs for the cache; our own keywords
        # (lambda_, memory_temperature, logits_to_keep) pass through it unchanged
        return self.lm.prepare_inputs_for_generation(input_ids, **kwargs)

    def _prepare_cache_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        # the cache must be shaped by the base model's config (layers, sliding windows), not ours
        return self.lm._prepare_cache_for_generation(*args, **kwargs)

    def _reorder_cache(self, past_key_values: Any, beam_idx: torch.LongTensor) -> Any:
        if hasattr(self.lm, "_reorder_cache"):
            return self.lm._reorder_cache(past_key_values, beam_idx)
        past_key_values.reorder_cache(beam_idx)
        return past_key_values

    def _supports_default_dynamic_cache(self) -> bool:  # type: ignore[override]
        return self.lm._supports_default_dynamic_cache()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.lm.get_output_embeddings()

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        # only the base model has tied weights; the memory's head is its own copy
        # (post_init calls this before the parts are attached)
        if "lm" in self._modules:
            self.lm.tie_weights(*args, **kwargs)

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # both parts arrive trained (or initialised by their own code)


# ---------------------------------------------------------------------------- checks and loading helpers


def check_parts(lm: torch.nn.Module, memory: MLPMemory, meta: dict[str, Any], tokenizer: Any = None) -> None:
    """Refuse an LM and memory that do not fit: tokenizer, input layer and site, hidden and logits sizes."""
    fix = "use the base model (and tokenizer) the memory was trained for, or train a memory for this model"
    for key in ("layer", "site"):
        if key not in meta:
            raise MlpmemError(f"the memory's meta does not say which {key} it reads", "pass the meta returned by load_memory, with 'layer' and 'site'")
    if meta["site"] not in SITES:
        raise MlpmemError(f"the memory reads the unknown site {meta['site']!r}", f"the site must be one of {SITES}")
    n_layers = lm.config.get_text_config().num_hidden_layers
    try:
        resolve_layer(lm, int(meta["layer"]))
    except MlpmemError:
        raise MlpmemError(f"the memory reads decoder layer {meta['layer']}, but the base model {_name(lm)} has only {n_layers} layers", fix)
    if tokenizer is not None and meta.get("tokenizer_hash") and tokenizer_hash(tokenizer) != meta["tokenizer_hash"]:
        raise MlpmemError(
            f"the tokenizer of the base model {_name(lm)} differs from the one the memory was trained with "
            f"(hash {tokenizer_hash(tokenizer)} vs {meta['tokenizer_hash']}, memory trained on {meta.get('model_id')!r})", fix,
        )
    d = lm.config.get_text_config().hidden_size
    if memory.config.d_in != d:
        raise MlpmemError(f"the memory reads {memory.config.d_in}-dim hidden states but the base model {_name(lm)} has hidden size {d}", fix)
    v = logits_size(lm)
    if memory.config.vocab_size != v:
        raise MlpmemError(f"the memory outputs {memory.config.vocab_size} logits but the base model {_name(lm)} outputs {v}", fix)
    model_id = meta.get("model_id")
    if model_id and model_id not in (_name(lm), Path(_name(lm)).name):
        # paths differ between machines and full exports: sizes and tokenizer are what must match
        log.info("the memory was trained on %r; using base model %r", model_id, _name(lm))


def _load_base(folder: Path, config: MLPMemoryConfig, base_model: Any, tokenizer: Any, dtype: str) -> tuple[Any, Any]:
    """(lm, tokenizer or None) from: a model object, a path/id, the full-export subfolder, or the config's reference."""
    from mlpmem.models import load_model, load_tokenizer

    if isinstance(base_model, torch.nn.Module):
        tok = tokenizer
        if tok is None:
            try:
                tok = load_tokenizer(_name(base_model))
            except (MlpmemError, OSError, ValueError):
                tok = None
        return base_model, tok
    if base_model is not None:
        ref = str(base_model)
    elif config.base_subfolder:
        sub = folder / config.base_subfolder
        if not (sub / "config.json").is_file() or not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
            raise MlpmemError(f"the full export in {folder} is incomplete: {sub} holds no base model", "export the model again with save_pretrained(..., full_export=True)")
        ref = str(sub)
    elif config.base_model:
        ref = config.base_model
    else:
        raise MlpmemError(f"{folder}/config.json names no base model", "pass base_model= to from_pretrained")
    lm, tok, _ = load_model(ref, dtype=dtype)
    return lm, tokenizer if tokenizer is not None else tok


def _dtype_name(dtype: Any) -> str:
    if dtype is None or dtype == "auto":
        return "float32"
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return str(dtype)


def _name(lm: torch.nn.Module) -> str:
    return str(getattr(getattr(lm, "config", None), "name_or_path", "") or type(lm).__name__)


def _jsonable(obj: Any) -> Any:
    from mlpmem.manifest import to_jsonable

    return to_jsonable(obj)


def export_hf(
    memory_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model: str | None = None,
    lambda_: float = 0.25,
    memory_temperature: float = 1.0,
    full_export: bool = False,
) -> Path:
    """Turn a trained memory folder into a Hugging Face model folder (``AutoModelForCausalLM`` loads it). Returns out_dir."""
    model = MLPMemoryForCausalLM.from_memory(memory_dir, base_model, lambda_=lambda_, memory_temperature=memory_temperature)
    model.save_pretrained(out_dir, full_export=full_export)
    log.info("LM + memory saved to %s (%s)", out_dir, "self-contained" if full_export else f"base model: {model.config.base_model}")
    return Path(out_dir)


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` load ``model_type: mlpmem`` folders (idempotent)."""
    AutoConfig.register("mlpmem", MLPMemoryConfig, exist_ok=True)
    AutoModelForCausalLM.register(MLPMemoryConfig, MLPMemoryForCausalLM, exist_ok=True)


register()
