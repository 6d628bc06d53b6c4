"""File access for the files the job writes itself (shards, vocabularies, manifest), local or remote.

Python-side writes go through `pyarrow.fs` so executors can write shards directly: local paths,
`hdfs://` (libhdfs), `s3://` and `s3a://` (mapped to pyarrow's `s3://`; credentials from the usual
AWS environment), `gs://`. Folder operations of the commit (rename, delete) go through Hadoop's
FileSystem in the JVM (`OutputDir`), the same one Spark uses for reading and the quarantine table.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_ARROW_SCHEMES = {"s3a": "s3", "s3n": "s3"}


def absolute(path: str) -> str:
    """Local paths become absolute (executors may run elsewhere in the process tree); URIs stay."""
    return path if "://" in path else str(Path(path).resolve())


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + rest.lstrip("/")
    return pafs.FileSystem.from_uri(f"{_ARROW_SCHEMES.get(scheme, scheme)}://{rest}")


def _parent(fs: pafs.FileSystem, path: str) -> None:
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)


def write_table(table: pa.Table, uri: str) -> None:
    fs, path = _fs(uri)
    _parent(fs, path)
    pq.write_table(table, path, filesystem=fs, compression="zstd")


def read_table(uri: str) -> pa.Table:
    fs, path = _fs(uri)
    return pq.read_table(path, filesystem=fs)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = _fs(uri)
    _parent(fs, path)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def parquet_writer(uri: str, schema: pa.Schema) -> pq.ParquetWriter:
    """A ParquetWriter with the job's fixed options (same data -> same bytes)."""
    fs, path = _fs(uri)
    _parent(fs, path)
    return pq.ParquetWriter(path, schema, filesystem=fs, compression="zstd")


def sha256(uri: str, chunk_bytes: int = 1 << 20) -> str:
    fs, path = _fs(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Delete temp folders of earlier local runs that were killed (their process no longer exists)."""
    for tmp in parent.glob(f".{name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


class OutputDir:
    """The output folder and its temporary sibling; `commit` swaps the finished temp folder in.

    The temp folder `.<name>.tmp-<pid>-<id>` lives next to the output. A run that fails removes it;
    one that is killed leaves only that hidden folder (nothing at the output path changes), which
    the next local run removes. An existing output is moved aside only after the new folder is
    complete, then deleted.
    """

    def __init__(self, spark: object, output: str) -> None:
        self.output = absolute(output).rstrip("/")
        parent, name = self.output.rsplit("/", 1)
        run = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = f"{parent}/.{name}.tmp-{run}"
        self._old = f"{parent}/.{name}.old-{run}"
        if "://" not in self.output:
            _remove_stale_temps(Path(parent), name)
        jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
        self._path = jvm.org.apache.hadoop.fs.Path
        self._fs = self._path(self.output).getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())  # type: ignore[attr-defined]

    def _exists(self, path: str) -> bool:
        return bool(self._fs.exists(self._path(path)))

    def _rename(self, src: str, dst: str) -> None:
        if not self._fs.rename(self._path(src), self._path(dst)):
            raise OSError(f"could not rename {src} to {dst}")

    def commit(self) -> None:
        if self._exists(self.output):
            self._rename(self.output, self._old)
            self._rename(self.tmp, self.output)
            self._fs.delete(self._path(self._old), True)
        else:
            self._rename(self.tmp, self.output)

    def discard(self) -> None:
        """Remove the temp folder after a failure (best effort: a kill leaves it, hidden)."""
        if self._exists(self.tmp):
            self._fs.delete(self._path(self.tmp), True)
