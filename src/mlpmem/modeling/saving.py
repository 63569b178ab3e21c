"""What an LM + memory folder holds besides its weights, and where one may be written: the model card, the integrity
record (every file's sha256, the memory tensors' names and shapes) checked on load, and the rule of which folders
``save_pretrained`` writes into. Part of the model's remote code: imports nothing of mlpmem, only its siblings.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from transformers.utils import cached_file

from .configuration_mlpmem import MLPMemoryConfig
from .errors import MlpmemError
from .integration import hook
from .mlp_memory import MEMORY_CONFIG


def _model_label(name: str) -> str:
    """How results name a base model: mlpmem's label of an alias where mlpmem is installed, else the name."""
    model_label = hook("model_label")
    return name if model_label is None else model_label(name)


def _hub_like(name: str) -> bool:
    """Whether ``name`` has the form of a hub repo id (``org/name`` or ``name``), rather than a path."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "/"))


def _resolve(name: str, filename: str, hub: dict) -> str | None:
    """A file of a saved model, local or from the hub (cache); None if it does not exist."""
    if Path(name).is_dir():
        path = Path(name) / hub.get("subfolder", "") / filename
        return str(path) if path.is_file() else None
    return cached_file(name, filename, _raise_exceptions_for_missing_entries=False, **hub)


def model_card(config: MLPMemoryConfig, full_export: bool, memory_params: int, lm_params: int) -> str:
    """README.md of a saved LM + memory: what it is made of, how it was trained, what it scored, how to load it."""
    meta = config.memory_meta or {}
    mem = config.memory_config or {}
    base = config.base_model or "(unknown)"
    label = _model_label(base)  # an alias (the offline default) is named for what it is
    hub_like = _hub_like(base) and not Path(base).exists()
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- mlpmem", "- mlp-memory"]
    if hub_like:
        front.append(f"base_model: {base}")
    front.append("---")
    lines = [
        *front,
        "",
        f"# {label} + MLP memory",
        "",
        "A causal language model mixed at every position with a retriever-pretrained MLP memory "
        "([MLP Memory, arXiv 2508.01832](https://arxiv.org/abs/2508.01832)), built with mlpmem.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}`{f' = {label}' if label != base else ''} ({lm_params:,} parameters{', included' if full_export else ', loaded by reference'}) |",
        f"| memory | {memory_params:,} parameters, {mem.get('n_blocks')} blocks, {mem.get('activation')}, "
        f"reads layer {meta.get('layer')} ({meta.get('site')}) |",
        f"| lambda (memory weight) | {config.lambda_} |",
        f"| memory temperature | {config.memory_temperature} |",
        f"| mixing | {config.mixing or 'fixed'}"
        + (
            f" (gate: {(config.gate_config or {}).get('config', {}).get('kind')}, lambda per token from the two distributions)"
            if config.gate_config
            else ""
        )
        + (" (router: weights per token over the LM and every memory)" if config.router_config else "")
        + " |",
    ]
    if config.extra_memories:
        names = [config.memory_name or "memory", *(e["name"] for e in config.extra_memories)]
        metas = [meta, *((e.get("memory_meta") or {}) for e in config.extra_memories)]
        kinds = [config.memory_kind or "mlp", *(e.get("kind") or "mlp" for e in config.extra_memories)]
        lines.append(
            "| memories | "
            + ", ".join(
                f"`{n}` ({'kNN-LM' if k == 'knn' else 'MLP'}, layer {m.get('layer')} {m.get('site')})"
                for n, m, k in zip(names, metas, kinds)
            )
            + " |"
        )
        if config.weights:
            lines.append(f"| fixed weights (LM, memories) | {config.weights} |")
    for key, label in (("corpus", "training corpus"), ("datastore", "datastore"), ("targets", "kNN targets"), ("model", "recipe model")):
        if meta.get(key):
            lines.append(f"| {label} | `{meta[key]}` |")
    lines += ["", "## Results", ""]
    results = meta.get("results")
    if results:
        lines += ["```json", json.dumps(results, indent=2, sort_keys=True, default=str), "```"]
    else:
        lines.append("No results were recorded with this memory.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True{", dtype=" + chr(34) + "auto" + chr(34) if full_export else ""})',
        'tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        'out = model.generate(**tok(["Fellow citizens"], return_tensors="pt"), max_new_tokens=30)',
        "out = model.generate(..., lambda_=0.0)  # the base model alone; 1.0 the memory alone",
        "```",
        "",
        "`logits` are the mixture's log-probabilities. "
        + (
            "The folder is self-contained."
            if full_export
            else f"The base model is loaded from `{base}`; pass `base_model=` to use a copy from elsewhere."
        ),
        "",
    ]
    return "\n".join(lines)


INTEGRITY_SKIP = ("config.json", "README.md", ".mlpmem", ".mlpmem.lock")


def _sha256(path: Path) -> str:

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def integrity_record(folder: Path, model: Any) -> dict[str, Any]:
    """Every file a save wrote (size and sha256; not config.json, which holds this record, nor the card) and the names
    and shapes of every tensor but the base LM's, as a full export names them."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in INTEGRITY_SKIP and ".partial" not in p.relative_to(folder).parts
    }
    tensors = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith(model.base_model_prefix + ".")}
    return {"files": files, "tensors": tensors}


def check_integrity(name: str, config: MLPMemoryConfig, hub: dict) -> None:
    """Refuse a saved model whose files differ from what its save recorded (a flipped byte, a file missing, memory folders
    swapped) or whose weights lack a tensor of a memory, gate or router. Local folders are hashed; a hub repo's weights
    headers are read. Folders saved before the record existed are not checked."""
    record = config.integrity
    if not record:
        return
    fix = "save or export the model again (a changed file is never loaded as if it were the saved one)"
    root = Path(name) / hub.get("subfolder", "")
    if Path(name).is_dir():
        for rel, want in (record.get("files") or {}).items():
            path = root / rel
            if not path.is_file():
                raise MlpmemError(f"{name} is incomplete: {rel} is missing (its save wrote it)", fix)
            if path.stat().st_size != want["size"] or _sha256(path) != want["sha256"]:
                raise MlpmemError(f"{rel} in {name} is not the file its save wrote (its size or sha256 differs)", fix)
    if config.saved_by_reference():
        return  # each part is read whole, strictly, from its own folder
    from safetensors import safe_open

    index = _resolve(name, "model.safetensors.index.json", hub)
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values())) if index else ["model.safetensors"]
    found: dict[str, list[int]] = {}
    for shard in shards:
        path = _resolve(name, shard, hub)
        if path:
            with safe_open(path, framework="pt") as f:
                found.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
    for key, shape in (record.get("tensors") or {}).items():
        if key not in found:
            raise MlpmemError(f"the weights of {name} lack {key}, which its save wrote", fix)
        if found[key] != list(shape):
            raise MlpmemError(f"{key} in {name} has shape {found[key]}, and its save wrote {list(shape)}", fix)


def check_save_folder(folder: Path) -> None:
    """Refuse to save into a folder that holds anything but an earlier save of this class: a model someone else wrote,
    a memory folder of mlpmem's train stage, any stage folder of a run (marked ``.mlpmem``), files of the user's.
    Saving replaces an earlier save's weights and subfolders, so anywhere else it would delete what is not ours."""
    # mlpmem's own marker and lock (an export claims its folder before saving) are not content
    entries = sorted(p.name for p in folder.iterdir() if p.name not in (".mlpmem", ".mlpmem.lock")) if folder.is_dir() else []
    marker_only = not entries
    fix = "save into a new or empty folder (or one an earlier save_pretrained of an LM + memory wrote)"
    if (folder / MEMORY_CONFIG).exists():
        raise MlpmemError(f"{folder} is a memory folder of mlpmem's train stage, and saving there would replace its weights", fix)
    try:
        marked = json.loads((folder / ".mlpmem").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        marked = None
    if marked not in (None, "export"):
        raise MlpmemError(f"{folder} is a `{marked}` folder of an mlpmem run, and saving there would replace its files", fix)
    if not marker_only and not _saved_by_us(folder):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise MlpmemError(
            f"{folder} holds files that no earlier save of an LM + memory wrote ({shown}), and saving would replace some", fix
        )


def _saved_by_us(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier save of this class (its config.json says model_type mlpmem)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "mlpmem"
    except (OSError, ValueError, AttributeError):
        return False


def _remove(path: Path) -> None:

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
