"""lm-evaluation-harness backend ``mlpmem``: an HF causal LM + MLP memory, scored as one model.

Usage once this module is imported (it registers the name with lm-eval's registry)::

    mlpmem-lm-eval --model mlpmem --model_args memory=runs/x/train/memory,base_model=smollm2-135m,lambda_=0.25 --tasks ...
    python -m mlpmem.lm_eval_backend --model mlpmem --model_args ... --tasks ...   # same thing

lm-eval 0.4.13 finds models only in its own registry (a fixed table of its own
modules plus whatever ``@register_model`` ran); it reads no entry points. So the
plain ``lm_eval`` command cannot see this backend; :func:`main` imports it and
then runs lm-eval's own command line with the arguments unchanged. The plain
``lm_eval`` command does work on a folder exported with
``MLPMemoryForCausalLM.save_pretrained`` (or :func:`mlpmem.transformers_integration.export_hf`), through
its remote-code hook: ``lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True``.

``model_args``: ``memory`` (a memory folder from the train stage, or a folder
written by ``MLPMemoryForCausalLM.save_pretrained``), or ``pretrained`` (the
latter kind); several memory folders on one LM are joined by ``;``
(``memory=runs/sotu/train/memory;runs/gcide/train/memory``: lm-eval splits model_args
on commas, so a list needs another separator), with ``names=a;b``, fixed
``weights=0.6;0.2;0.2`` (the LM first; default lambda_ split evenly) or
``router=FOLDER`` (a router saved for these memories, e.g. a saved model's
``router/``; ``mixing=routed`` is then the default); ``knn=RUN`` (or ``RUN1;RUN2``)
mixes a kNN-LM retriever over a finished run's datastore and index
(mlpmem.retrieval.KNNRetriever), alone (``knn=RUN`` without ``memory``: LM + kNN-LM)
or with the memories (LM + memory + kNN-LM), so all of them are scored through the
same model class; ``base_model`` (default: the model the memory was trained on);
``lambda_`` (0 scores the base LM alone through the same code path) and
``memory_temperature``; ``mixing`` (``fixed``, ``gated`` or ``routed``; by default a memory saved with a
gate, or whose run trained one, mixes per token with it, and ``lambda_`` is then unused); ``dtype``; ``device`` (default: cuda if there is one,
else cpu, as models.resolve_device's "auto"; mps only when named; lm-eval's own
default is cuda, and :func:`main` passes the same default to every backend when
``--device`` is not given); any other HFLM
argument (batch_size, max_length, ...); ``shared_context`` (default true: see below); ``memory_dtype=int8``
(the memories' linear layers in int8 at inference, CPU: MLPMemory.use_int8).

The class subclasses lm-eval's ``HFLM``: our model returns interpolated
log-probabilities as ``logits``, and HFLM's log_softmax of them changes nothing
(log-probs are already normalised), so loglikelihood_rolling and generate_until
work unchanged. ``loglikelihood`` runs each distinct context once and its
continuations after it over the KV cache (:func:`shared_context_loglikelihood`:
HFLM's numbers, a multiple-choice prompt run once instead of once per choice);
``shared_context=false`` gives HFLM's own loglikelihood.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from mlpmem.errors import MlpmemError

log = logging.getLogger(__name__)


def split_list(value: Any) -> list[str]:
    """A model_args list: ``a;b`` (or one value, or a Python list) -> ["a", "b"]; None or "" -> []."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(";") if v.strip()]


def load_mixture(
    memory: str | None = None,
    base_model: str | None = None,
    pretrained: str | None = None,
    lambda_: float | None = None,
    memory_temperature: float = 1.0,
    dtype: str = "float32",
    mixing: str | None = None,
    names: str | None = None,
    weights: str | None = None,
    router: str | None = None,
    knn: str | None = None,
    memory_dtype: str | None = None,
):
    """Build ``(MLPMemoryForCausalLM, tokenizer)`` from memory folders (``a;b``), a saved LM + memory folder, and/or kNN-LM runs.

    ``mixing``: None uses the memory's gate when it has one (else the fixed lambda) and a router when one is
    given, "fixed", "gated" or "routed" force one. ``names``, ``weights``, ``router``, ``knn``: see the module docstring.
    ``memory_dtype``: as ``from_memory`` and ``from_pretrained`` take it (unset: what each memory's run was evaluated with).
    """
    from mlpmem.modeling.mixing import check_model_mixing

    from mlpmem.transformers_integration import MLPMemoryForCausalLM

    folders, knn_runs, name_list = split_list(pretrained or memory), split_list(knn), split_list(names) or None
    w = [parse_number("weights", x, example="0.6;0.2;0.2 (the LM first)") for x in split_list(weights)] or None
    if not folders and not knn_runs:
        raise MlpmemError(
            "the mlpmem backend needs memory=PATH (or pretrained=PATH, or knn=RUN)",
            "pass --model_args memory=runs/NAME/train/memory,base_model=MODEL",
        )
    mix = {} if mixing in (None, "") else {"mixing": check_model_mixing(str(mixing))}
    lam = {} if lambda_ is None else {"lambda_": lambda_}  # given, it asks for the fixed mixture (from_memory, from_pretrained)
    if len(folders) == 1 and (Path(folders[0]) / "config.json").is_file():  # a save_pretrained folder
        folder = folders[0]
        if name_list or w or router:
            raise MlpmemError(
                f"{folder} is a saved model: its memories, weights and router are saved with it",
                "leave out names=, weights= and router=, or pass the memory folders themselves",
            )
        model = MLPMemoryForCausalLM.from_pretrained(
            folder,
            base_model=base_model,
            memory_temperature=memory_temperature,
            dtype=dtype,
            memory_dtype=memory_dtype,
            **lam,
            **({} if knn_runs else mix),
        )
        if mix.get("mixing") == "gated" and model.gate is None:
            raise MlpmemError(
                f"{folder} holds no gate, so mixing=gated is not possible", "pass mixing=fixed, or save the model with its gate"
            )
        if model.tokenizer is None and (Path(folder) / "tokenizer_config.json").is_file():
            from mlpmem.models import load_tokenizer

            model.tokenizer = load_tokenizer(folder)  # a full export: transformers' from_pretrained loads no tokenizer
        if knn_runs:
            from mlpmem.transformers_integration import _load_knn

            for i, run in enumerate(knn_runs):
                model.add_memory(_load_knn(Path(run))[0], name=f"knn_{i}" if i else "knn")
            if mix:
                model.set_lambda(mode=mix["mixing"])
    else:
        model = MLPMemoryForCausalLM.from_memory(
            folders,
            base_model,
            lambda_=lambda_,
            memory_temperature=memory_temperature,
            dtype=dtype,
            names=name_list,
            weights=w,
            router=router,
            knn=knn_runs or None,
            memory_dtype=memory_dtype,
            **mix,
        )
    return model, model.tokenizer


def default_device() -> str:
    """The device to use when the user names none: cuda, else cpu (models.resolve_device's "auto";
    mps only when asked for, since its numerics are not tested).

    lm-eval's own default is "cuda", which fails on a CPU-only torch ("Torch not
    compiled with CUDA enabled") before a single document is scored.
    """
    from mlpmem.models import resolve_device

    return str(resolve_device("auto", "float32")[0])


def parse_number(name: str, value: Any, kind: type = float, example: str = "") -> float | int:
    """A numeric model_arg (lm-eval passes ``lambda_=0.5`` as a number, ``lambda_=abc`` as text): the number, or an
    MlpmemError naming the argument."""
    import math

    number = None
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if number is not None and math.isfinite(number) and (kind is float or number.is_integer()):
        return kind(number)
    what = "a number" if kind is float else "a whole number"
    raise MlpmemError(f"model argument {name}={value!r} is not {what}", f"pass e.g. {name}={example}" if example else f"pass {what}")


def merge_model_args(args: dict[str, Any], additional: dict[str, Any] | None) -> dict[str, Any]:
    """A backend's keyword arguments from ``--model_args`` and lm-eval's own flags (``device``, ``batch_size``,
    ``max_batch_size``): lm-eval passes both as keywords, so a name in both was a TypeError ("got multiple values for
    keyword argument 'device'"). The model_args value wins: it names this model's own setting."""
    out = dict(args)
    for key, value in (additional or {}).items():
        if value is None:
            continue
        if key in out:
            if str(out[key]) != str(value):
                log.warning("%s=%s from --model_args is used, not %s from lm-eval's --%s", key, out[key], value, key)
            continue
        out[key] = value
    return out


class ModelArgs:
    """lm-eval's constructors from ``--model_args`` (:func:`merge_model_args`), for the backends registered here."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls(**merge_model_args(simple_parse_args_string(arg_string), additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        return cls(**merge_model_args(arg_dict, additional_config))


def parse_bool(name: str, value: Any) -> bool:
    """A boolean model_arg: lm-eval turns ``true``/``false`` into bools; a Python caller may pass either."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise MlpmemError(f"{name}={value!r} is not a boolean", f"pass {name}=true or {name}=false")


def encode_request(lm: HFLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """A request's (context, continuation) token ids as HFLM's loglikelihood makes them (lm-eval's TemplateLM)."""
    if context == "":  # the prefix token stands for an empty context
        cont = lm.tok_encode(continuation, add_special_tokens=False)
        return ([lm.prefix_token_id], cont) if not cont or lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
    return lm._encode_pair(context, continuation)


def shared_context_loglikelihood(lm: HFLM, requests: list, disable_tqdm: bool = False, *, fallback: Any) -> list[tuple[float, bool]]:
    """HFLM's ``loglikelihood`` with each distinct context run once and its continuations batched after it.

    HFLM scores every (context, continuation) pair as one sequence, so a multiple-choice
    item with 4 choices runs its prompt (and, under RAG, its retrieved passages) 4 times.
    Here the requests are grouped by context: the context runs once with the KV cache,
    the cache is repeated for its n continuations, and they run as one batch of n short
    rows. Tokenization, the continuation log-probability and the greedy flag are HFLM's,
    so the numbers equal HFLM's up to float rounding (tests/test_lm_eval.py).
    ``lm``: an HFLM (our backend or a plain HF model) whose model accepts
    ``past_key_values`` and ``logits_to_keep``. ``fallback(requests, disable_tqdm=...)``
    (HFLM's own loglikelihood) gets what this cannot score the same way: a context +
    continuation longer than ``max_length`` + 1 (HFLM cuts it from the left), an empty
    continuation (HFLM refuses it), a seq2seq model, ``enable_thinking`` (HFLM refuses it)
    and a model whose cache cannot be repeated per row.
    """
    from tqdm import tqdm

    if lm.backend != "causal" or getattr(lm, "enable_thinking", False):
        return fallback(requests, disable_tqdm=disable_tqdm)
    encoded = [encode_request(lm, *r.args[:2]) for r in requests]
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    # HFLM's input is context + continuation less its last token, cut to the last max_length tokens
    theirs = [i for i, (ctx, cont) in enumerate(encoded) if not cont or len(ctx) + len(cont) > lm.max_length + 1]
    groups: dict[tuple[int, ...], list[int]] = {}
    skip = set(theirs)
    for i, (ctx, _) in enumerate(encoded):
        if i not in skip:
            groups.setdefault(tuple(ctx), []).append(i)
    ordered = sorted(groups.items(), key=lambda g: -len(g[0]))  # similar lengths together: little padding
    per_call = max(1, int(lm.batch_size)) if str(lm.batch_size).isdigit() else 8
    bar = tqdm(total=len(requests) - len(theirs), desc="Scoring shared contexts", disable=disable_tqdm or lm.rank != 0)
    for start in range(0, len(ordered), per_call):
        chunk = ordered[start : start + per_call]
        scored = _score_shared(lm, chunk, encoded)
        if scored is None:  # no repeatable cache: the rest goes to HFLM
            theirs += [i for _, idx in ordered[start:] for i in idx]
            break
        for i, res in scored.items():
            out[i] = res
            lm.cache_hook.add_partial("loglikelihood", requests[i].args[:2], res)
        bar.update(sum(len(idx) for _, idx in chunk))
    bar.close()
    if theirs:
        for i, res in zip(theirs, fallback([requests[i] for i in theirs], disable_tqdm=True)):
            out[i] = res
    return out


def _score_shared(lm: HFLM, chunk: list[tuple[tuple[int, ...], list[int]]], encoded: list) -> dict[int, tuple[float, bool]] | None:
    """Contexts [C] (left-padded, one forward with the cache), then every continuation of them as one batch [R].

    None when the model's cache cannot be repeated per row (no ``batch_select_indices``)."""
    import torch

    model, dev = lm.model, lm.device
    ctxs = [list(c) for c, _ in chunk]
    width = max(len(c) for c in ctxs)
    pad = ctxs[0][0]  # any id: padded positions are masked out
    ids = torch.tensor([[pad] * (width - len(c)) + c for c in ctxs], device=dev)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in ctxs], device=dev)
    rows = [(ci, i) for ci, (_, idx) in enumerate(chunk) for i in idx]
    conts = [encoded[i][1] for _, i in rows]
    longest = max(len(c) for c in conts)
    mp = getattr(lm, "mixed_precision_dtype", None)
    # HFLM's numerics: its autocast, and log_softmax in its softmax_dtype (None: the logits' own)
    sm = getattr(lm, "softmax_dtype", None)
    with torch.inference_mode(), torch.autocast(device_type=torch.device(dev).type, dtype=mp, enabled=mp is not None):
        first = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=longest > 1, logits_to_keep=1)
        lp0 = first.logits[:, -1].log_softmax(-1, dtype=sm)  # [C, V]: each context's next token
        rest = None
        if longest > 1:  # the continuations' other tokens, over the cache rows of their contexts
            cache = first.past_key_values
            if not hasattr(cache, "batch_select_indices"):
                return None
            owner = torch.tensor([ci for ci, _ in rows], device=dev)
            cache.batch_select_indices(owner)
            m = longest - 1
            toks = torch.tensor([c[:-1] + [c[0]] * (m - len(c) + 1) for c in conts], device=dev)  # right padding: never read
            lens = torch.tensor([len(ctxs[ci]) for ci, _ in rows], device=dev)
            rest = model(
                toks,
                attention_mask=torch.cat([mask[owner], torch.ones(len(rows), m, dtype=mask.dtype, device=dev)], 1),
                position_ids=lens[:, None] + torch.arange(m, device=dev)[None],
                past_key_values=cache,
                use_cache=False,
            ).logits.log_softmax(-1, dtype=sm)  # [R, m, V]
    res = {}
    for r, ((ci, i), cont) in enumerate(zip(rows, conts)):
        steps = lp0[ci][None] if rest is None or len(cont) == 1 else torch.cat([lp0[ci][None], rest[r, : len(cont) - 1]])  # [len(cont), V]
        toks_i = torch.tensor(cont, device=steps.device)
        res[i] = (float(steps.gather(1, toks_i[:, None]).sum()), bool((steps.argmax(-1) == toks_i).all()))
    return res


def input_prefix(model) -> list[int]:
    """The token ids the model's memory saw in front of every window when it trained (datastore.bos), or []."""
    return list((getattr(model.config, "memory_meta", None) or {}).get("prefix") or [])


class MLPMemoryLM(ModelArgs, HFLM):
    """HFLM over :class:`~mlpmem.transformers_integration.MLPMemoryForCausalLM`; see the module docstring for the arguments."""

    def __init__(
        self,
        memory: str | None = None,
        base_model: str | None = None,
        pretrained: str | None = None,
        lambda_: float | None = None,
        memory_temperature: float = 1.0,
        dtype: str = "float32",
        device: str | None = None,
        max_length: int | None = None,
        mixing: str | None = None,
        names: str | None = None,
        weights: str | None = None,
        router: str | None = None,
        knn: str | None = None,
        shared_context: bool | str = True,
        memory_dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        from mlpmem.models import resolve_device

        shared = parse_bool("shared_context", shared_context)  # a typo fails before the model loads
        from mlpmem.modeling.mlp_memory import check_memory_dtype

        asked_dtype = memory_dtype or None  # unset: what the memory's run was evaluated with (from_memory decides)
        memory_dtype = check_memory_dtype(memory_dtype)  # a typo fails before the model loads

        device = str(
            resolve_device(device or "auto", "float32")[0]
        )  # one rule for every verb; an absent GPU is one clear error, before loading
        # no lambda_: what the memory's run fitted (its gate, else its valid-fitted lambda)
        lam = None if lambda_ in (None, "") else parse_number("lambda_", lambda_, example="0.25 (the memory's weight, in [0, 1])")
        temperature = parse_number("memory_temperature", memory_temperature, example="1")
        max_length = None if max_length is None else parse_number("max_length", max_length, int, "2048 (tokens)")
        model, tok = load_mixture(
            memory, base_model, pretrained, lam, temperature, str(dtype), mixing, names, weights, router, knn, asked_dtype
        )
        if tok is None:
            raise MlpmemError(
                "no tokenizer was found for the base model",
                "pass pretrained= a folder saved with its tokenizer, or a base_model folder that holds one",
            )
        model.to(device)
        if memory_dtype == "int8":
            model.use_int8_memories()  # after the move: int8 weights are made on the CPU (a GPU is refused by name)
        # HFLM reads the context size from the top-level config, which is ours: give it the base model's
        max_length = max_length or getattr(model.config, "max_position_embeddings", None)
        if input_prefix(model) and kwargs.get("add_bos_token") is None:
            # the memory read states computed after <bos> (datastore.bos): score every request after it too
            kwargs["add_bos_token"] = True
        # HFLM's own device default is "cuda": hand it the device actually used
        super().__init__(pretrained=model, tokenizer=tok, backend="causal", max_length=max_length, device=device, **kwargs)
        self.mixture = {
            "memory": str(pretrained or memory),
            "knn": knn,
            "memories": model.memory_names,
            "base_model": model.config.base_model,
            "lambda_": model.lambda_,
            "weights": model.fixed_weights(),
            "memory_temperature": model.memory_temperature,
            "mixing": model.mixing_mode,
            "shared_context": shared,
            "memory_dtype": "int8"
            if device == "cpu" and any(getattr(m, "_int8", None) is not None for m in model.components().values())
            else "float32",
        }
        self.shared_context = shared

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if not self.shared_context:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        return shared_context_loglikelihood(self, requests, disable_tqdm, fallback=super().loglikelihood)

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "mlpmem": self.mixture}


if __name__ != "__main__":  # run as `python -m mlpmem.lm_eval_backend`, the package's module registers it (below), not this copy
    register_model("mlpmem")(MLPMemoryLM)


if __name__ == "__main__":  # python -m mlpmem.lm_eval_backend: the same as mlpmem-lm-eval
    from mlpmem.lm_eval_cli import main

    main()
