"""The REST datastore (He et al., "REST: Retrieval-Based Speculative Decoding", NAACL 2024), the
``rest`` drafter's retrieval source.

- ``store.py``: the on-disk format (token array + suffix array, memory-mapped), ``Datastore``
  (lookups), ``open_datastore`` (opened once per host), ``build_datastore_from_token_docs``.
- ``build.py``: corpus files (ShareGPT, OpenAI messages, text) -> token documents -> a datastore.
- ``cli.py``: ``specdecode datastore build | build-demo``.
"""

from specdecode.datastore.store import (
    BUILDER_VERSION,
    CACHE_SIZE,
    FORMAT,
    SORT_DEPTH,
    Datastore,
    build_datastore_from_token_docs,
    build_suffix_array,
    open_datastore,
    token_dtype,
)

__all__ = ["BUILDER_VERSION", "CACHE_SIZE", "FORMAT", "SORT_DEPTH", "Datastore",
           "build_datastore_from_token_docs", "build_suffix_array", "open_datastore", "token_dtype"]
