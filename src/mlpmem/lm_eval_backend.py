"""lm-evaluation-harness backend ``mlpmem``: an HF causal LM + MLP memory, scored as one model.

Usage once this module is imported (it registers the name with lm-eval's registry)::

    mlpmem-lm-eval --model mlpmem --model_args memory=runs/x/train/memory,base_model=smollm2-135m,lambda_=0.25 --tasks ...
    python -m mlpmem.lm_eval_backend --model mlpmem --model_args ... --tasks ...   # same thing

lm-eval 0.4.13 finds models only in its own registry (a fixed table of its own
modules plus whatever ``@register_model`` ran); it reads no entry points. So the
plain ``lm_eval`` command cannot see this backend; :func:`main` imports it and
then runs lm-eval's own command line with the arguments unchanged. The plain
``lm_eval`` command does work on a folder exported with
``MLPMemoryForCausalLM.save_pretrained`` (or :func:`mlpmem.hf.export_hf`), through
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
argument (batch_size, max_length, ...).

The class subclasses lm-eval's ``HFLM``: our model returns interpolated
log-probabilities as ``logits``, and HFLM's log_softmax of them changes nothing
(log-probs are already normalised), so loglikelihood, loglikelihood_rolling and
generate_until work unchanged.
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
    lambda_: float = 0.25,
    memory_temperature: float = 1.0,
    dtype: str = "float32",
    mixing: str | None = None,
    names: str | None = None,
    weights: str | None = None,
    router: str | None = None,
    knn: str | None = None,
):
    """Build ``(MLPMemoryForCausalLM, tokenizer)`` from memory folders (``a;b``), a saved LM + memory folder, and/or kNN-LM runs.

    ``mixing``: None uses the memory's gate when it has one (else the fixed lambda) and a router when one is
    given, "fixed", "gated" or "routed" force one. ``names``, ``weights``, ``router``, ``knn``: see the module docstring.
    """
    from mlpmem.modeling_mlpmem import check_model_mixing

    from mlpmem.hf import MLPMemoryForCausalLM

    folders, knn_runs, name_list = split_list(pretrained or memory), split_list(knn), split_list(names) or None
    w = [float(x) for x in split_list(weights)] or None
    if not folders and not knn_runs:
        raise MlpmemError("the mlpmem backend needs memory=PATH (or pretrained=PATH, or knn=RUN)", "pass --model_args memory=runs/NAME/train/memory,base_model=MODEL")
    mix = {} if mixing in (None, "") else {"mixing": check_model_mixing(str(mixing))}
    if len(folders) == 1 and (Path(folders[0]) / "config.json").is_file():  # a save_pretrained folder
        folder = folders[0]
        if name_list or w or router:
            raise MlpmemError(f"{folder} is a saved model: its memories, weights and router are saved with it",
                              "leave out names=, weights= and router=, or pass the memory folders themselves")
        model = MLPMemoryForCausalLM.from_pretrained(folder, base_model=base_model, lambda_=lambda_, memory_temperature=memory_temperature, dtype=dtype,
                                                     **({} if knn_runs else mix))
        if mix.get("mixing") == "gated" and model.gate is None:
            raise MlpmemError(f"{folder} holds no gate, so mixing=gated is not possible", "pass mixing=fixed, or save the model with its gate")
        if model.tokenizer is None and (Path(folder) / "tokenizer_config.json").is_file():
            from mlpmem.models import load_tokenizer

            model.tokenizer = load_tokenizer(folder)  # a full export: transformers' from_pretrained loads no tokenizer
        if knn_runs:
            from mlpmem.hf import _load_knn

            for i, run in enumerate(knn_runs):
                model.add_memory(_load_knn(Path(run))[0], name=f"knn_{i}" if i else "knn")
            if mix:
                model.set_lambda(mode=mix["mixing"])
    else:
        model = MLPMemoryForCausalLM.from_memory(folders, base_model, lambda_=lambda_, memory_temperature=memory_temperature, dtype=dtype,
                                                 names=name_list, weights=w, router=router, knn=knn_runs or None, **mix)
    return model, model.tokenizer


def default_device() -> str:
    """The device to use when the user names none: cuda, else cpu (models.resolve_device's "auto";
    mps only when asked for, since its numerics are not tested).

    lm-eval's own default is "cuda", which fails on a CPU-only torch ("Torch not
    compiled with CUDA enabled") before a single document is scored.
    """
    from mlpmem.models import resolve_device

    return str(resolve_device("auto", "float32")[0])


@register_model("mlpmem")
class MLPMemoryLM(HFLM):
    """HFLM over :class:`~mlpmem.hf.MLPMemoryForCausalLM`; see the module docstring for the arguments."""

    def __init__(
        self,
        memory: str | None = None,
        base_model: str | None = None,
        pretrained: str | None = None,
        lambda_: float = 0.25,
        memory_temperature: float = 1.0,
        dtype: str = "float32",
        device: str | None = None,
        max_length: int | None = None,
        mixing: str | None = None,
        names: str | None = None,
        weights: str | None = None,
        router: str | None = None,
        knn: str | None = None,
        **kwargs: Any,
    ) -> None:
        from mlpmem.models import resolve_device

        device = str(resolve_device(device or "auto", "float32")[0])  # one rule for every verb; an absent GPU is one clear error, before loading
        model, tok = load_mixture(memory, base_model, pretrained, float(lambda_), float(memory_temperature), str(dtype), mixing,
                                  names, weights, router, knn)
        if tok is None:
            raise MlpmemError("no tokenizer was found for the base model", "pass pretrained= a folder saved with its tokenizer, or a base_model folder that holds one")
        model.to(device)
        # HFLM reads the context size from the top-level config, which is ours: give it the base model's
        max_length = max_length or getattr(model.config, "max_position_embeddings", None)
        # HFLM's own device default is "cuda": hand it the device actually used
        super().__init__(pretrained=model, tokenizer=tok, backend="causal", max_length=max_length, device=device, **kwargs)
        self.mixture = {"memory": str(pretrained or memory), "knn": knn, "memories": model.memory_names, "base_model": model.config.base_model,
                        "lambda_": model.lambda_, "weights": model.fixed_weights(), "memory_temperature": model.memory_temperature,
                        "mixing": model.mixing_mode}

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "mlpmem": self.mixture}


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``mlpmem`` backend registered (arguments as for ``lm_eval``)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    import mlpmem.rag  # noqa: F401  registers the RAG baseline `mlpmem-rag` too (bm25s is needed only when it is used)

    args = list(sys.argv[1:] if argv is None else argv)
    if "--model" in args and not any(a == "--device" or a.startswith("--device=") for a in args):
        # every backend (also `--model hf` on an exported folder) gets a device that exists here
        args += ["--device", default_device()]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
