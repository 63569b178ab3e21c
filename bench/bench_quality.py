"""Quality on both corpora: test perplexity of LM, + kNN-LM, + MLP memory, + both (not a test).

    python bench/bench_quality.py [--quick]

Runs the library's whole experiment (``run_pipeline``, the same as ``mlpmem run``)
on bench/recipes/sotu200k.yaml and bench/recipes/gcide100k.yaml (making the
GCIDE corpus first with bench/gcide.py when it is missing), then collects each
run with bench/summarize_run.py into bench/results/<run>.json plus its lambda
curves. Finished stages are reused, so a rerun only redoes what changed.
``--quick``: 5k training tokens, 2k valid / test, one epoch, into runs/*_quick and
bench/results/*_quick.json (a smoke check of minutes, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from provenance import start  # noqa: E402
from summarize_run import collect  # noqa: E402

from mlpmem.pipeline import load_recipe, run_pipeline  # noqa: E402

RECIPES = [HERE / "recipes" / "sotu200k.yaml", HERE / "recipes" / "gcide100k.yaml"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    for path in RECIPES:
        started = start()
        recipe = yaml.safe_load(path.read_text())
        if "gcide" in path.name and not Path(recipe["corpus"]["source"]).exists():
            subprocess.run([sys.executable, str(HERE / "gcide.py"), "--out", recipe["corpus"]["source"]], check=True)
        if args.quick:
            recipe["out"] += "_quick"
            recipe["corpus"].update(train_tokens=5000, valid_tokens=2000, test_tokens=2000)
            recipe["train"].update(epochs=1.0, eval_every=5)
        run_pipeline(load_recipe(recipe))
        run = Path(recipe["out"])
        print(f"{run.name}: {json.dumps(collect(run, started=started)['ppl'])}")


if __name__ == "__main__":
    main()
