"""The gate (lambda per token from cheap features of the two distributions) and the router (weights per token over
the LM and several memories): their modules and file formats. mlpmem.gate fits them."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import MlpmemError
from .mixing import GATE_FEATURES, GATE_INPUTS, HIDDEN_FEATURES, novelty

GATE_DIR = "gate"  # a saved-by-reference folder keeps the gate here, as the memory in memory/
GATE_WEIGHTS = "model.safetensors"
GATE_CONFIG = "gate_config.json"
GATE_KINDS = ("mlp", "binned")
ROUTER_DIR = "router"
ROUTER_CONFIG = "router_config.json"


class MixingGate(nn.Module):
    """Per-token lambda in [0, 1] from :func:`gate_features` [..., F] (and the memory's input h) -> [...].

    ``kind="mlp"``: standardised features -> Linear(F, hidden) -> tanh -> Linear(hidden, 1)
    -> sigmoid (a few hundred parameters). ``kind="binned"``: the closed form, one
    lambda per bin of one feature (``bin_feature``, LM entropy by default), stored as
    logits: sigmoid(-inf) = 0 and sigmoid(+inf) = 1 exactly. Either way the output is a
    sigmoid, so it cannot leave [0, 1]. A gate whose features include ``novelty`` keeps
    ``centroids`` [C, d] (k-means centres of its memory's train inputs) and reads h too.
    """

    def __init__(
        self,
        kind: str = "mlp",
        features: tuple[str, ...] | list[str] = GATE_FEATURES,
        hidden: int = 32,
        bins: int = 8,
        bin_feature: str = "lm_entropy",
        centroids: int = 0,
        d: int = 0,
    ) -> None:
        super().__init__()
        if kind not in GATE_KINDS:
            raise MlpmemError(f"unknown gate kind {kind!r}", f"choose one of {GATE_KINDS}")
        unknown = [f for f in features if f not in GATE_INPUTS]
        if unknown or not features:
            raise MlpmemError(f"unknown gate features {unknown or 'none'}", f"choose among {GATE_INPUTS}")
        self.reads_hidden = any(f in HIDDEN_FEATURES for f in features)
        if self.reads_hidden and (centroids < 1 or d < 1):
            raise MlpmemError(
                f"a gate reading {HIDDEN_FEATURES} needs centroids >= 1 and d >= 1, got centroids={centroids}, d={d}",
                "fit the gate with mlpmem (gate.centroids), or leave novelty out of its features",
            )
        if hidden < 1 or bins < 1:
            raise MlpmemError(f"a gate needs hidden >= 1 and bins >= 1, got hidden={hidden}, bins={bins}", "fix the gate settings")
        if bin_feature not in features:
            raise MlpmemError(
                f"the binned gate's feature {bin_feature!r} is not among its features {list(features)}", "add it to the features"
            )
        self.kind, self.features, self.hidden, self.bins, self.bin_feature = kind, tuple(features), int(hidden), int(bins), bin_feature
        self.n_centroids, self.d = (int(centroids), int(d)) if self.reads_hidden else (0, 0)
        self.index = [GATE_INPUTS.index(f) for f in self.features]  # columns of gate_features' output (+ novelty)
        if self.reads_hidden:
            self.register_buffer("centroids", torch.zeros(self.n_centroids, self.d))
        n = len(self.features)
        if kind == "mlp":
            self.register_buffer("shift", torch.zeros(n))
            self.register_buffer("scale", torch.ones(n))
            self.inner = nn.Linear(n, self.hidden)
            self.out = nn.Linear(self.hidden, 1)
            nn.init.zeros_(self.out.weight)  # starts as a constant lambda (sigmoid of out.bias)
        else:
            self.register_buffer("edges", torch.zeros(self.bins - 1))
            self.register_buffer("bin_logits", torch.zeros(self.bins))

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "features": list(self.features),
            "hidden": self.hidden,
            "bins": self.bins,
            "bin_feature": self.bin_feature,
            **({"centroids": self.n_centroids, "d": self.d} if self.reads_hidden else {}),  # older readers keep reading the rest
        }

    def inputs(self, feats: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`gate_features` [..., len(GATE_FEATURES)] -> the columns this gate reads from, in GATE_INPUTS order:
        with ``novelty`` among them, the memory's input ``h`` [..., d] gives the last."""
        if not self.reads_hidden or feats.shape[-1] == len(GATE_INPUTS):
            return feats
        if h is None:
            raise MlpmemError(
                "this gate reads the memory's input hidden state (its novelty feature), and none was given",
                "pass h, the hidden state the memory reads, beside the features",
            )
        return torch.cat([feats, novelty(h, self.centroids).unsqueeze(-1).to(feats.dtype)], -1)

    def forward(self, feats: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """feats [..., len(GATE_FEATURES)] (all features, in GATE_FEATURES order), or [..., len(GATE_INPUTS)] with the
        hidden features too; ``h`` [..., d], the memory's input, for a gate that reads it -> lambda [...]."""
        x = self.inputs(feats, h)[..., self.index].to(self.scale.dtype if self.kind == "mlp" else self.edges.dtype)
        if self.kind == "binned":
            col = x[..., self.features.index(self.bin_feature)].contiguous()
            return torch.sigmoid(self.bin_logits[torch.bucketize(col, self.edges)])
        return torch.sigmoid(self.out(torch.tanh(self.inner((x - self.shift) / self.scale))))[..., 0]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_dict().values())


def memory_fingerprint(memory: nn.Module) -> str:
    """A hash that identifies a memory's weights (16 hex digits): its config, and a strided sample of up to 4096
    values of every tensor rounded to bfloat16 (so float32 and bfloat16 copies agree). A gate records it."""
    import hashlib

    h = hashlib.sha256(json.dumps(dataclasses.asdict(memory.config), sort_keys=True, default=str).encode())
    for name, t in sorted(memory.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 4096)][:4096].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_gate(gate_meta: dict[str, Any], memory: nn.Module, where: str = "the gate") -> None:
    """Refuse a gate trained for another memory (its meta's memory_fingerprint against this memory's)."""
    want = (gate_meta or {}).get("memory_fingerprint")
    if not want:
        raise MlpmemError(
            f"{where} does not record the memory it was trained for (no memory_fingerprint)", "train the gate again with mlpmem"
        )
    got = memory_fingerprint(memory)
    if got != want:
        raise MlpmemError(
            f"{where} was trained for another memory (memory fingerprint {want}, this memory's is {got})",
            "train a gate for this memory (recipe `eval: {mixing: gated}`, or mlpmem.gate.fit_gate), or use mixing='fixed'",
        )


def build_gate(data: dict[str, Any]) -> MixingGate:
    try:
        return MixingGate(**data)
    except TypeError as e:
        raise MlpmemError(f"the gate's config {data} does not describe a gate ({e})", "save the gate again with mlpmem")


def read_gate_folder(folder: str | os.PathLike | None = None, files: dict[str, str] | None = None) -> tuple[MixingGate, dict[str, Any]]:
    """(gate in eval mode, its meta) from a gate folder (or its two files by name). Safetensors weights, JSON config."""
    files = files or {GATE_CONFIG: str(Path(folder) / GATE_CONFIG), GATE_WEIGHTS: str(Path(folder) / GATE_WEIGHTS)}
    where = Path(files[GATE_CONFIG]).parent
    for name in (GATE_CONFIG, GATE_WEIGHTS):
        if not files.get(name) or not Path(files[name]).is_file():
            raise MlpmemError(f"{where} holds no complete gate ({name} is missing)", "train or save the gate again")
    try:
        data = json.loads(Path(files[GATE_CONFIG]).read_text())
        gate = build_gate(data["config"])
        gate.load_state_dict(load_file(files[GATE_WEIGHTS]), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise MlpmemError(f"the gate in {where} is not readable ({str(e).splitlines()[0][:200]})", "train or save the gate again")
    check_gate_values(gate, str(where))
    return gate.eval(), data.get("meta", {})


def check_gate_values(gate: MixingGate, where: str) -> None:
    """NaN weights would give NaN lambdas (the sigmoid bounds everything else); the binned gate's edges must be sorted."""
    for name, t in gate.state_dict().items():
        if torch.isnan(t).any() or (name != "bin_logits" and not torch.isfinite(t).all()):
            raise MlpmemError(f"the gate in {where} has non-finite values in {name}", "train the gate again")
    if gate.kind == "binned" and gate.bins > 1 and not bool((gate.edges[1:] >= gate.edges[:-1]).all()):
        raise MlpmemError(f"the binned gate in {where} has unsorted bin edges", "train the gate again")


def write_gate_folder(folder: str | os.PathLike, gate: MixingGate, meta: dict[str, Any]) -> Path:
    """Write a gate: weights (safetensors), then the config that rebuilds it and its meta (written last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").float().contiguous().clone() for k, v in gate.state_dict().items()}
    tmp = folder / (GATE_WEIGHTS + ".partial")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / GATE_WEIGHTS)
    (folder / (GATE_CONFIG + ".partial")).write_text(json.dumps({"config": gate.config(), "meta": meta}, indent=2, default=str))
    os.replace(folder / (GATE_CONFIG + ".partial"), folder / GATE_CONFIG)
    return folder


class MemoryRouter(nn.Module):
    """Per-token weights over the LM and K memories (issue 12 item 2, the scoring path).

    ``forward(feats [..., K, F]) -> weights [..., K + 1]``: the :func:`gate_features` of each memory
    against the LM, standardised, through Linear(K*F, hidden) -> tanh -> Linear(hidden, K + 1) and a
    softmax, so the weights are >= 0 and sum to 1 by construction; column 0 is the LM's weight.
    """

    def __init__(self, n_memories: int, hidden: int = 32) -> None:
        super().__init__()
        if n_memories < 1:
            raise MlpmemError(f"a router needs at least one memory, got {n_memories}", "pass the memories to route between")
        self.n_memories, self.hidden = int(n_memories), int(hidden)
        n = self.n_memories * len(GATE_FEATURES)
        self.register_buffer("shift", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))
        self.inner = nn.Linear(n, self.hidden)
        self.out = nn.Linear(self.hidden, self.n_memories + 1)
        nn.init.zeros_(self.out.weight)  # starts as fixed weights (softmax of out.bias)

    def config(self) -> dict[str, Any]:
        return {"n_memories": self.n_memories, "hidden": self.hidden}

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.shape[-2:] != (self.n_memories, len(GATE_FEATURES)):
            raise MlpmemError(
                f"the router takes features of {self.n_memories} memories [..., {self.n_memories}, {len(GATE_FEATURES)}], "
                f"got shape {tuple(feats.shape)}",
                "pass one gate_features row per memory, in the router's order",
            )
        x = feats.flatten(-2).to(self.scale.dtype)
        return self.out(torch.tanh(self.inner((x - self.shift) / self.scale)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.logits(feats).softmax(-1)


def read_router_folder(files: dict[str, str]) -> tuple[MemoryRouter, dict[str, Any]]:
    """(router in eval mode, its meta) from a router folder's two files by name (safetensors weights, JSON config)."""
    where = Path(files[ROUTER_CONFIG]).parent
    for name in (ROUTER_CONFIG, GATE_WEIGHTS):
        if not files.get(name) or not Path(files[name]).is_file():
            raise MlpmemError(f"{where} holds no complete router ({name} is missing)", "fit the router again and save the model")
    try:
        data = json.loads(Path(files[ROUTER_CONFIG]).read_text())
        router = MemoryRouter(**data["config"])
        router.load_state_dict(load_file(files[GATE_WEIGHTS]), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise MlpmemError(
            f"the router in {where} is not readable ({str(e).splitlines()[0][:200]})", "fit the router again and save the model"
        )
    check_router_values(router, str(where))
    return router.eval(), data.get("meta", {})


def write_router_folder(folder: Path, router: MemoryRouter, meta: dict[str, Any]) -> None:
    """Write a router: weights (safetensors), then its config and meta (the fingerprints of the memories it was fitted for)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").float().contiguous().clone() for k, v in router.state_dict().items()}
    save_file(state, str(folder / (GATE_WEIGHTS + ".partial")), metadata={"format": "pt"})
    os.replace(folder / (GATE_WEIGHTS + ".partial"), folder / GATE_WEIGHTS)
    (folder / (ROUTER_CONFIG + ".partial")).write_text(json.dumps({"config": router.config(), "meta": meta}, indent=2, default=str))
    os.replace(folder / (ROUTER_CONFIG + ".partial"), folder / ROUTER_CONFIG)


def check_router_values(router: MemoryRouter, where: str) -> None:
    """Non-finite weights would give NaN weights per token (the softmax bounds everything else)."""
    for name, t in router.state_dict().items():
        if not torch.isfinite(t).all():
            raise MlpmemError(f"the router in {where} has non-finite values in {name}", "fit the router again")
