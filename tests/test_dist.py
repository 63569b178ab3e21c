"""Several processes (torchrun, gloo on localhost) write the same artefacts as one, and resume each other's runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlpmem import dist
from mlpmem.corpus import CorpusConfig, build_corpus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # one thread per process in every run: then the same shard is the same computation, bit for bit
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def mlpmem(nproc: int, *argv, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """`mlpmem ARGV` as one plain process, or under torchrun (or accelerate launch) with ``nproc`` processes."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "mlpmem", *map(str, argv)]
    elif launcher == "accelerate":
        # --multi_gpu is accelerate's torchrun-style launcher; on a machine without GPUs it starts CPU processes
        cmd = [
            str(Path(sys.executable).with_name("accelerate")),
            "launch",
            "--num_processes",
            str(nproc),
            "--num_machines",
            "1",
            "--multi_gpu",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "mlpmem",
            *map(str, argv),
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "-m",
            "mlpmem",
            *map(str, argv),
        ]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _npy(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(folder.glob("*.npy"))}


def test_my_items_cover_every_item_once_for_any_world():
    for n in (0, 1, 5, 16):
        for size in (1, 2, 3, 7):
            got = sorted(i for r in range(size) for i in dist.my_items(n, dist.World(r, size)))
            assert got == list(range(n))


def test_on_main_is_a_plain_call_for_one_process():
    assert dist.on_main(lambda x: x + 1, 1) == 2
    assert dist.all_sum([1.0, 2.0]).tolist() == [1.0, 2.0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_llama):
    from helpers import write_corpus_jsonl

    root = tmp_path_factory.mktemp("dist")
    return build_corpus(root / "corpus", CorpusConfig(source=str(write_corpus_jsonl(root / "c.jsonl")), model=str(tiny_llama)))


@pytest.fixture(scope="module")
def one_ds(corpus, tiny_llama, tmp_path_factory):
    """The datastore as one plain process writes it: the reference the multi-process runs are compared with."""
    out = tmp_path_factory.mktemp("one") / "ds"
    mlpmem(1, *_ds_args(corpus, out, tiny_llama))
    return out


def _ds_args(corpus, out, model, *extra):
    return (
        "datastore",
        "--corpus",
        corpus,
        "--out",
        out,
        "--model",
        model,
        "--context",
        "32",
        "--stride",
        "16",
        "--windows-per-shard",
        "3",
        "--device",
        "cpu",
        *extra,
    )


def test_datastore_two_processes_same_files_as_one_and_resume_with_another_count(tmp_path, corpus, tiny_llama, one_ds):
    one, two = one_ds, tmp_path / "two"
    r = mlpmem(2, *_ds_args(corpus, two, tiny_llama))
    a, b = _npy(one), _npy(two)
    assert len(a) >= 6 and a.keys() == b.keys()  # several shards, so both ranks had work
    for name in a:
        # same shard, same computation on one thread: identical (keys within fp16 rounding in general)
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    m1, m2 = (json.loads((f / "manifest.json").read_text()) for f in (one, two))
    assert m2["processes"] == 2 and m2["n_rows"] == m1["n_rows"]
    on_disk = sum(p.stat().st_size for p in two.glob("*.npy"))
    assert m2["bytes_per_token"]["total"] * m2["n_rows"] == pytest.approx(on_disk)
    assert 2 * m2["d"] < m2["bytes_per_token"]["keys"] < 1.1 * 2 * m2["d"]  # float16 keys, plus the npy headers of small shards
    assert [s["start"] for s in m2["shards"]] == [s["start"] for s in m1["shards"]]
    assert not list(two.glob("progress*.json")) and not (two / ".mlpmem.lock").exists()
    assert r.stderr.count(" rows of d=") == 1  # rank 0 speaks for both

    # a 2-process run that stopped after some shards (as a kill leaves it: shard files and records,
    # no manifest) finishes in one process, and the result is the same
    import shutil

    shutil.copytree(two, tmp_path / "partial")
    part = tmp_path / "partial"
    (part / "manifest.json").unlink()
    for s in m2["shards"][1::2]:  # drop every other shard: what rank 1 would have written
        for rec in s["arrays"].values():
            (part / rec["file"]).unlink()
    for i, s in enumerate(m2["shards"]):
        if i % 2 == 0:
            (part / f"progress-{i:05d}.json").write_text(json.dumps(s))
    mlpmem(1, *_ds_args(corpus, part, tiny_llama))
    c = _npy(part)
    assert c.keys() == a.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], c[name], err_msg=name)
    assert json.loads((part / "manifest.json").read_text())["n_rows"] == m1["n_rows"]


def test_knnlm_two_processes_score_every_position_once_and_agree_with_one(tmp_path, corpus, tiny_llama, one_ds):
    from mlpmem.index import IndexConfig, build_index

    ds = one_ds
    ix = build_index(ds, tmp_path / "ix", IndexConfig(kind="flat"))
    args = ("knnlm", "--corpus", corpus, "--datastore", ds, "--index", ix, "--k", "8", "--device", "cpu")
    mlpmem(1, *args, "--out", tmp_path / "one")
    r = mlpmem(2, *args, "--out", tmp_path / "two")
    one, two = (json.loads((tmp_path / f / "knnlm.json").read_text()) for f in ("one", "two"))
    assert two["processes"] == 2 and two["n_tokens"] == one["n_tokens"]
    for method in one["ppl"]:
        assert two["ppl"][method] == pytest.approx(one["ppl"][method], rel=1e-5), method
    assert two["knn_temperature"] == one["knn_temperature"]
    assert r.stdout.count("base") == 1  # the table is printed once


def test_train_two_processes_ddp_matches_one_and_resumes_with_one(tmp_path, corpus, tiny_llama, one_ds):
    import shutil

    from safetensors.numpy import load_file

    from mlpmem.index import IndexConfig, build_index
    from mlpmem.targets import TargetsConfig, build_targets

    ds = one_ds
    ix = build_index(ds, tmp_path / "ix", IndexConfig(kind="flat"))
    tg = build_targets(ds, ix, tmp_path / "tg", TargetsConfig(k=8, top_m=4))
    # 7 rows per micro-batch: the two ranks get 4 and 3, so the gradient weighting matters
    args = (
        "train",
        "--datastore",
        ds,
        "--targets",
        tg,
        "--epochs",
        "0.03",
        "--batch-size",
        "14",
        "--grad-accum",
        "2",
        "--n-blocks",
        "1",
        "--ckpt-every",
        "2",
        "--keep-last",
        "100",
        "--eval-every",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--init",
        "plain",
    )
    mlpmem(1, *args, "--out", tmp_path / "one")
    mlpmem(2, *args, "--out", tmp_path / "two")
    a, b = (load_file(str(tmp_path / f / "memory" / "model.safetensors")) for f in ("one", "two"))
    assert a.keys() == b.keys()
    moved = max(
        float(np.abs(a[k] - load_file(str(tmp_path / "one" / "checkpoints" / "step-000002" / "model.safetensors"))[k]).max()) for k in a
    )
    assert moved > 1e-3  # training moved the weights well beyond the tolerance below
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m["processes"] == 2 and m["steps"] == json.loads((tmp_path / "one" / "manifest.json").read_text())["steps"]

    # stopped after its step-2 checkpoint with 2 processes, finished by 1
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "two", part)
    for p in ["manifest.json", "memory", *(c.name for c in (part / "checkpoints").iterdir() if c.name != "step-000002")]:
        target = part / p if not p.startswith("step-") else part / "checkpoints" / p
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    r = mlpmem(1, *args, "--out", part)
    assert "resuming memory training from" in r.stderr
    c = load_file(str(part / "memory" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], c[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_run_recipe_two_processes_reports_what_one_process_reports(tmp_path, tiny_llama, tiny_corpus_file):
    """`torchrun -m mlpmem run RECIPE`: corpus and index once (rank 0), the other stages split; one report."""

    from helpers import tiny_recipe

    reports = {}
    for n in (1, 2):
        recipe = tiny_recipe(tmp_path / str(n), tiny_llama, tiny_corpus_file, init="lm_copy", input_site="output", precision="fp32")
        recipe["device"] = "cpu"
        path = tmp_path / f"recipe{n}.yaml"
        path.write_text(json.dumps(recipe))  # JSON is YAML
        r = mlpmem(n, "run", path)
        reports[n] = json.loads((tmp_path / str(n) / "run" / "report.json").read_text())
    one, two = reports[1], reports[2]
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["n_scored_tokens"] == one["n_scored_tokens"] and two["knn_temperature"] == one["knn_temperature"]
    for method in one["ppl"]:
        assert two["ppl"][method] == pytest.approx(one["ppl"][method], rel=1e-3), method
    assert r.stdout.count("mlp_memory") <= 2  # the table once, not once per process


def test_datastore_under_accelerate_launch_writes_what_one_process_writes(tmp_path, corpus, tiny_llama, one_ds):
    mlpmem(2, *_ds_args(corpus, tmp_path / "acc", tiny_llama), launcher="accelerate")
    a, b = _npy(one_ds), _npy(tmp_path / "acc")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert '"processes": 2' in (tmp_path / "acc" / "manifest.json").read_text()


def test_paper_scale_recipe_runs_at_tiny_scale(tmp_path, tiny_llama, tiny_corpus_file):
    """The wikitext103 recipe's settings (bf16 LM, lm_copy memory on the last layer's output, bf16 training,
    checkpoints) run end to end with only the sizes, the model, the corpus and the index kind replaced
    (its IVF4096,PQ64 needs ~160k keys of d >= 64 to train)."""
    import yaml

    from mlpmem.pipeline import RECIPES, load_recipe, run_pipeline

    data = yaml.safe_load((RECIPES / "wikitext103.yaml").read_text())
    assert data["index"]["kind"] == "mlpmemory" and data["train"]["init"] == "lm_copy"
    data.update(out=str(tmp_path / "run"), model=str(tiny_llama))
    data["corpus"].update(source=str(tiny_corpus_file), valid_fraction=0.2, test_fraction=0.2, valid_tokens=300, test_tokens=300)
    data["eval"] = {"mixing": "fixed"}  # the gate (auto) is test_gate's
    data["datastore"].update(context=64, stride=32, batch_size=4, windows_per_shard=8)
    data["index"] = {"kind": "flat"}
    data["knn"]["k"] = 32
    data["targets"]["top_m"] = 16
    data["train"].update(batch_size=256, epochs=1.0, eval_every=4, ckpt_every=4)
    r = run_pipeline(load_recipe(data))
    assert r["memory_input"] == {"layer": 1, "site": "output"} and set(r["ppl"]) >= {"base", "knn_lm", "mlp_memory"}
    assert json.loads((tmp_path / "run" / "datastore" / "manifest.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path, tiny_llama):
    """bench/gpu_check.sh with DEV=cpu and a tiny model: the same commands as on a GPU, down to its JSON."""
    root = Path(__file__).resolve().parents[1]
    env = {
        **_env(),
        "DEV": "cpu",
        "MODEL": str(tiny_llama),
        "TOKENS": "3000",
        "K": "64",
        "CTX": "64",
        "VALID": "400",
        "TEST": "500",
        "OUT": str(tmp_path / "out"),
        "JSON": str(tmp_path / "gpu_check.json"),
        "MLPMEM": f"{sys.executable} -m mlpmem",
        "PY": sys.executable,
    }
    r = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["datastore_values_equal"] and report["knnlm"]["torchrun"]["ppl"] == pytest.approx(report["knnlm"]["cpu"]["ppl"], rel=1e-5)


def test_a_verb_that_does_not_split_runs_once_under_torchrun(tmp_path, one_ds):
    """`torchrun -m mlpmem index`: rank 0 builds the index, the other waits (no lock clash, one manifest)."""
    r = mlpmem(2, "index", "--datastore", one_ds, "--out", tmp_path / "ix", "--kind", "flat")
    assert (tmp_path / "ix" / "manifest.json").exists() and "being written by another" not in r.stderr
