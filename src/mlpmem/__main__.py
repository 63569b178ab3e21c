"""`python -m mlpmem VERB ...`: the same command as `mlpmem`, for launchers that run a module
(`torchrun ... -m mlpmem`, `accelerate launch -m mlpmem`)."""

import sys

from mlpmem.cli import main

if __name__ == "__main__":
    sys.exit(main())
