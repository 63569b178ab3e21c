"""Renamed: ``mlpmem.hf`` is now :mod:`mlpmem.transformers_integration` (the transformers door: the model class's constructors (from_memory, load_base), checks, export and the router fit). This name is kept for one release."""

from mlpmem.transformers_integration import *  # noqa: F403
from mlpmem.typed_config import deprecation

deprecation("mlpmem.hf is now mlpmem.transformers_integration; import from there")
