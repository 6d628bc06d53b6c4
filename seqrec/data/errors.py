"""The data errors every command reports as one line with exit code 2 (no torch, no pyarrow import).

They live here, below both `schema` and `storage`, so that the storage layer can raise them and the
shard contract can use the storage layer without an import cycle.
"""

from __future__ import annotations


class SchemaError(ValueError):
    """Shards or manifest do not match the contract, or a file is missing; the message names the file."""


class StorageError(SchemaError):
    """A file system or object store could not be reached or refused a request; names the URL."""
