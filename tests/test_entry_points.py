"""Every entry point (mlpmem, mlpmem-lm-eval, python -m mlpmem.rag, python -m mlpmem under torchrun) turns a user
error into one paragraph and exit status 2; the command line's overrides, flags and numbers mean what they say."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_texts, run_cli

from mlpmem.cli import build_parser, load_recipe_of, main, parse_command_line
from mlpmem.errors import MlpmemError


def _recipe(tmp_path: Path, model: str = "smollm2-135m", extra: str = "") -> Path:
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts()))
    other = tmp_path / "other.jsonl"
    other.write_text(src.read_text())
    r = tmp_path / "r.yaml"
    r.write_text(
        f"out: {tmp_path / 'run'}\nmodel: {model}\ncorpus:\n  source: {src}\n  train_tokens: 2000\n"
        "datastore:\n  context: 32\n  stride: 16\nknn:\n  k: 16\ntargets:\n  top_m: 8\ntrain:\n  epochs: 1\n  batch_size: 64\n  n_blocks: 1\n"
        + extra
    )
    return r


def _args(*argv):
    return parse_command_line(build_parser(argv[0]), [str(a) for a in argv])


# ---------------------------------------------------------------- 1. one paragraph, exit 2, from every entry point


def test_only_rank_0_prints_a_user_error(tmp_path, capsys, monkeypatch):
    """Under a launcher every rank meets the same error: rank 0 prints it, every rank exits 2 (argparse's errors too)."""
    from mlpmem import errors

    monkeypatch.setattr(errors, "LAUNCH_WAIT_S", 0.0)
    rc, err = run_cli(capsys, "run", tmp_path / "nope.yaml")
    assert rc == 2 and err.count("mlpmem: error:") == 1 and "does not exist" in err
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, err = run_cli(capsys, "run", tmp_path / "nope.yaml")
    assert rc == 2 and err == ""
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-such-flag"])
    assert e.value.code == 2 and capsys.readouterr().err == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_torchrun_prints_one_message(tmp_path):
    """`torchrun -m mlpmem` with a user error: one message (rank 0's), and each rank exits 2."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "mlpmem",
        "run",
        str(tmp_path / "nope.yaml"),
    ]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert r.stderr.count("mlpmem: error:") == 1, r.stderr[-3000:]
    assert "does not exist" in r.stderr and "exitcode  : 2" in r.stderr


@pytest.fixture(scope="module")
def memory(tiny_llama, tmp_path_factory) -> Path:
    import torch

    from mlpmem.memory import MemoryConfig, MLPMemory, save_memory
    from mlpmem.models import load_model, logits_size, tokenizer_hash

    root = tmp_path_factory.mktemp("entry")
    lm, tok, model_id = load_model(str(tiny_llama))
    torch.manual_seed(0)
    mem = MLPMemory(MemoryConfig(d_in=32, vocab_size=logits_size(lm), n_blocks=1))
    save_memory(root / "memory", mem, {"model_id": model_id, "tokenizer_hash": tokenizer_hash(tok), "layer": 1, "site": "ffn_input"})
    return root / "memory"


@pytest.mark.parametrize(
    "bad, named",
    [
        ("memory={missing}", "holds no complete memory"),
        ("memory={m};{m},weights=0.5;0.5;0.5", "sum to 1"),
        ("memory={m},lambda_=abc", "lambda_='abc'"),
        ("memory={m},memory_temperature=hot", "memory_temperature='hot'"),
        ("memory={m},weights=a;b", "weights='a'"),
        ("memory={m},max_length=long", "max_length='long'"),
        ("memory={m},mixing=bogus", "mixing must be one of"),
        ("base_model=x", "needs memory=PATH"),
    ],
)
def test_bad_model_args_are_user_errors(memory, tmp_path, bad, named):
    """Each bad --model_args is an MlpmemError naming the argument (a ValueError for lambda_=abc before)."""
    pytest.importorskip("lm_eval")
    from mlpmem.lm_eval_backend import MLPMemoryLM

    with pytest.raises(MlpmemError, match=named.replace("(", r"\(").replace("[", r"\[")):
        MLPMemoryLM.create_from_arg_string(bad.format(m=memory, missing=tmp_path / "nope"), {"batch_size": 1, "device": "cpu"})


def _tasks(folder: Path) -> Path:
    folder.mkdir()
    (folder / "mc.jsonl").write_text(
        "".join(json.dumps({"context": t[:30], "choices": [" a", " b"], "label": 0}) + "\n" for t in make_texts(2))
    )
    (folder / "mc.yaml").write_text(
        f"task: t_entry\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
    )
    return folder


def test_lm_eval_commands_print_bad_model_args_as_one_paragraph(memory, tmp_path):
    """`python -m mlpmem.lm_eval_backend` (= mlpmem-lm-eval) and `python -m mlpmem.rag`: exit 2, one paragraph, no traceback."""
    pytest.importorskip("lm_eval")
    tasks = _tasks(tmp_path / "tasks")
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "--model",
                "mlpmem",
                "--model_args",
                f"memory={memory},lambda_=abc",
                "--tasks",
                "t_entry",
                "--include_path",
                str(tasks),
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in ("mlpmem.lm_eval_backend", "mlpmem.rag")
    ]
    for p in runs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-3000:]
        assert "mlpmem: error: model argument lambda_='abc' is not a number" in err and "Traceback" not in err


# ---------------------------------------------------------------- 2. device= as a model argument


def test_device_as_a_model_argument(memory, tmp_path):
    """lm-eval passes its own --device (and --batch_size) as keywords too: device= in model_args was a TypeError."""
    pytest.importorskip("lm_eval")
    from mlpmem.lm_eval_backend import MLPMemoryLM
    from mlpmem.lm_eval_cli import model_args_device
    from mlpmem.rag import RagLM

    lm = MLPMemoryLM.create_from_arg_string(
        f"memory={memory},device=cpu,batch_size=2", {"batch_size": 1, "max_batch_size": None, "device": "cpu"}
    )
    assert lm.device.type == "cpu" and lm.batch_size_per_gpu == 2
    lm = MLPMemoryLM.create_from_arg_obj({"memory": str(memory), "device": "cpu"}, {"batch_size": 1, "device": "cpu"})
    assert lm.device.type == "cpu"
    with pytest.raises(MlpmemError, match="does not exist"):  # the arguments reach the backend (a TypeError before)
        RagLM.create_from_arg_string(f"corpus={tmp_path / 'nope'},device=cpu", {"batch_size": 1, "device": "cpu"})
    # the command line passes the device model_args names as lm-eval's --device (not a default that contradicts it)
    assert model_args_device(["--model", "mlpmem", "--model_args", "memory=m,device=cpu"]) == "cpu"
    assert model_args_device(["--model_args=memory=m"]) is None


# ---------------------------------------------------------------- 3, 5. overrides anywhere; flags are overrides


def test_overrides_anywhere_on_the_command_line(tmp_path, capsys):
    r = _recipe(tmp_path)
    a = _args("run", r, "--out", tmp_path / "o", "train.epochs=3", "--device", "cpu", "knn.k=8")
    assert a.overrides == ["train.epochs=3", "knn.k=8"]
    recipe = load_recipe_of(a)
    assert recipe.sections["train"].epochs == 3 and recipe.sections["knn"].k == 8 and recipe.out == str(tmp_path / "o")
    recipe = load_recipe_of(_args("plan", "--out", tmp_path / "o", "train.epochs=2", r))  # the recipe after flags and overrides
    assert recipe.sections["train"].epochs == 2
    with pytest.raises(SystemExit) as e:  # anything else left over is still argparse's error
        _args("run", r, "--out", tmp_path / "o", "oops")
    assert e.value.code == 2 and "unrecognized arguments: oops" in capsys.readouterr().err
    with pytest.raises(MlpmemError, match="one recipe"):
        load_recipe_of(_args("run", r, "train.epochs=2", r))


def test_run_flags_are_the_same_as_their_overrides(tmp_path, capsys):
    """--corpus, --model, --mixing with a recipe that names its own: the flag wins, as its dotted override would."""
    r = _recipe(tmp_path)
    recipe = load_recipe_of(_args("run", r, "--corpus", tmp_path / "other.jsonl", "--model", "gpt2", "--mixing", "gated"))
    assert recipe.sections["corpus"].source == str(tmp_path / "other.jsonl") and recipe.model == "gpt2"
    assert recipe.sections["datastore"].model == "gpt2" and recipe.sections["eval"].mixing == "gated"
    assert load_recipe_of(_args("run", r)).model == "smollm2-135m"  # no flag: the recipe's
    with pytest.raises(MlpmemError, match="corpus.source"):  # checked as the recipe's own key
        load_recipe_of(_args("run", r, "--corpus", tmp_path / "missing.jsonl"))
    with pytest.raises(MlpmemError, match="same setting"):
        load_recipe_of(_args("run", r, "--model", "gpt2", "model=gpt2-medium"))
    quick = load_recipe_of(_args("run", "--corpus", tmp_path / "other.jsonl", "--out", tmp_path / "q", "train.epochs=1"))
    assert quick.model == "smollm2-135m" and quick.sections["train"].epochs == 1
    # the other verbs' flags that were silently ignored are refused
    rc, err = run_cli(capsys, "tasks", "source", "--out", tmp_path / "t", "--corpus", "x", "--n-items", "3")
    assert rc == 2 and "--corpus, --n-items apply to `mlpmem tasks build`" in err
    rc, err = run_cli(
        capsys, "targets", "--datastore", "d", "--index", "i", "--out", tmp_path / "tg", "--temperature", "2", "--tuning", "k.json"
    )
    assert rc == 2 and "--tuning" in err and not (tmp_path / "tg").exists()


# ---------------------------------------------------------------- 4. numbers YAML reads as text


def test_numbers_yaml_reads_as_text_are_floats(tmp_path):
    from mlpmem.typed_config import from_dict
    from mlpmem.pipeline import load_recipe
    from mlpmem.train import TrainConfig

    r = _recipe(tmp_path, extra="  lr: 1e-4\n")
    recipe = load_recipe(str(r), overrides=["train.weight_decay=5E-2", "knn.temperatures=[1e-1, 2]", "corpus.valid_fraction=+.05"])
    assert recipe.sections["train"].lr == 1e-4 and isinstance(recipe.sections["train"].lr, float)
    assert recipe.sections["train"].weight_decay == 0.05 and recipe.sections["knn"].temperatures == [0.1, 2]
    assert recipe.sections["corpus"].valid_fraction == 0.05
    assert from_dict(TrainConfig, {"lr": "2e-3"}).lr == 2e-3
    with pytest.raises(MlpmemError, match="train.n_blocks: expected int"):  # whole-number fields stay strict
        load_recipe(str(r), overrides=["train.n_blocks=1e2"])
    with pytest.raises(MlpmemError, match="train.lr: expected float"):
        load_recipe(str(r), overrides=["train.lr=1e-4x"])


# ---------------------------------------------------------------- 6. plan checks its inputs as run does


def test_plan_refuses_bad_inputs_before_any_work(tmp_path, tiny_llama, capsys, monkeypatch):
    import mlpmem.plan

    def no_calibration(*a, **k):
        raise AssertionError("calibrated before the inputs were checked")

    monkeypatch.setattr(mlpmem.plan, "calibrate", no_calibration)
    r = _recipe(tmp_path, model=str(tiny_llama))
    good = {"extract_rows_s": 100.0, "score_rows_s": 100.0, "search_qps": 100.0, "search_rows": 50000, "train_positions_s": 1000.0}
    bad = tmp_path / "tp.json"
    bad.write_text(json.dumps({**good, "search_qps": 0, "score_rows_s": "fast"}))
    tp = tmp_path / "good.json"
    tp.write_text(json.dumps(good))
    cases = [
        (["--train-tokens", "-5"], "--train-tokens must be"),
        (["--train-tokens", "5000"], "more than the recipe's cap"),
        (["--throughputs", bad], "score_rows_s: expected float"),
        (["--throughputs", tp, "knn.k=1998", "corpus.train_tokens=1000"], "knn.k: 1998"),  # the recipe's check
        (["--throughputs", tp, "knn.k=1998", "corpus.train_tokens=null", "--train-tokens", "1000"], "knn.k=1998 neighbours"),  # run's check
        (["--throughputs", tp, "train.batch_size=1000000000"], "train.batch_size=1000000000"),
        (["--throughputs", tp, "datastore.batch_size=100000000"], "datastore.batch_size=100000000"),
        (["--json", tmp_path / "no" / "p.json"], "does not exist"),
        (["--json", tmp_path], "is a folder"),
    ]
    for flags, named in cases:
        rc, err = run_cli(capsys, "plan", r, *flags)
        assert rc == 2 and err.count("mlpmem: error:") == 1 and named in err, (flags, err)
    bad.write_text(json.dumps({**good, "search_qps": 0}))
    rc, err = run_cli(capsys, "plan", r, "--throughputs", bad)
    assert rc == 2 and "search_qps: must be a finite number > 0" in err
    assert not list(tmp_path.rglob("*.partial")) and not (tmp_path / "run").exists()
    rc, err = run_cli(capsys, "plan", r, "--throughputs", tp, "train.lr=1e-4", "--json", tmp_path / "p.json")
    assert rc == 0 and json.loads((tmp_path / "p.json").read_text())["tokens"]["train"] == 2000
