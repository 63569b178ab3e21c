"""bench/reproduce.py --quick: every benchmark script end to end on the tiny test models, each result with its provenance.

The smoke run is a subprocess (the scripts are programs, not library code); its world is tmp_path. Two tests share the
plan between them: every step but SLOW_STEPS (under 3 minutes on the 2 shared cores), and, marked slow, SLOW_STEPS with
what they need (about 3 more). The whole smoke run in one command: ``python bench/reproduce.py --quick`` (6 minutes here).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import provenance  # noqa: E402
import reproduce  # noqa: E402

# the slowest quick steps, each for a reason of its own: bench_pipeline.py and bench_dist.py start a fresh
# interpreter per stage (per-stage peak memory; torchrun), about 90 s and 140 s here; bench_knowledge.py runs
# some forty lm-eval evaluations (80 s); run:sotu1m is `mlpmem run` + summarize_run.py, as the runs kept in the suite
SLOW_STEPS = ("pipeline", "dist", "knowledge", "run:sotu1m")


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def smoke(world: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    argv = [sys.executable, str(ROOT / "bench" / "reproduce.py"), "--quick", "--out", str(world), *args]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
    summary = world / "reproduce.json"
    assert summary.exists(), r.stdout + r.stderr
    return r, json.loads(summary.read_text())


def check_steps(world: Path, r: subprocess.CompletedProcess, summary: dict, names: list[str]) -> None:
    failed = {n: s for n, s in summary["steps"].items() if s["status"] != "done"}
    logs = "\n".join(f"--- {n}: {s}\n" + Path(s["log"]).read_text()[-3000:] for n, s in failed.items() if "log" in s)
    assert not failed and r.returncode == 0, f"{failed}\n{r.stdout}\n{logs}"
    assert set(summary["steps"]) == set(names)
    head, _ = provenance.commit()
    for name in names:
        for out in reproduce.STEPS[name].output_names(quick=True):
            data = json.loads((world / "results" / f"{out}.json").read_text())
            p = data["provenance"]
            assert p["commit"] == head, (out, p["commit"])
            assert p["command"][0] == sys.executable and p["command"][1].endswith(".py"), p["command"]
            assert p["started"] <= p["finished"] and len(p["load_average"]["start"]) == 3 and p["machine"]["cores"]
            assert {"python", "torch", "transformers"} <= set(p["versions"])
            assert p["environment"]["MLPMEM_BENCH_RESULTS"] == str(world / "results")
    text = (world / "BENCHMARKS.md").read_text()
    assert "measured at commit " + head[:10] in text


def test_quick_reproduction(tmp_path):
    """Every step but SLOW_STEPS: each script reaches its JSON (with provenance), the docs render, bench/results untouched."""
    names = [s.name for s in reproduce.select(",".join(s.name for s in reproduce.PLAN if s.name not in SLOW_STEPS))]
    assert {s.name for s in reproduce.PLAN} == set(names) | set(SLOW_STEPS)
    assert not set(SLOW_STEPS) & set(names)  # nothing kept needs a slow step
    before = snapshot(ROOT / "bench" / "results")
    r, summary = smoke(tmp_path / "w", "--only", ",".join(names))
    check_steps(tmp_path / "w", r, summary, names)
    assert snapshot(ROOT / "bench" / "results") == before


@pytest.mark.slow
def test_quick_reproduction_of_the_slowest_steps(tmp_path):
    names = [s.name for s in reproduce.select(",".join(SLOW_STEPS))]
    r, summary = smoke(tmp_path / "w", "--only", ",".join(names))
    check_steps(tmp_path / "w", r, summary, names)


# ---------------------------------------------------------------- the plan and the provenance, without running anything


def test_only_takes_what_a_step_needs_in_plan_order():
    names = [s.name for s in reproduce.select("multi_memory")]
    assert names == ["data:gcide", "run:sotu", "quality", "run:gcide20k", "mixing", "mixing_router", "multi_memory", "docs"]
    assert [s.name for s in reproduce.select("5")] == ["data:gcide", "quality", "decoder", "docs"]  # a section
    with pytest.raises(SystemExit):
        reproduce.select("no-such-step")


def test_every_step_needs_only_earlier_steps():
    seen: set[str] = set()
    for s in reproduce.PLAN:
        assert set(s.needs) <= seen, s.name
        seen.add(s.name)


def test_write_result_records_provenance_and_keeps_earlier_ones(tmp_path):
    first = provenance.start()
    path = provenance.write_result(tmp_path / "r.json", {"x": 1}, first)
    a = json.loads(path.read_text())
    assert a["x"] == 1 and a["provenance"]["started"] == first["started"] and "provenance_earlier" not in a
    a["provenance"]["started"] = "earlier"  # as if measured by another call, then extended by this one
    b = json.loads(provenance.write_result(path, {**a, "y": 2}, first).read_text())
    assert b["provenance_earlier"] == [a["provenance"]] and b["provenance"]["started"] == first["started"]
    assert provenance.measured(b).startswith("measured at commit ") and provenance.measured({"x": 1}).endswith("was recorded")


def test_a_step_is_fresh_only_when_measured_at_this_commit_without_changes(tmp_path):
    step = reproduce.STEPS["extract"]
    head = "a" * 40

    def write(**prov):
        (tmp_path / "extract.json").write_text(json.dumps({"provenance": prov}))

    assert not reproduce.fresh(step, tmp_path, False, head)  # no result yet
    write(commit=head, dirty=False)
    assert reproduce.fresh(step, tmp_path, False, head)
    assert not reproduce.fresh(step, tmp_path, False, None)  # this tree has uncommitted changes
    assert not reproduce.fresh(step, tmp_path, True, head)  # --quick reads extract_quick.json
    write(commit=head, dirty=True)
    assert not reproduce.fresh(step, tmp_path, False, head)
    write(commit="b" * 40, dirty=False)
    assert not reproduce.fresh(step, tmp_path, False, head)
    (tmp_path / "extract.json").write_text(json.dumps({"old": "no provenance"}))
    assert not reproduce.fresh(step, tmp_path, False, head)


def test_budget_starts_no_step_past_it_and_the_docs_still_render(tmp_path):
    r, summary = smoke(tmp_path / "w", "--only", "generate", "--budget", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary["steps"]["generate"]["status"] == "over budget" and summary["steps"]["docs"]["status"] == "done"
    assert not (tmp_path / "w" / "results" / "generate_quick.json").exists()


def test_gate_selection_rule_asks_for_both_goals_before_falling_back():
    """bench_gate_select.choose: the most in-domain gain among gates meeting both goals; else the least out-of-domain
    cost among those keeping 90%; else none."""
    from bench_gate_select import choose

    def c(share, ood):
        return {"share_of_fixed_gain_held_out_valid": share, "worst_out_of_domain": ood}

    both = {"a": c(1.2, 0.0019), "b": c(1.4, 0.0015), "c": c(1.6, 0.003), "d": c(0.8, -0.001)}
    assert choose(both) == "b"  # c keeps more but costs over +0.2%; d costs least but keeps under 90%
    assert choose({"c": c(1.6, 0.003), "e": c(0.95, 0.0025), "d": c(0.8, -0.001)}) == "e"
    assert choose({"d": c(0.8, -0.001)}) is None
