"""--device and --dtype: one resolution rule (models.resolve_device), the same code path on CPU,
the device recorded in manifests and never in a stage's config."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import run_cli, write_corpus_jsonl
from mlpmem.cli import main
from mlpmem.errors import MlpmemError
from mlpmem.models import resolve_device
from mlpmem.pipeline import load_recipe, recipe_problems


def gpu(monkeypatch, count: int = 1, bf16: bool = True) -> None:
    """Pretend torch sees ``count`` CUDA GPUs (only the resolution logic runs: nothing is placed there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


# ---------------------------------------------------------------- the resolution rules


def test_auto_is_cpu_float32_without_a_gpu(monkeypatch):
    gpu(monkeypatch, 0)
    assert resolve_device("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


def test_auto_is_cuda_bfloat16_on_a_gpu_that_has_it(monkeypatch):
    gpu(monkeypatch, 2, bf16=True)
    assert resolve_device("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device("cuda:1", "auto") == (torch.device("cuda:1"), torch.bfloat16)
    assert resolve_device("auto", "float32") == (torch.device("cuda"), torch.float32)  # an explicit dtype is kept
    assert resolve_device("cuda", "float16") == (torch.device("cuda"), torch.float16)  # half is fine on a GPU
    assert resolve_device("cpu", "auto") == (torch.device("cpu"), torch.float32)  # asked for the CPU: float32 there


def test_auto_dtype_is_float32_on_a_gpu_without_bfloat16(monkeypatch):
    gpu(monkeypatch, 1, bf16=False)
    assert resolve_device("auto", "auto") == (torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "CUDA:3"])
def test_an_absent_gpu_is_refused_with_the_fix(monkeypatch, device):
    gpu(monkeypatch, 0)
    with pytest.raises(MlpmemError) as e:
        resolve_device(device, "auto")
    assert "no CUDA GPU" in e.value.problem and "--device cpu or auto" in e.value.fix


def test_a_gpu_index_beyond_the_count_is_refused(monkeypatch):
    gpu(monkeypatch, 2)
    with pytest.raises(MlpmemError) as e:
        resolve_device("cuda:2", "auto")
    assert "2 CUDA GPU(s)" in e.value.problem and "cuda:0..cuda:1" in e.value.problem


def test_mps_only_when_asked_and_refused_when_absent(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    gpu(monkeypatch, 0)
    assert resolve_device("auto", "auto")[0].type == "cpu"  # auto never picks mps
    with pytest.raises(MlpmemError) as e:
        resolve_device("mps", "float32")
    assert "mps" in e.value.problem and "--device cpu or auto" in e.value.fix


def test_float16_on_the_cpu_and_unknown_names_are_refused(monkeypatch):
    gpu(monkeypatch, 0)
    with pytest.raises(MlpmemError) as e:
        resolve_device("cpu", "float16")
    assert "float16" in e.value.problem and "float32 or bfloat16" in e.value.fix
    with pytest.raises(MlpmemError, match="float16"):
        resolve_device("auto", "float16")  # auto became the CPU here
    for device, dtype in (("gpu", "auto"), ("cuda:x", "auto"), ("cpu", "fp32"), ("cpu", "int8")):
        with pytest.raises(MlpmemError, match="unknown"):
            resolve_device(device, dtype)


# ---------------------------------------------------------------- the same numbers on the CPU, whatever the flags say

run = run_cli


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama):
    """corpus, index and targets of the tiny corpus, and a datastore + knnlm + train with the default flags."""
    root = tmp_path_factory.mktemp("devices")
    src = write_corpus_jsonl(root / "c.jsonl")
    m = str(tiny_llama)
    assert main([str(a) for a in ["corpus", "--source", src, "--out", root / "corpus", "--model", m]]) == 0
    dirs = stage_argvs(root, m, "default")
    for argv in dirs["argvs"]:
        assert main([str(a) for a in argv]) == 0, argv
    return {"root": root, "model": m, **dirs}


def stage_argvs(root, m, name, *flags, dtype=()):
    """The argvs of datastore, index, targets, knnlm and train into root/name/, with ``flags`` on the verbs that run a model."""
    out = root / name
    ds, ix, tg, kn, tr = (out / x for x in ("datastore", "index", "targets", "knnlm", "train"))
    argvs = [
        [
            "datastore",
            "--corpus",
            root / "corpus",
            "--out",
            ds,
            "--model",
            m,
            "--context",
            "32",
            "--stride",
            "16",
            "--windows-per-shard",
            "16",
            *flags,
            *dtype,
        ],
        ["index", "--datastore", ds, "--out", ix],
        ["targets", "--datastore", ds, "--index", ix, "--out", tg, "--k", "8", "--top-m", "4"],
        [
            "knnlm",
            "--corpus",
            root / "corpus",
            "--datastore",
            ds,
            "--index",
            ix,
            "--out",
            kn,
            "--k",
            "8",
            "--temperature",
            "2",
            *flags,
            *dtype,
        ],
        [
            "train",
            "--datastore",
            ds,
            "--targets",
            tg,
            "--out",
            tr,
            "--init",
            "lm_head",
            "--n-blocks",
            "1",
            "--epochs",
            "0.2",
            "--batch-size",
            "64",
            "--eval-every",
            "0",
            "--ckpt-every",
            "0",
            *flags,
            *dtype,
        ],
    ]
    return {"argvs": argvs, "datastore": ds, "knnlm": kn, "train": tr}


def test_explicit_cpu_float32_equals_the_default_run(built, capsys):
    mine = stage_argvs(built["root"], built["model"], "explicit", "--device", "cpu", dtype=("--dtype", "float32"))
    for argv in mine["argvs"]:
        assert run(capsys, *argv)[0] == 0, argv
    for name in ("keys-00000.npy", "values-00000.npy"):
        assert (mine["datastore"] / name).read_bytes() == (built["datastore"] / name).read_bytes()
    a, b = (json.loads((d / "knnlm.json").read_text()) for d in (built["knnlm"], mine["knnlm"]))
    assert a["ppl"] == b["ppl"] and a["device"] == b["device"] == "cpu" and a["dtype"] == b["dtype"] == "float32"
    weights = "memory/model.safetensors"
    assert (mine["train"] / weights).read_bytes() == (built["train"] / weights).read_bytes()


def test_auto_runs_on_the_cpu_here_and_the_manifest_says_so(built):
    manifest = json.loads((built["datastore"] / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["dtype"] == "float32"
    assert json.loads((built["train"] / "manifest.json").read_text())["device"] == "cpu"


def test_the_device_is_not_part_of_the_config(built, capsys):
    config = json.loads((built["datastore"] / "config.json").read_text())
    assert "device" not in config and "device" not in config["config"]
    mtimes = {p: p.stat().st_mtime_ns for p in built["datastore"].rglob("*")}
    # built with --device auto; asked again on another device spelling, it is done, not a config mismatch
    argv = stage_argvs(built["root"], built["model"], "default", "--device", "cpu")["argvs"][0]
    assert run(capsys, *argv)[0] == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_a_bfloat16_datastore_on_the_cpu_records_its_dtype(built, capsys):
    out = built["root"] / "bf16"
    argv = stage_argvs(built["root"], built["model"], "bf16", dtype=("--dtype", "bfloat16"))["argvs"][0]
    assert run(capsys, *argv)[0] == 0
    assert json.loads((out / "datastore" / "config.json").read_text())["config"]["dtype"] == "bfloat16"
    keys, ref = np.load(out / "datastore" / "keys-00000.npy"), np.load(built["datastore"] / "keys-00000.npy")
    assert keys.shape == ref.shape and not np.array_equal(keys, ref)  # other numbers, ...
    assert np.abs(keys.astype(np.float32) - ref.astype(np.float32)).max() < 0.2 * np.abs(ref).max()  # ... close to float32's


def test_auto_dtype_is_recorded_as_what_it_ran_as(built, capsys):
    # an explicit auto resolves before config.json is written: on this CPU it is float32, the same as the default folder
    argv = stage_argvs(built["root"], built["model"], "default", dtype=("--dtype", "auto"))["argvs"][0]
    mtimes = {p: p.stat().st_mtime_ns for p in built["datastore"].rglob("*")}
    assert run(capsys, *argv)[0] == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert json.loads((built["datastore"] / "config.json").read_text())["config"]["dtype"] == "float32"


@pytest.mark.parametrize("verb", ["datastore", "knnlm", "train"])
@pytest.mark.parametrize("flags", [("--device", "cuda"), ("--device", "cuda:1"), ("--dtype", "float16")])
def test_an_absent_gpu_or_cpu_half_exits_2_and_leaves_no_folder(built, capsys, monkeypatch, verb, flags):
    gpu(monkeypatch, 0)
    argv = next(a for a in built["argvs"] if a[0] == verb)  # the verb's default-run argv, its --out moved to refused/
    out = argv.index("--out") + 1
    argv = [*argv[:out], built["root"] / "refused" / verb, *argv[out + 1 :]]
    rc, err = run(capsys, *argv, *flags)
    assert rc == 2 and err.count("\n") == 1 and ("--device cpu or auto" in err or "float32 or bfloat16" in err)
    assert not (built["root"] / "refused").exists()


def test_run_and_generate_refuse_an_absent_gpu(built, capsys, monkeypatch, tmp_path):
    gpu(monkeypatch, 0)
    rc, err = run(
        capsys, "run", "--corpus", built["root"] / "c.jsonl", "--model", built["model"], "--out", tmp_path / "r", "--device", "cuda"
    )
    assert rc == 2 and "--device cpu or auto" in err and not (tmp_path / "r").exists()
    rc, err = run(capsys, "generate", built["train"] / "memory", "hello", "--device", "cuda:0")
    assert rc == 2 and "--device cpu or auto" in err


# ---------------------------------------------------------------- recipes


def test_recipe_device_and_dtype_keys(tmp_path):
    base = {"out": str(tmp_path / "r"), "corpus": {"source": "builtin:sotu"}}
    assert recipe_problems({**base, "device": "cuda:1", "dtype": "bfloat16"}) == []
    r = load_recipe({**base, "device": "cpu", "dtype": "bfloat16"})
    assert r.device == "cpu" and r.sections["datastore"].dtype == "bfloat16"
    assert load_recipe(base).device == "auto" and load_recipe(base).sections["datastore"].dtype == "float32"  # today's recipes
    assert load_recipe({**base, "device": "cpu"}, device="cuda", dtype="auto").device == "cuda"  # the command line wins
    problems = recipe_problems({**base, "device": "gpu", "dtype": "fp8"})
    assert any(p.startswith("device:") for p in problems) and any(p.startswith("dtype:") for p in problems)
    assert any(p.startswith("datastore.dtype:") for p in recipe_problems({**base, "dtype": "bfloat16", "datastore": {"dtype": "float32"}}))
    assert load_recipe("sotu").device == "auto"


# ---------------------------------------------------------------- python -m mlpmem


def test_python_dash_m_mlpmem_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "mlpmem", "datastore", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--device" in r.stdout and "--dtype" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mlpmem", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "knnlm" in r.stdout


def test_lm_eval_backend_follows_the_same_rule(monkeypatch):
    backend = pytest.importorskip("mlpmem.lm_eval_backend")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    gpu(monkeypatch, 0)
    assert backend.default_device() == "cpu"  # mps only when asked for
    with pytest.raises(MlpmemError, match="no CUDA GPU"):
        backend.MLPMemoryLM(memory="/nonexistent", device="cuda")  # refused before anything is loaded
    gpu(monkeypatch, 1)
    assert backend.default_device() == "cuda"


def test_a_finished_run_is_done_on_another_device_spelling(tmp_path, tiny_llama, tiny_corpus_file):
    from helpers import tiny_recipe

    from mlpmem.pipeline import run_pipeline

    r = run_pipeline(load_recipe(tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file)))
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "datastore" / "manifest.json").read_text())["device"] == "cpu"
    assert json.loads((run_dir / "recipe.json").read_text())["device"] == "cpu"
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.npy")}
    r2 = run_pipeline(load_recipe(tiny_recipe(tmp_path, tiny_llama, tiny_corpus_file), device="cpu", dtype="auto"))
    assert r2["ppl"] == r["ppl"] and {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rebuilt, the same numbers


def test_generate_on_the_cpu_flags_equals_the_default(built, capsys):
    memory = built["train"] / "memory"
    outs = []
    for flags in ((), ("--device", "cpu", "--dtype", "float32")):
        assert main(["generate", str(memory), "hello world", "--max-new-tokens", "5", *flags]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "LM + memory" in outs[0]
    assert (
        main(["generate", str(memory), "hello world", "--max-new-tokens", "5", "--dtype", "bfloat16"]) == 0
    )  # runs in bfloat16 on the CPU


def test_local_device_resolves_auto_in_one_process():
    """dist.local_device goes through the one resolver: ``auto`` becomes a real torch device (train_memory(device="auto")
    used to hand the string "auto" to torch.device)."""
    import torch

    from mlpmem import dist

    got = dist.local_device("auto")
    assert got == ("cuda" if torch.cuda.is_available() else "cpu")
    torch.device(got)  # a name torch accepts
