"""Renamed: ``mlpmem.config`` is now :mod:`mlpmem.typed_config` (the toolkit for typed configs: reading, checking, command-line flags). This name is kept for one release."""

from mlpmem.typed_config import *  # noqa: F403
from mlpmem.typed_config import deprecation

deprecation("mlpmem.config is now mlpmem.typed_config; import from there")
