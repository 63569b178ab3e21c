"""A datastore run killed with SIGKILL resumes and ends byte-identical to a clean run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlpmem.corpus import CorpusConfig, build_corpus


def _cmd(corpus, out, model):
    return [sys.executable, "-m", "mlpmem.cli", "datastore", "--corpus", str(corpus), "--out", str(out), "--model", str(model),
            "--context", "32", "--stride", "16", "--batch-size", "1", "--windows-per-shard", "2"]


def test_sigkill_then_resume_is_byte_identical(tmp_path, tiny_llama, tiny_corpus_file):
    corpus = build_corpus(tmp_path / "c", CorpusConfig(source=str(tiny_corpus_file), model=str(tiny_llama)))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run(_cmd(corpus, tmp_path / "clean", tiny_llama), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(corpus, out, tiny_llama), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        progress = out / "progress.json"
        if progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 3:
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
