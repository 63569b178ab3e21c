"""``mlpmem-lm-eval``: lm-eval's command line with mlpmem's backends registered (``mlpmem`` and ``mlpmem-rag``).

lm-eval 0.4 finds models only in its own registry, so this wrapper imports both backends (each
registers itself; bm25s is needed only when ``mlpmem-rag`` is used) and then runs lm-eval's own CLI.
It sits above both backends, so neither imports the other's entry point.
"""

from __future__ import annotations

import sys

from mlpmem.errors import MlpmemError


def main(argv: list[str] | None = None) -> None:
    """Arguments as for ``lm_eval``; bad input (a memory that is not there, bad model arguments, an empty index)
    is one paragraph on stderr and exit 2, without a traceback."""
    from lm_eval.__main__ import cli_evaluate

    import mlpmem.lm_eval_backend  # noqa: F401  registers `mlpmem`
    import mlpmem.rag  # noqa: F401  registers `mlpmem-rag`
    from mlpmem.lm_eval_backend import default_device

    args = list(sys.argv[1:] if argv is None else argv)
    if "--model" in args and not any(a == "--device" or a.startswith("--device=") for a in args):
        # every backend (also `--model hf` on an exported folder) gets a device that exists here
        args += ["--device", default_device()]
    sys.argv = [sys.argv[0], *args]
    try:
        cli_evaluate()
    except MlpmemError as e:
        print(f"mlpmem: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
