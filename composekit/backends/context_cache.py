"""A backend wrapper that remembers the contexts of recently encoded objects.

Pasting the same object into many backgrounds (a product into every scene) encodes it once:
[`ContextCache`][composekit.backends.context_cache.ContextCache] wraps any backend and answers
``encode_object`` for the rows it has seen from memory; every other call goes straight to the backend.
The compositor wraps its backend in one, so the sampler never calls back into the compositor.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["ContextCache"]


class ContextCache:
    """``backend`` with ``encode_object`` answered from an LRU cache of ``size`` objects.

    Only single-object encodes are stored, so a cached context is bit for bit what encoding that object
    alone gives, whatever batches ran before. Entries are read-only backend arrays; the lock only guards
    the cache's bookkeeping, so concurrent calls still encode in parallel. Everything but
    ``encode_object`` is the wrapped backend's own (attribute reads pass through).
    """

    def __init__(self, backend: Any, size: int = 8) -> None:
        self.inner = backend
        self.size = size
        self._cache: OrderedDict[bytes, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # only called for what this wrapper does not have itself
        if name == "inner" or name.startswith("__"):  # not set yet (copy, pickle): no delegation
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"ContextCache({self.inner!r}, size={self.size})"

    def encode_object(self, pixels: np.ndarray) -> tuple[Any, Any]:
        """The (cond, uncond) contexts of the objects ``pixels`` ``(N, 3, C, C)``, one row each: cached rows
        from the cache, the others encoded together in one call (a row repeated in the batch is encoded once)."""
        keys = [hashlib.sha256(np.ascontiguousarray(row).tobytes()).digest() for row in pixels]
        rows: dict[bytes, tuple[Any, Any]] = {}
        with self._lock:
            for key in keys:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    rows[key] = hit
        missing = list(dict.fromkeys(k for k in keys if k not in rows))
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}  # equal keys, equal pixels
            cond, uncond = self.inner.encode_object(np.concatenate([pixels[first[k]:first[k] + 1] for k in missing]))
            fresh = {k: (cond, uncond) if len(missing) == 1 else (cond[j:j + 1], uncond[j:j + 1])
                     for j, k in enumerate(missing)}
            rows.update(fresh)
            if len(missing) == 1:
                with self._lock:
                    self._cache.update(fresh)
                    while len(self._cache) > self.size:
                        self._cache.popitem(last=False)
        if len(keys) == 1:
            return rows[keys[0]]
        return (self.inner.cat([rows[k][0] for k in keys], 0), self.inner.cat([rows[k][1] for k in keys], 0))
