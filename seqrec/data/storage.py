"""Reading and writing files by path or URL, the one mapping from a URL to a file system (no torch).

Everything that touches shard folders goes through here: the manifest and shard checks
(`schema`), the trainer's reader (`loader`), `seqrec export`/`recommend`, and the Spark job's
Python-side writes (`spark_jobs.storage`). Accepted:

    data/shards, /abs/path, file:///abs/path   the local file system
    s3://bucket/key, s3a://..., s3n://...       pyarrow's S3FileSystem (s3a/s3n are Hadoop's names)
    gs://bucket/key (gcs://)                    pyarrow's GcsFileSystem
    hdfs://namenode:port/path (and any other scheme pyarrow knows)   pyarrow's FileSystem.from_uri

S3 settings come from the environment as the AWS SDKs read them: credentials from the usual chain
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profile, pod role), the endpoint from
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (MinIO, Ceph, any S3 API; pyarrow 14 does not read them
itself), the region from `AWS_REGION` or `AWS_DEFAULT_REGION` (else the bucket's own region is looked
up on AWS, and "us-east-1" is used with a custom endpoint). Connect and request timeouts and a retry
limit are always set, so an unreachable store fails within about `CONNECT_TIMEOUT_S x MAX_ATTEMPTS`
seconds (a store that accepts connections but never answers within `REQUEST_TIMEOUT_S x
MAX_ATTEMPTS`) instead of retrying for minutes.

Errors: a missing file raises `SchemaError` with the full URL; any other I/O failure (unreachable
endpoint, refused credentials) raises `StorageError` (a SchemaError) with the URL, the endpoint and
pyarrow's message, so the CLI prints one line and exits 2.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from seqrec.data.errors import SchemaError, StorageError

S3_SCHEMES = ("s3", "s3a", "s3n")
GCS_SCHEMES = ("gs", "gcs")
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
CONNECT_TIMEOUT_S = 5.0
"""Seconds to open a connection to the object store."""
REQUEST_TIMEOUT_S = 15.0
"""Seconds an established request may stall (no bytes) before it is abandoned."""
MAX_ATTEMPTS = 3
"""Tries per request, the first included (AWS standard retry strategy)."""
GCS_RETRY_TIME_LIMIT_S = 30.0
"""Seconds GCS keeps retrying one request."""
COPY_CHUNK_BYTES = 1 << 20


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def is_remote(path: str | Path) -> bool:
    """True for anything but a local path or a file:// URL."""
    return is_url(path) and not str(path).startswith("file://")


def join(root: str | Path, relative: str) -> str:
    """Join a folder and a relative path; works for local paths and URLs (s3a://...)."""
    root = str(root)
    return root.rstrip("/") + "/" + relative if is_url(root) else str(Path(root) / relative)


def _env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (None: AWS itself)."""
    return _env(ENDPOINT_ENV)


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    return pafs.resolve_s3_region(bucket)


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str, timeouts: tuple[float, float, int]) -> pafs.S3FileSystem:
    connect_s, request_s, attempts = timeouts
    return pafs.S3FileSystem(
        region=region,
        endpoint_override=endpoint,
        connect_timeout=connect_s,
        request_timeout=request_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
    )


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    # Settings are read at every call (they are cheap) so a changed environment takes effect; equal
    # settings share one filesystem object.
    endpoint = s3_endpoint()
    region = _env(REGION_ENV) or ("us-east-1" if endpoint else _bucket_region(bucket))
    return _s3(endpoint, region, (CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, MAX_ATTEMPTS))


@functools.lru_cache(maxsize=4)
def _gcs(retry_s: float) -> pafs.GcsFileSystem:
    return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=retry_s))


@functools.lru_cache(maxsize=16)
def _from_uri(authority: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(authority)[0]


@functools.lru_cache(maxsize=1)
def _local() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


def resolve(url: str | Path) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or URL. Local paths become absolute."""
    url = str(url)
    if not is_url(url):
        return _local(), str(Path(url).resolve())
    scheme, rest = url.split("://", 1)
    with _access(url):
        if scheme == "file":
            return _local(), "/" + rest.lstrip("/")
        if scheme in S3_SCHEMES:
            return _s3_filesystem(rest.split("/", 1)[0]), rest.rstrip("/")
        if scheme in GCS_SCHEMES:
            return _gcs(GCS_RETRY_TIME_LIMIT_S), rest.rstrip("/")
        authority, _, path = rest.partition("/")
        try:
            return _from_uri(f"{scheme}://{authority}/"), "/" + path.rstrip("/")
        except pa.ArrowInvalid as e:
            raise SchemaError(
                f"{url}: unsupported URL ({e}); use a local path, file://, s3://, s3a://, s3n://, gs:// or hdfs://"
            ) from None


def _describe(url: str, e: BaseException) -> str:
    scheme = url.split("://", 1)[0] if is_url(url) else ""
    where = f" (endpoint {s3_endpoint() or 'AWS default'})" if scheme in S3_SCHEMES else ""
    return f"{url}: storage access failed{where}: {e}"


@contextlib.contextmanager
def _access(url: str) -> Iterator[None]:
    """Turn pyarrow's I/O errors into SchemaError (missing file) or StorageError (anything else)."""
    try:
        yield
    except SchemaError:
        raise
    except FileNotFoundError:
        raise SchemaError(f"{url}: no such file") from None
    except OSError as e:
        raise StorageError(_describe(url, e)) from e


# ------------------------------------------------------------------------------------------ queries
def file_type(url: str | Path) -> pafs.FileType:
    fs, path = resolve(url)
    with _access(str(url)):
        return fs.get_file_info(path).type


def exists(url: str | Path) -> bool:
    return file_type(url) != pafs.FileType.NotFound


def is_file(url: str | Path) -> bool:
    return file_type(url) == pafs.FileType.File


def is_dir(url: str | Path) -> bool:
    """A folder; on object stores: a prefix with at least one object under it."""
    return file_type(url) == pafs.FileType.Directory


def list_files(url: str | Path, suffix: str = "") -> list[str]:
    """Files directly inside a folder whose names end with `suffix`, sorted, as paths/URLs like `url`."""
    fs, path = resolve(url)
    with _access(str(url)):
        infos = fs.get_file_info(pafs.FileSelector(path))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(url, n) for n in names]


# ------------------------------------------------------------------------------------------ reading
def open_input_file(url: str | Path) -> pa.NativeFile:
    """A seekable file (what Parquet readers need)."""
    fs, path = resolve(url)
    with _access(str(url)):
        return fs.open_input_file(path)


def read_bytes(url: str | Path) -> bytes:
    with open_input_file(url) as f, _access(str(url)):
        return f.read()


def parquet_file(url: str | Path) -> pq.ParquetFile:
    """A ParquetFile; local paths are opened by name exactly as before (memory map settings etc.)."""
    if not is_url(url):
        with _access(str(url)):
            return pq.ParquetFile(url)
    return pq.ParquetFile(open_input_file(url))


def read_table(url: str | Path, **kwargs: Any) -> pa.Table:
    fs, path = resolve(url)
    with _access(str(url)):
        return pq.read_table(path, filesystem=fs, **kwargs)


def sha256(url: str | Path, chunk_bytes: int = COPY_CHUNK_BYTES) -> str:
    fs, path = resolve(url)
    h = hashlib.sha256()
    with _access(str(url)), fs.open_input_stream(path) as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ writing
def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    # Object stores have no folders (creating one would write a marker object).
    if isinstance(fs, pafs.S3FileSystem | pafs.GcsFileSystem):
        return
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)


def write_bytes(url: str | Path, data: bytes) -> None:
    fs, path = resolve(url)
    with _access(str(url)):
        _make_parent(fs, path)
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_table(table: pa.Table, url: str | Path, **kwargs: Any) -> None:
    fs, path = resolve(url)
    with _access(str(url)):
        _make_parent(fs, path)
        pq.write_table(table, path, filesystem=fs, **kwargs)


def parquet_writer(url: str | Path, schema: pa.Schema, **kwargs: Any) -> pq.ParquetWriter:
    fs, path = resolve(url)
    with _access(str(url)):
        _make_parent(fs, path)
        return pq.ParquetWriter(path, schema, filesystem=fs, **kwargs)


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy one file between any two places (local to local keeps metadata, as shutil.copy2)."""
    if not is_url(src) and not is_url(dst):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        with _access(str(src)):
            shutil.copy2(src, dst)
        return
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    with _access(str(src)), src_fs.open_input_stream(src_path) as fin:
        with _access(str(dst)):
            _make_parent(dst_fs, dst_path)
            with dst_fs.open_output_stream(dst_path) as fout:
                while chunk := fin.read(COPY_CHUNK_BYTES):
                    fout.write(chunk)


def copy_tree(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every file under folder `src` to the same relative path under `dst`; returns those paths.

    One file after another: pyarrow's threaded `copy_files` to S3 deadlocked here (its copy tasks and
    the uploads' background writes share one I/O thread pool).
    """
    if not is_url(src) and not is_url(dst):
        with _access(str(src)):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        return sorted(str(p.relative_to(src)) for p in Path(src).rglob("*") if p.is_file())
    fs, root = resolve(src)
    with _access(str(src)):
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    relative = sorted(i.path[len(root) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)
    for rel in relative:
        copy_file(join(src, rel), join(dst, rel))
    return relative


# ------------------------------------------------------------------------------------------ petastorm
def petastorm_source(paths: list[str]) -> tuple[list[str], Any]:
    """(dataset URLs, filesystem) to pass to petastorm's `make_batch_reader` for these Parquet files.

    Local files: file:// URLs and no filesystem, so petastorm reads them as it always did. Remote
    files (all on one file system): petastorm 0.13.1 on pyarrow 14 needs two detours. It hands a
    given filesystem to pyarrow's legacy ParquetDataset, which accepts only a legacy
    `pyarrow.filesystem.FileSystem` (a `pyarrow.fs` one selects the new dataset API, which rejects
    petastorm's `validate_schema`); and it takes the path out of an s3:// URL with fsspec, which needs
    s3fs installed just for that. So remote files go as `file:///<path>` URLs, from which petastorm
    takes the path as is, plus `LegacyArrowFileSystem`, which reads them through `resolve`'s file system.
    """
    if not any(is_remote(p) for p in paths):
        return [p if is_url(p) else Path(p).resolve().as_uri() for p in paths], None
    resolved = [resolve(p) for p in paths]
    filesystems = {id(fs) for fs, _ in resolved}
    if len(filesystems) != 1:
        raise SchemaError(f"{paths[0]}: shards of one split must be on one file system")
    fs = resolved[0][0]
    urls = {"/" + path.lstrip("/"): url for (_, path), url in zip(resolved, paths, strict=True)}
    return ["file://" + p for p in urls], LegacyArrowFileSystem(fs, urls, absolute=resolved[0][1].startswith("/"))


def _legacy_base() -> type:
    import pyarrow.filesystem as legacyfs  # deprecated module, imported only for petastorm

    return legacyfs.FileSystem


class LegacyArrowFileSystem(_legacy_base()):  # type: ignore[misc]
    """A `pyarrow.fs` file system behind the legacy interface that petastorm's ParquetDataset uses.

    Only what reading a list of files needs: isfile, isdir, exists, open (read-only). Paths arrive
    with a leading "/" (from file:// URLs); object store paths (bucket/key) get it stripped.

    Args:
        fs: the file system to read from.
        urls: path as petastorm will pass it -> the user's URL (for error messages).
        absolute: the file system's paths start with "/" (HDFS), else they do not (S3, GCS).
    """

    def __init__(self, fs: pafs.FileSystem, urls: dict[str, str], *, absolute: bool) -> None:
        self.fs, self.urls, self.absolute = fs, urls, absolute

    def _path(self, path: str) -> str:
        return str(path) if self.absolute else str(path).lstrip("/")

    def _url(self, path: str) -> str:
        return self.urls.get(str(path), str(path))

    def _type(self, path: str) -> pafs.FileType:
        with _access(self._url(path)):
            return self.fs.get_file_info(self._path(path)).type

    def isfile(self, path: str) -> bool:
        return self._type(path) == pafs.FileType.File

    def isdir(self, path: str) -> bool:
        return self._type(path) == pafs.FileType.Directory

    def exists(self, path: str) -> bool:
        return self._type(path) != pafs.FileType.NotFound

    def _isfilestore(self) -> bool:
        return False

    def open(self, path: str, mode: str = "rb") -> pa.NativeFile:
        assert mode == "rb", "read-only"
        with _access(self._url(path)):
            return self.fs.open_input_file(self._path(path))
