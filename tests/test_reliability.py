"""Issue 10's hostile inputs, the fast subset: each gives one clear error (or the right result) and
leaves nothing half-written that would block the corrected command. The full set (100+ cases)
is bench/hostile.py."""

import argparse
import errno
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import run_cli, write_corpus_jsonl
from mlpmem.cli import main
from mlpmem.errors import MlpmemError
from mlpmem.files import check_file, file_record
from mlpmem.folders import ADDED_SETTINGS, LOCK, MARKER, acquire_lock, claim_out, config_differences, prepare_out, release_lock


run = run_cli


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_llama):
    """corpus, datastore, index and targets of the tiny corpus (built once)."""
    root = tmp_path_factory.mktemp("stages")
    src = write_corpus_jsonl(root / "c.jsonl")
    m = str(tiny_llama)
    for argv in (
        ["corpus", "--source", src, "--out", root / "corpus", "--model", m],
        [
            "datastore",
            "--corpus",
            root / "corpus",
            "--out",
            root / "datastore",
            "--model",
            m,
            "--context",
            "32",
            "--stride",
            "16",
            "--windows-per-shard",
            "16",
        ],
        ["index", "--datastore", root / "datastore", "--out", root / "index"],
        ["targets", "--datastore", root / "datastore", "--index", root / "index", "--out", root / "targets", "--k", "8", "--top-m", "4"],
    ):
        assert main([str(a) for a in argv]) == 0
    return {"root": root, "src": src, "model": m, **{n: root / n for n in ("corpus", "datastore", "index", "targets")}}


def corpus_argv(stages, out, *flags):
    return ["corpus", "--source", stages["src"], "--out", out, "--model", stages["model"], *flags]


# ---------------------------------------------------------------- 1, 2: never delete or overwrite what is not ours


def test_overwrite_never_deletes_a_folder_we_did_not_write(stages, tmp_path, capsys):
    out = tmp_path / "u"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    rc, err = run(capsys, *corpus_argv(stages, out, "--train-tokens", "1000", "--overwrite"))
    assert rc == 2 and "not written by mlpmem" in err and "thesis.txt" in err and "choose an empty or new --out" in err
    assert (out / "thesis.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["thesis.txt"]
    assert run(capsys, *corpus_argv(stages, tmp_path / "new", "--train-tokens", "1000"))[0] == 0  # the corrected command


def test_overwrite_deletes_only_our_files_and_refuses_others(stages, tmp_path, capsys):
    out = tmp_path / "c"
    assert run(capsys, *corpus_argv(stages, out))[0] == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "corpus"
    (out / "notes.txt").write_text("mine")
    rc, err = run(capsys, *corpus_argv(stages, out, "--train-tokens", "500", "--overwrite"))
    assert rc == 2 and "did not write (notes.txt)" in err and (out / "notes.txt").exists() and (out / "manifest.json").exists()
    (out / "notes.txt").unlink()
    assert run(capsys, *corpus_argv(stages, out, "--train-tokens", "500", "--overwrite"))[0] == 0
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["n_tokens"] == 500


def test_another_kind_of_stage_is_never_overwritten(stages, tmp_path, capsys):
    import shutil

    out = shutil.copytree(stages["corpus"], tmp_path / "c")
    before = (out / "config.json").read_bytes()
    for kind in ("export", "datastore", "memory"):
        with pytest.raises(MlpmemError, match="holds a `corpus` stage"):
            claim_out(out, kind)
    rc, err = run(capsys, "index", "--datastore", stages["datastore"], "--out", out, "--overwrite")
    assert rc == 2 and "`corpus` stage" in err
    assert (out / "config.json").read_bytes() == before and (out / "tokens.train.npy").exists()
    assert claim_out(tmp_path / "fresh", "export") == tmp_path / "fresh"  # new folders are claimed and marked
    claim_out(tmp_path / "fresh", "export")  # idempotent for the same kind


# ---------------------------------------------------------------- 3: a config matches only the full resolved config


def test_empty_or_foreign_config_does_not_match(tmp_path):
    cfg = {"source": "a", "seed": 0}
    assert config_differences({}, cfg) == ["seed: not set -> 0", "source: not set -> 'a'"]
    assert config_differences({"source": "a", "seed": 0, "foo": 1}, cfg) == ["foo: 1 -> not set"]
    assert config_differences(cfg, dict(cfg)) == []
    # a setting a later version added matches a folder written before it only at the value old folders used
    assert "config.mode" in ADDED_SETTINGS["datastore"]
    old = {"config": {"split": "train"}}
    assert config_differences(old, {"config": {"split": "train", "mode": "recompute"}, "extract_mode": "recompute"}, "datastore") == []
    assert config_differences(old, {"config": {"split": "train", "mode": "cache"}}, "datastore") == ["config.mode: not set -> 'cache'"]
    out = tmp_path / "s"
    assert prepare_out(out, cfg, kind="corpus") == "fresh"
    (out / "documents.json").write_text("{}")  # an output: the folder is no longer empty of results
    (out / "config.json").write_text("{}")
    with pytest.raises(MlpmemError, match="different configuration.*seed: not set"):
        prepare_out(out, cfg, kind="corpus")


# ---------------------------------------------------------------- 5: duplicates


def test_duplicate_texts_are_dropped_before_the_split(stages, tmp_path, capsys):
    from helpers import make_texts

    texts = make_texts(12, 60, seed=7)
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)] + [{"id": f"copy{j}", "text": texts[3]} for j in range(3)]
    src = tmp_path / "dups.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run(capsys, "corpus", "--source", src, "--out", tmp_path / "c", "--model", stages["model"])[0] == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    docs = json.loads((tmp_path / "c" / "documents.json").read_text())
    ids = [d["id"] for split in docs.values() for d in split]
    assert m["n_duplicates_dropped"] == 3 and m["n_documents_total"] == 12
    assert "d3" in ids and not [i for i in ids if i.startswith("copy")]


# ---------------------------------------------------------------- 6: the whole recipe before stage 1


@pytest.mark.parametrize(
    "body,expect",
    [
        ("knn:\n  lambda: 1.5\n", "knn.lambda: must lie in [0.0, 1.0], got 1.5"),
        ("eval:\n  split: bogus\n", "eval.split: must be one of train, valid, test, got 'bogus'"),
        ("train:\n  width: 0\n", "train.width: must be a finite number > 0 or null, got 0"),
        ("knn:\n  k: 0\n", "knn.k: must be a finite number > 0, got 0"),
        ("knn:\n  temperature: 0\n", "knn.temperature: must be a finite number > 0 or null, got 0"),
        ("  train_tokens: -5\n", "corpus.train_tokens: must be at least 2 tokens"),
        ("  train_tokens: 300\nknn:\n  k: 1024\n", "knn.k: 1024 neighbours cannot be found among the 299 datastore rows"),
    ],
)
def test_recipe_is_checked_before_any_stage(stages, tmp_path, capsys, body, expect):
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out: {out}\nmodel: {stages['model']}\ncorpus:\n  source: {stages['src']}\n" + body)
    rc, err = run(capsys, "run", recipe)
    assert rc == 2 and expect in err
    assert not out.exists()  # nothing written: the fixed recipe starts clean, no --overwrite needed
    assert "datastore rows" not in err or "train_tokens: 300" in body  # no cross-check built on an invalid value


def test_a_corpus_passed_as_recipe_is_named(stages, capsys):
    rc, err = run(capsys, "run", stages["src"])
    assert rc == 2 and "looks like a corpus" in err and "--corpus" in err


def test_all_recipe_problems_at_once_and_k_against_the_built_corpus(stages):
    from mlpmem.pipeline import check_k_fits, load_recipe

    with pytest.raises(MlpmemError) as e:
        load_recipe(
            {"out": "x", "train": {"width": 0, "lr": -1}, "knn": {"lambda": 2}, "eval": {"split": "x"}, "datastore": {"split": "test"}}
        )
    for key in ("train.width", "train.lr", "knn.lambda", "eval.split", "datastore.split"):
        assert key in str(e.value)
    n = json.loads((stages["corpus"] / "manifest.json").read_text())["splits"]["train"]["n_tokens"]
    check_k_fits(stages["corpus"], n - 2)
    with pytest.raises(MlpmemError, match=f"at most {n - 2} neighbours"):
        check_k_fits(stages["corpus"], n - 1)


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["corpus", "--source", "x.jsonl", "--out", "o", "--train-tokens", "-5"], "--train-tokens: must be at least 2"),
        (["train", "--datastore", "d", "--targets", "t", "--out", "o", "--width", "0"], "--width: must be a finite number > 0"),
        (["train", "--datastore", "d", "--targets", "t", "--out", "o", "--lr", "none"], "--lr: expected float, got None"),
        (["targets", "--datastore", "d", "--index", "i", "--out", "o", "--temperature", "0"], "--temperature: must be a finite number > 0"),
        (["generate", "m", "hi", "--lambda", "1.5"], "--lambda: must lie in [0.0, 1.0]"),
    ],
)
def test_verb_flags_get_the_same_checks(tmp_path, capsys, monkeypatch, argv, expect):
    monkeypatch.chdir(tmp_path)
    rc, err = run(capsys, *argv)
    assert rc == 2 and expect in err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 7: integrity


def test_sampled_hash_catches_overwritten_bytes_and_verify_catches_the_rest(tmp_path):
    small = tmp_path / "s.bin"
    small.write_bytes(bytes(range(256)) * 100)
    rec = file_record(tmp_path, small)
    data = bytearray(small.read_bytes())
    data[12345] ^= 1
    small.write_bytes(bytes(data))
    with pytest.raises(MlpmemError, match="sampled blocks.*corrupted"):
        check_file(tmp_path, rec, False, "fix")
    big = tmp_path / "b.bin"
    big.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    rec = file_record(tmp_path, big)
    data = bytearray(big.read_bytes())
    data[(1 << 20) // 8] ^= 1  # outside the five sampled blocks
    big.write_bytes(bytes(data))
    check_file(tmp_path, rec, False, "fix")  # the cheap check cannot see it (documented)
    with pytest.raises(MlpmemError, match="sha256.*corrupted"):
        check_file(tmp_path, rec, True, "fix")


def test_overwritten_keys_are_refused_by_default(stages, tmp_path, capsys):
    import shutil

    ds = shutil.copytree(stages["datastore"], tmp_path / "ds")
    f = ds / "keys-00000.npy"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    rc, err = run(capsys, "index", "--datastore", ds, "--out", tmp_path / "ix")
    assert rc == 2 and "keys-00000.npy" in err and "corrupted" in err


def test_shard_deleted_from_an_unfinished_datastore_is_redone(stages, tmp_path, capsys, monkeypatch):
    from mlpmem import datastore

    argv = [
        "datastore",
        "--corpus",
        stages["corpus"],
        "--out",
        tmp_path / "ds",
        "--model",
        stages["model"],
        "--context",
        "32",
        "--stride",
        "16",
        "--windows-per-shard",
        "16",
    ]
    real, calls = datastore.save_npy, []

    def crash(path, arr):
        calls.append(path)
        if len(calls) == 4:  # during the second shard
            raise KeyboardInterrupt
        return real(path, arr)

    monkeypatch.setattr(datastore, "save_npy", crash)
    assert run(capsys, *argv)[0] == 130
    monkeypatch.setattr(datastore, "save_npy", real)
    (tmp_path / "ds" / "keys-00000.npy").unlink()
    assert run(capsys, *argv)[0] == 0
    for f in sorted(stages["datastore"].glob("*.npy")):
        assert (tmp_path / "ds" / f.name).read_bytes() == f.read_bytes(), f.name


def _train(stages, out, **kw):
    from mlpmem.train import TrainConfig, train_memory

    cfg = TrainConfig(init="plain", epochs=1.0, batch_size=64, n_blocks=1, ckpt_every=3, eval_every=0, keep_last=2, seed=1)
    return train_memory(stages["datastore"], stages["targets"], out, cfg, device="cpu", **kw)


@pytest.mark.parametrize("damage", ["truncate", "flip", "state"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(stages, tmp_path, caplog, damage):
    clean = _train(stages, tmp_path / "clean")

    class Stop(Exception):
        pass

    def stop(step, rec, memory):
        if step == 10:
            raise Stop

    with pytest.raises(Stop):
        _train(stages, tmp_path / "t", on_step=stop)
    newest = sorted((tmp_path / "t" / "checkpoints").iterdir())[-1]
    assert newest.name == "step-000009"
    if damage == "truncate":
        f = newest / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "flip":  # same size: only the hashes recorded in state.json can tell
        f = newest / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-20] ^= 0x40
        f.write_bytes(bytes(data))
    else:
        (newest / "state.json").write_text("{half")
    caplog.set_level("INFO", logger="mlpmem.train")
    _train(stages, tmp_path / "t")
    assert "step-000009 is damaged" in caplog.text and "resuming memory training from" in caplog.text and "step-000006" in caplog.text
    assert (tmp_path / "t" / "memory" / "model.safetensors").read_bytes() == (clean / "memory" / "model.safetensors").read_bytes()
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    files = {r["file"]: r for r in m["files"]}
    assert {"memory/model.safetensors", "memory/memory_config.json"} <= set(files)
    assert all(r["sha256"] and r["sample_sha256"] and r["bytes"] > 0 for r in files.values())


# ---------------------------------------------------------------- 8: resources


def test_disk_space_messages_name_real_sizes_and_flags(stages, tmp_path, capsys, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    rc, err = run(
        capsys,
        "datastore",
        "--corpus",
        stages["corpus"],
        "--out",
        tmp_path / "ds",
        "--model",
        stages["model"],
        "--context",
        "32",
        "--stride",
        "16",
    )
    assert rc == 2 and "not enough disk space for the datastore" in err and "KiB" in err and "10.0 MiB free" in err
    assert "0.00 GiB" not in err and "--train-tokens" in err and "--max-train-tokens" not in err
    with pytest.raises(MlpmemError, match="memory checkpoints.*keep_last"):
        _train(stages, tmp_path / "t")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "t").exists()  # refused before anything was written
    monkeypatch.setattr(shutil, "disk_usage", real)


def test_a_stage_stopped_before_any_output_takes_corrected_settings(tmp_path):
    out = tmp_path / "s"
    assert prepare_out(out, {"lr": 10.0}, kind="memory") == "fresh"
    release_lock(out)  # as if the process stopped (a failed check) before writing any output
    assert prepare_out(out, {"lr": 0.001}, kind="memory") == "fresh"  # the fix needs no --overwrite
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(MlpmemError, match="different configuration"):
        prepare_out(out, {"lr": 0.1}, kind="memory")  # once outputs exist, a different config is refused


def test_full_disk_mid_write_leaves_nothing_half_written(stages, tmp_path, capsys, monkeypatch):
    real, calls = np.save, []

    def full(f, arr, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, arr, **kw)

    argv = [
        "datastore",
        "--corpus",
        stages["corpus"],
        "--out",
        tmp_path / "ds",
        "--model",
        stages["model"],
        "--context",
        "32",
        "--stride",
        "16",
        "--windows-per-shard",
        "16",
    ]
    monkeypatch.setattr(np, "save", full)
    rc, err = run(capsys, *argv)
    assert rc == 2 and "the disk is full" in err and "run the same command again" in err
    assert not list((tmp_path / "ds").glob("*.partial")) and not (tmp_path / "ds" / LOCK).exists()
    monkeypatch.setattr(np, "save", real)
    assert run(capsys, *argv)[0] == 0


def test_read_only_out_is_one_paragraph(stages, capsys):
    rc, err = run(capsys, *corpus_argv(stages, "/sys/mlpmem-test"))
    assert rc == 2 and "cannot create /sys/mlpmem-test" in err and "choose an --out" in err


def test_a_stage_folder_is_locked_while_written(tmp_path, caplog):
    out = tmp_path / "s"
    prepare_out(out, {"a": 1}, kind="corpus")
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    release_lock(out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "then"}))
        with pytest.raises(MlpmemError, match=f"another mlpmem process \\(pid {sleeper.pid}"):
            prepare_out(out, {"a": 1}, kind="corpus")
    finally:
        sleeper.kill()
        sleeper.wait()
    # its process is gone: the lock is stale and taken over, with a log line
    assert prepare_out(out, {"a": 1}, kind="corpus") == "resume"
    assert "taking over the lock" in caplog.text
    release_lock(out)
    assert not (out / LOCK).exists()
    acquire_lock(out)  # re-entrant within one process
    acquire_lock(out)
    release_lock(out)


def test_cli_turns_os_errors_into_one_paragraph_and_keeps_bugs_loud(tmp_path, capsys, monkeypatch):
    import mlpmem.cli as cli

    def raiser(exc):
        def fn(a):
            raise exc

        return fn

    argv = ["corpus", "--source", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")]
    for exc, rc, text in [
        (OSError(errno.ENOSPC, "No space left", str(tmp_path / "o" / "f")), 2, "the disk is full"),
        (PermissionError(errno.EACCES, "denied", str(tmp_path / "o")), 2, "permission denied"),
        (FileNotFoundError(errno.ENOENT, "missing", str(tmp_path / "x.jsonl")), 2, "x.jsonl does not exist"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ]:
        monkeypatch.setitem(cli.VERBS, "corpus", (raiser(exc), *cli.VERBS["corpus"][1:]))
        assert main(argv) == rc and text in capsys.readouterr().err
    monkeypatch.setitem(
        cli.VERBS, "corpus", (raiser(FileNotFoundError(errno.ENOENT, "gone", "/usr/lib/not-a-user-path")), *cli.VERBS["corpus"][1:])
    )
    with pytest.raises(FileNotFoundError):  # not a path the user gave: a bug, with its traceback
        main(argv)
    monkeypatch.setitem(cli.VERBS, "corpus", (raiser(ZeroDivisionError()), *cli.VERBS["corpus"][1:]))
    with pytest.raises(ZeroDivisionError):
        main(argv)


def test_shipped_recipes_pass_the_checks():
    from pathlib import Path

    from mlpmem.pipeline import RECIPES, load_recipe

    files = sorted(RECIPES.glob("*.yaml")) + sorted((Path(__file__).parent.parent / "bench" / "recipes").glob("*.yaml"))
    assert files
    for f in files:
        load_recipe(f, out="x", check_paths=False)  # data files of bench recipes may not be built here


def test_lambda_has_one_name_and_the_old_one_still_works(tmp_path, capsys):
    """`lambda` in recipes, `--lambda` on the command line, `lambda_` in Python; the old `lam` / `--lam` are accepted with
    a deprecation warning for one release, and both at once is refused."""
    import warnings

    from mlpmem.typed_config import add_arguments, from_args
    from mlpmem.evaluate import KnnConfig
    from mlpmem.generation import GenerateConfig
    from mlpmem.pipeline import load_recipe

    recipe = {"out": str(tmp_path / "o"), "corpus": {"source": "x"}}
    assert load_recipe({**recipe, "knn": {"lambda": 0.3}}, check_paths=False).sections["knn"].lambda_ == 0.3
    with pytest.warns(DeprecationWarning, match="knn.lam is deprecated"):
        assert load_recipe({**recipe, "knn": {"lam": 0.3}}, check_paths=False).sections["knn"].lambda_ == 0.3
    with pytest.raises(MlpmemError, match="both lam"):
        load_recipe({**recipe, "knn": {"lam": 0.3, "lambda": 0.2}}, check_paths=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser, GenerateConfig)
    assert from_args(GenerateConfig, parser.parse_args(["--lambda", "0.4"])).lambda_ == 0.4
    with pytest.warns(DeprecationWarning, match="--lam is deprecated"):
        assert from_args(GenerateConfig, parser.parse_args(["--lam", "0.4"])).lambda_ == 0.4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling says nothing
        from_args(KnnConfig, _knn_parser().parse_args(["--lambda", "0.1"]))


def _knn_parser():
    from mlpmem.typed_config import add_arguments
    from mlpmem.evaluate import KnnConfig

    p = argparse.ArgumentParser()
    add_arguments(p, KnnConfig)
    return p
