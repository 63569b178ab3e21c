"""Runs killed with SIGKILL resume and end byte-identical to clean runs (datastore; training, even after a damaged newest checkpoint)."""

import os
import signal
import subprocess
import sys
import time

from mlpmem.corpus import CorpusConfig, build_corpus


def _cmd(corpus, out, model):
    return [
        sys.executable,
        "-m",
        "mlpmem.cli",
        "datastore",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--model",
        str(model),
        "--context",
        "32",
        "--stride",
        "16",
        "--batch-size",
        "1",
        "--windows-per-shard",
        "2",
    ]


def test_sigkill_then_resume_is_byte_identical(tmp_path, tiny_llama, tiny_corpus_file):
    corpus = build_corpus(tmp_path / "c", CorpusConfig(source=str(tiny_corpus_file), model=str(tiny_llama)))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run(_cmd(corpus, tmp_path / "clean", tiny_llama), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(corpus, out, tiny_llama), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("progress-*.json"))) >= 3:  # one record per finished shard
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()
    subprocess.run(_cmd(corpus, out, tiny_llama), check=True, env=env, capture_output=True)
    clean = sorted(p.name for p in (tmp_path / "clean").glob("*.npy"))
    assert clean == sorted(p.name for p in out.glob("*.npy"))
    for name in clean:
        assert (tmp_path / "clean" / name).read_bytes() == (out / name).read_bytes(), name
    assert not list(out.glob("*.partial"))


def test_sigkill_train_then_damaged_newest_checkpoint_resumes_byte_identical(tmp_path, tiny_llama, tiny_corpus_file):
    """Training killed with SIGKILL after some checkpoints, its newest checkpoint then truncated (as a
    crash mid-copy or a full disk would leave it): the resume falls back to the previous checkpoint and
    the final memory is byte-identical to an uninterrupted run's."""
    from mlpmem.datastore import DatastoreConfig, build_datastore
    from mlpmem.index import IndexConfig, build_index
    from mlpmem.targets import TargetsConfig, build_targets

    corpus = build_corpus(tmp_path / "c", CorpusConfig(source=str(tiny_corpus_file), model=str(tiny_llama)))
    ds = build_datastore(corpus, tmp_path / "ds", DatastoreConfig(model=str(tiny_llama), context=32, stride=16))
    ix = build_index(ds, tmp_path / "ix", IndexConfig(kind="flat"))
    tg = build_targets(ds, ix, tmp_path / "tg", TargetsConfig(k=8, top_m=4))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

    def cmd(out):
        return [
            sys.executable,
            "-m",
            "mlpmem.cli",
            "train",
            "--datastore",
            str(ds),
            "--targets",
            str(tg),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--n-blocks",
            "1",
            "--ckpt-every",
            "2",
            "--eval-every",
            "0",
            "--keep-last",
            "2",
            "--init",
            "plain",
        ]

    subprocess.run(cmd(tmp_path / "clean"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ck = out / "checkpoints"
        if ck.is_dir() and len([p for p in ck.iterdir() if not p.name.endswith(".partial")]) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    newest = sorted(p for p in (out / "checkpoints").iterdir() if not p.name.endswith(".partial"))[-1]
    previous = sorted(p for p in (out / "checkpoints").iterdir() if p.name < newest.name and not p.name.endswith(".partial"))[-1].name
    f = newest / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = subprocess.run(cmd(out), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{newest.name} is damaged" in r.stderr and f"resuming memory training from {out / 'checkpoints' / previous}" in r.stderr
    assert (out / "memory" / "model.safetensors").read_bytes() == (tmp_path / "clean" / "memory" / "model.safetensors").read_bytes()
    assert not (out / ".mlpmem.lock").exists() and not list((out / "checkpoints").glob("*.partial"))
