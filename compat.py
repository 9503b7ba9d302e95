"""
What differs between the transformers releases this project supports (5.17, the GPU image's, to the newest).

transformers renamed the KV-cache argument of every model's forward from `past_key_values` to `cache`; the old
name still works in the new releases but warns once per process (three times under --compile). Both algorithms
pass their cache under the name the model's own forward declares; bench.py reads it back by either name.
"""
from __future__ import annotations

import inspect


_CACHE_NAMES: dict = {}   # model class -> its forward's name for the cache (a plain dict: torch.compile traces it)


def _cache_name(cls) -> str:
    if cls not in _CACHE_NAMES:
        _CACHE_NAMES[cls] = "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
    return _CACHE_NAMES[cls]


def cache_arg(model, cache) -> dict:
    """`{name: cache}` for `model(**inputs, **cache_arg(model, cache))`, with the name `model.forward` takes
    (a DDP wrapper is looked through to the module it wraps)."""
    return {_cache_name(type(getattr(model, "module", model))): cache}


def output_cache(out):
    """The KV cache a forward returned: `out.cache`, or `out.past_key_values` before the rename."""
    return out.cache if "cache" in out else out.past_key_values
