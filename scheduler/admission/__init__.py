"""Admission: whether a request may go now, under every rate limit it is subject to.

One model decides (:mod:`.model`: rates, costs, header sync, calibration, reservations, 429s), written once;
stores only keep the state and apply its transitions atomically (:mod:`.buckets`; :class:`MemoryStore` in this
process, :class:`RedisStore` shared by every process). :class:`Limiter` is the pool's seam: a model per limit
scope (endpoint and model), all on one store.
"""

from .buckets import BucketParams as BucketParams
from .buckets import BucketState as BucketState
from .limiter import Limiter as Limiter
from .limiter import ScopeLimiter as ScopeLimiter
from .model import ScopeModel as ScopeModel
from .stores import BucketStore as BucketStore
from .stores import Mark as Mark
from .stores import MemoryStore as MemoryStore

__all__ = ["BucketParams", "BucketState", "BucketStore", "Limiter", "Mark", "MemoryStore", "ScopeLimiter",
           "ScopeModel"]
