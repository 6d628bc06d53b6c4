"""File access for the files the job writes itself (shards, vocabularies, manifest), local or remote.

Python-side reads and writes go through `seqrec.data.storage`, the one URL -> file system mapping
that the trainer reads with too, so executors write shards directly: local paths, `hdfs://`
(libhdfs), `s3://`, `s3a://` and `s3n://` (pyarrow's S3; credentials, endpoint and region from the
usual AWS environment), `gs://`. The job's own options are fixed here (zstd, so the same data gives
the same bytes). Folder operations of the commit (rename, delete) go through Hadoop's FileSystem in
the JVM (`OutputDir`), the same one Spark uses for reading and for the quarantine table.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from seqrec.data import storage

COMPRESSION = "zstd"
exists = storage.exists
read_table = storage.read_table
sha256 = storage.sha256
write_bytes = storage.write_bytes


def absolute(path: str) -> str:
    """Local paths become absolute (executors may run elsewhere in the process tree); URIs stay."""
    return path if "://" in path else str(Path(path).resolve())


def write_table(table: pa.Table, uri: str) -> None:
    storage.write_table(table, uri, compression=COMPRESSION)


def parquet_writer(uri: str, schema: pa.Schema) -> pq.ParquetWriter:
    """A ParquetWriter with the job's fixed options (same data -> same bytes)."""
    return storage.parquet_writer(uri, schema, compression=COMPRESSION)


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
