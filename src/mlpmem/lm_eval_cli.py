"""``mlpmem-lm-eval``: lm-eval's command line with mlpmem's backends registered (``mlpmem`` and ``mlpmem-rag``).

lm-eval 0.4 finds models only in its own registry, so this wrapper imports both backends (each
registers itself; bm25s is needed only when ``mlpmem-rag`` is used) and then runs lm-eval's own CLI.
It sits above both backends, so neither imports the other's entry point. A user error (a bad model
argument, a missing memory, an empty index) is one paragraph and exit status 2, as for ``mlpmem``.
"""

from __future__ import annotations

import sys

from mlpmem.errors import MlpmemError, exit_with_error


def main(argv: list[str] | None = None) -> None:
    """Arguments as for ``lm_eval``."""
    from lm_eval.__main__ import cli_evaluate

    import mlpmem.lm_eval_backend  # noqa: F401  registers `mlpmem`
    import mlpmem.rag  # noqa: F401  registers `mlpmem-rag`
    from mlpmem.lm_eval_backend import default_device

    args = list(sys.argv[1:] if argv is None else argv)
    if "--model" in args and not any(a == "--device" or a.startswith("--device=") for a in args):
        # every backend (also `--model hf` on an exported folder) gets a device that exists here, or the one model_args names
        args += ["--device", model_args_device(args) or default_device()]
    sys.argv = [sys.argv[0], *args]
    try:
        cli_evaluate()
    except MlpmemError as e:
        exit_with_error(e)


def model_args_device(args: list[str]) -> str | None:
    """The device ``--model_args`` names (``device=cpu``), or None."""
    for i, a in enumerate(args):
        value = args[i + 1] if a == "--model_args" and i + 1 < len(args) else a.partition("=")[2] if a.startswith("--model_args=") else None
        for part in (value or "").split(","):
            key, eq, device = part.partition("=")
            if eq and key.strip() == "device" and device.strip():
                return device.strip().strip("'\"")
    return None


if __name__ == "__main__":
    main()
