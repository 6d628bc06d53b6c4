"""Fetching the public MovieLens archives from the GroupLens download page (`seqrec fetch NAME`).

`fetch("movielens-100k", "data/raw")` downloads `ml-100k.zip`, checks it (size, the checksum GroupLens
publishes for the archive where there is one, zip CRCs, pinned SHA-256 and line counts of the
extracted files) and extracts the files the MovieLens adapters read into `data/raw/movielens-100k/`,
with the original file names (u.data, u.item, ...; ratings.csv, movies.csv, ...; ratings.dat,
movies.dat, ...). Everything happens in a hidden temporary folder that is renamed into place only once
verified, so an interrupted or failed fetch never leaves a folder that looks complete. A folder that
already verifies is kept and nothing is downloaded.

The data is under the GroupLens usage license (research use, no redistribution): see the README that
comes with each archive.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

DatasetName = Literal["movielens-100k", "movielens-latest-small", "movielens-1m"]
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens"
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download or verification failure; the message names the dataset, the URL or the file."""


@dataclass(frozen=True)
class Archive:
    """One downloadable archive and what a correct copy of it looks like."""

    url: str
    """Download URL (https://, or file:// for a local copy)."""
    folder: str
    """Top folder inside the zip ("ml-100k")."""
    files: tuple[str, ...]
    """Members of `folder` that are extracted (the names the adapters read)."""
    min_bytes: int
    """Smallest plausible archive size (catches error pages and truncated downloads)."""
    max_bytes: int
    """Largest plausible archive size (a wrong URL must not fill the disk)."""
    md5: str | None = None
    """MD5 of the archive as published by GroupLens (`<archive>.md5`), where there is one."""
    lines: dict[str, int] = field(default_factory=dict)
    """Exact line counts of extracted files (a readable check before the checksums)."""
    sha256: dict[str, str] = field(default_factory=dict)
    """Pinned SHA-256 of extracted files."""


DATASETS: dict[str, Archive] = {
    "movielens-100k": Archive(
        url=f"{GROUPLENS_URL}/ml-100k.zip",
        folder="ml-100k",
        files=("README", "u.data", "u.genre", "u.info", "u.item", "u.occupation", "u.user"),
        min_bytes=3_000_000,
        max_bytes=20_000_000,
        md5="0e33842e24a9c977be4e0107933c0723",
        lines={"u.data": 100_000, "u.item": 1_682, "u.user": 943},
        sha256={
            "README": "4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52",
            "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
            "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
            "u.info": "5b0a40b2e47a729ee6203063f6dcf8790c2e63f5a18663e6ee318a72c5f3c27b",
            "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
            "u.occupation": "cd5fbec9afe345d993a62fc7817df1a4a9079c4feb267b3118763b8fd942137d",
            "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
        },
    ),
    "movielens-latest-small": Archive(
        url=f"{GROUPLENS_URL}/ml-latest-small.zip",
        folder="ml-latest-small",
        files=("README.txt", "links.csv", "movies.csv", "ratings.csv", "tags.csv"),
        min_bytes=500_000,
        max_bytes=10_000_000,
        lines={"ratings.csv": 100_837, "movies.csv": 9_743, "tags.csv": 3_684, "links.csv": 9_743},
        sha256={
            "README.txt": "63d22ac138e80fae37021797ed8e1b9424b5239dc576a137422adf783ae3f404",
            "links.csv": "97ad18e4e56a09363c65676b6cb3482ce3e2cea2372a24620c1599c843325f31",
            "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
            "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
            "tags.csv": "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d",
        },
    ),
    "movielens-1m": Archive(
        url=f"{GROUPLENS_URL}/ml-1m.zip",
        folder="ml-1m",
        files=("README", "movies.dat", "ratings.dat", "users.dat"),
        min_bytes=4_000_000,
        max_bytes=30_000_000,
        md5="c4d9eecfca2ab87c1945afe126590906",
        lines={"ratings.dat": 1_000_209, "movies.dat": 3_883, "users.dat": 6_040},
    ),
}


# --------------------------------------------------------------------------------------------------
# Download and verification
# --------------------------------------------------------------------------------------------------


def _download(name: str, url: str, spec: Archive, dest: Path, timeout_s: float) -> None:
    """Stream `url` to `dest`, checking the size against the headers and the plausible range."""
    size, md5 = 0, hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, dest.open("wb") as out:
            expected = resp.headers.get("Content-Length")
            while chunk := resp.read(_CHUNK):
                size += len(chunk)
                if size > spec.max_bytes:
                    raise FetchError(f"{name}: {url} is larger than {spec.max_bytes:,} bytes; is the URL right?")
                md5.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = e.reason if type(e) is urllib.error.URLError else e  # HTTPError's text has the status
        raise FetchError(
            f"{name}: could not download {url}: {reason}. Without network access, fetch the archive "
            f"elsewhere and pass its local path as a file:// URL."
        ) from None
    if expected is not None and int(expected) != size:
        raise FetchError(f"{name}: download of {url} is truncated: {size:,} of {int(expected):,} bytes")
    if size < spec.min_bytes:
        raise FetchError(f"{name}: {url} gave only {size:,} bytes (expected at least {spec.min_bytes:,})")
    if spec.md5 is not None and md5.hexdigest() != spec.md5:
        raise FetchError(f"{name}: {url} has MD5 {md5.hexdigest()}, expected {spec.md5} (corrupt or changed)")
    log.info("fetch %s: downloaded %s bytes from %s", name, f"{size:,}", url)


def _extract(name: str, archive: Path, spec: Archive, dest: Path) -> None:
    """Extract the listed members (and only those, by their known names) into `dest`."""
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise FetchError(f"{name}: archive member {bad} is corrupt (CRC mismatch)")
            present = set(zf.namelist())
            dest.mkdir(parents=True)
            for file in spec.files:
                member = f"{spec.folder}/{file}"
                if member not in present:
                    raise FetchError(f"{name}: archive has no member {member}")
                with zf.open(member) as src, (dest / file).open("wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{name}: downloaded file is not a valid zip archive ({e})") from None


def _digest_and_lines(path: Path) -> tuple[str, int]:
    sha, lines, last = hashlib.sha256(), 0, b"\n"
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return sha.hexdigest(), lines + (last != b"\n")  # a last line without newline still counts


def verify_folder(name: str, folder: Path, spec: Archive) -> None:
    """Raise FetchError naming the first file that is missing or differs from the pinned facts."""
    for file in spec.files:
        path = folder / file
        if not path.is_file():
            raise FetchError(f"{name}: {path} is missing")
        if file not in spec.lines and file not in spec.sha256:
            continue
        digest, lines = _digest_and_lines(path)
        if file in spec.lines and lines != spec.lines[file]:
            raise FetchError(f"{name}: {path} has {lines:,} lines, expected {spec.lines[file]:,}")
        if file in spec.sha256 and digest != spec.sha256[file]:
            raise FetchError(f"{name}: {path} has SHA-256 {digest}, expected {spec.sha256[file]}")


def _is_complete(name: str, folder: Path, spec: Archive) -> bool:
    try:
        verify_folder(name, folder, spec)
    except FetchError as e:
        if folder.exists():
            log.warning("fetch %s: existing %s does not verify (%s); fetching again", name, folder, e)
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def fetch(name: DatasetName, output: str | Path, *, url: str | None = None, force: bool = False,
          timeout_s: float = 60.0) -> Path:
    """Download, verify and extract a MovieLens archive into `output/<name>/`; return that folder.

    Args:
        name: "movielens-100k" (u.data, u.item, ...), "movielens-latest-small" (ratings.csv,
            movies.csv, ...) or "movielens-1m" (ratings.dat, movies.dat, users.dat).
        output: parent folder; created when missing.
        url: another location of the same archive (a mirror, or file:///path/ml-100k.zip for a copy
            downloaded elsewhere); it is verified exactly like the GroupLens download.
        force: download again even when `output/<name>/` already verifies.
        timeout_s: network timeout per read.

    Raises:
        ValueError: unknown name. FetchError: network failure, wrong size or checksum, bad archive.

    Example:
        folder = fetch("movielens-100k", "data/raw")  # data/raw/movielens-100k/u.data, ...
    """
    if name not in DATASETS:
        raise ValueError(f"unknown MovieLens dataset {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    target = Path(output) / name
    if not force and _is_complete(name, target, spec):
        log.info("fetch %s: %s already complete; nothing to download", name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _download(name, url or spec.url, spec, tmp / "archive.zip", timeout_s)
        _extract(name, tmp / "archive.zip", spec, tmp / name)
        verify_folder(name, tmp / name, spec)
        old = target.parent / f".{name}.old-{os.getpid()}"
        if target.exists():
            target.rename(old)
        (tmp / name).rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:  # on success only the archive is left in tmp; on failure nothing complete-looking remains
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetch %s: verified and extracted into %s", name, target)
    return target
