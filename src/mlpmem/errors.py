"""User-facing errors: the CLI prints these as one paragraph, without a traceback.

The class is defined once, in :mod:`mlpmem.modeling.errors` (an exported model carries it without mlpmem); every
entry point reports one with :func:`report_error`.
"""

from __future__ import annotations

from typing import NoReturn


from mlpmem.modeling.errors import MlpmemError  # noqa: F401  (defined once, where an exported model carries it)

LAUNCH_WAIT_S = 2.0  # how long a rank other than 0 waits before it exits with a user error (see report_error)


def report_error(error: BaseException | str, status: int = 2, prefix: str = "mlpmem: error: ") -> int:
    """Print a user error as one paragraph on stderr (``mlpmem: error: PROBLEM. FIX.``) and return the
    exit status (2), for every entry point (mlpmem, mlpmem-lm-eval, python -m mlpmem.rag) to exit with.

    Under torchrun / accelerate launch every process meets the same error (the command line and the
    recipe are checked on each, and a refusal on rank 0 reaches all ranks through dist.on_main), so
    rank 0 alone prints it. The others wait a moment before they exit: the launcher stops every
    process as soon as one ends, and rank 0 must have printed by then.
    """
    import logging
    import sys
    import time

    rank = launch_rank()
    if rank == 0:
        print(f"{prefix}{error}", file=sys.stderr, flush=True)
    else:
        logging.getLogger("mlpmem").debug("rank %d: %s%s", rank, prefix, error)  # `-v` shows every rank's own
        if _env_int("WORLD_SIZE") > 1:
            time.sleep(LAUNCH_WAIT_S)
    return status


def exit_with_error(error: BaseException | str) -> NoReturn:
    """:func:`report_error`, then exit with its status (for entry points that end with ``sys.exit``)."""
    import sys

    sys.exit(report_error(error))


def launch_rank() -> int:
    """This process's rank under torchrun / accelerate launch (RANK), 0 without a launcher (or with a RANK that is no number)."""
    return _env_int("RANK")


def _env_int(name: str) -> int:
    import os

    try:
        return int(os.environ.get(name) or 0)
    except ValueError:
        return 0
