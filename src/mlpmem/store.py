"""Renamed: the datastore's read side (``Datastore``, ``ShardedArrays``, ``feature_name``) now lives beside its write
side in :mod:`mlpmem.datastore`. This name is kept for one release."""

from mlpmem.typed_config import deprecation
from mlpmem.datastore import Datastore, ShardedArrays, feature_name  # noqa: F401

deprecation("mlpmem.store is now mlpmem.datastore (the read side beside the write side); import from there")
