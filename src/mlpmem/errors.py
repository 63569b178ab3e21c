"""User-facing errors: the CLI prints these as one paragraph, without a traceback.

The class is defined once, in :mod:`mlpmem.modeling.errors` (an exported model carries it without mlpmem).
"""

from __future__ import annotations

from mlpmem.modeling.errors import MlpmemError

__all__ = ["MlpmemError"]
