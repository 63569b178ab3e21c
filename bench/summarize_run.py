"""Collect a finished `mlpmem run` folder's measurements into one JSON (not a test).

    python bench/summarize_run.py runs/sotu200k [--out bench/results/sotu200k.json]

Reads only manifests and report.json: bytes per corpus token of each artefact (as written,
and what is still on disk),
extraction tokens/s, index recall, kNN target queries/s, training tokens/s and
peak memory, and the report's perplexities and tokens/s ratios. A run made in pieces
(every stage resumes) has no one wall time per stage; ``stage_seconds`` gives each
stage's time from its own records instead (rows over the recorded rate, the index's
build time), beside the report's ``seconds_this_run`` of the last piece.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
from pathlib import Path

from provenance import results_dir, start, write_result


def _bytes(manifest: dict, name: str, folder: Path | None = None) -> int:
    """Bytes of one array's files as written; with ``folder``, only the files still there (index.keep_keys: false removes the keys)."""
    return sum(
        s["arrays"][name]["bytes"]
        for s in manifest["shards"]
        if name in s["arrays"] and (folder is None or (folder / s["arrays"][name]["file"]).exists())
    )


def summarize(run: Path) -> dict:
    load = lambda p: json.loads((run / p).read_text())  # noqa: E731
    ds, tg, ix = load("datastore/manifest.json"), load("targets/manifest.json"), load("index/manifest.json")
    report = load("report.json")
    n = ds["n_rows"]
    per_token = {
        "keys": _bytes(ds, "keys") / n,
        "values": _bytes(ds, "values") / n,
        "targets_ids": _bytes(tg, "ids") / n,
        "targets_probs": _bytes(tg, "probs") / n,
        "index": ix.get("index_file", {}).get("bytes", 0) / n,
    }
    per_token.update({name: _bytes(ds, name) / n for name in ds.get("features", {}) if name != "keys"})
    # what the run keeps for kNN-LM and the memory's training, per corpus token: the files still on disk
    kept = {name: _bytes(ds, name, run / "datastore") / n for name in sorted({a for sh in ds["shards"] for a in sh["arrays"]})}
    kept.update(targets_ids=per_token["targets_ids"], targets_probs=per_token["targets_probs"], index=per_token["index"])
    kept["total"] = sum(kept.values())
    train = load("train/manifest.json")
    tps = report["tokens_per_s"]
    valid, vtg = load("valid/manifest.json"), load("valid_targets/manifest.json")
    stage_seconds = {  # from each stage's own records, so that they hold for a run made in pieces
        "datastore (train)": n / ds["extract_tokens_per_s"],
        "datastore (valid, scored)": valid["n_rows"] / valid["extract_tokens_per_s"],
        "index": ix.get("build_seconds", 0) + ix.get("recall_seconds", 0),
        "kNN targets": n / tg["stats"]["queries_per_s"] + vtg["n_rows"] / vtg["stats"]["queries_per_s"],
        "memory training": train["positions_seen"] / train["tokens_per_s"],
    }  # the steps alone: its validation passes are not in the rate
    return {
        "run": str(run),
        "n_train_tokens": report["n_train_tokens"],
        "n_test_tokens": report["n_test_tokens"],
        "ppl": report["ppl"],
        # newer reports: each method's change against the LM alone with its 95% paired interval, and the gate's
        **({"vs_base": report["vs_base"]} if "vs_base" in report else {}),
        **({"gate": {k: report["gate"].get(k) for k in ("kind", "params", "mean_lambda", "vs_fixed")}} if "gate" in report else {}),
        "lambda": report["lambda"],
        "knn_temperature": report["knn_temperature"],
        "tokens_per_s": tps,
        "ratios": {
            "memory_over_base": tps["mlp_memory"] / tps["base"],
            "knn_over_base": tps["knn_lm"] / tps["base"],
            "memory_over_knn": tps["mlp_memory"] / tps["knn_lm"],
        },
        "params": {"memory": report["memory_params"], "base": report["base_params"]},
        "bytes_per_token": per_token,
        "kept_bytes_per_token": kept,
        "stage_seconds": stage_seconds,
        "extract_tokens_per_s": ds.get("extract_tokens_per_s"),
        "index": {k: ix.get(k) for k in ("factory", "nprobe", "rerank", "recall_at_k", "k")},
        "targets": tg["stats"],
        "train": {
            k: train.get(k) for k in ("tokens_per_s", "peak_rss_mb", "valid_start", "valid", "epochs", "precision", "parameters", "steps")
        },
        "memory_variant": memory_variant(run, report),
        # newer reports only: the model named honestly, wall time per stage, single-pass speed estimate
        **{k: report[k] for k in ("model", "model_id", "seconds_this_run", "speed_vs_lm") if k in report},
    }


def memory_variant(run: Path, report: dict) -> str:
    """The run's memory as bench_generate.py names its variants (which measure decoding speed): ``own`` or ``shared``
    head, blocks, ``rR`` a low-rank correction, ``vT`` a head pruned to T tokens, ``q8`` int8, ``g`` a gate."""
    cfg = json.loads((run / "train" / "memory" / "memory_config.json").read_text())["config"]
    name = ("shared" if cfg.get("freeze_head") else "own") + str(cfg["n_blocks"])
    name += f"r{cfg['head_rank']}" if cfg.get("head_rank") else ""
    name += f"v{cfg['head_tokens']}" if cfg.get("head_tokens") else ""
    name += "q8" if report.get("memory_dtype") == "int8" else ""
    return name + ("g" if "gate" in report else "")


def collect(run: Path, dest: Path | None = None, started: dict | None = None) -> dict:
    """Write the run's summary JSON (and copy its lambda-curve plot) into bench/results, with its provenance."""
    out = summarize(run)
    # when each stage of the run finished (its manifest, written last): a summary's own provenance is the summary's
    out["run_stages_finished"] = {
        m.parent.name: dt.datetime.fromtimestamp(m.stat().st_mtime).astimezone().isoformat(timespec="seconds")
        for m in sorted(run.glob("*/manifest.json"), key=lambda m: m.stat().st_mtime)
    }
    dest = dest or results_dir() / f"{run.name}.json"
    write_result(dest, out, started)
    if (run / "lambda_curves.png").exists():  # kNN-LM and memory against lambda, one plot (BENCHMARKS.md shows it)
        shutil.copyfile(run / "lambda_curves.png", dest.with_name(dest.stem + "_lambda_curves.png"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    print(json.dumps(collect(a.run, a.out, start()), indent=2))


if __name__ == "__main__":
    main()
