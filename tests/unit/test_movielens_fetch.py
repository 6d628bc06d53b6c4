"""MovieLens fetching: extraction, verification and atomic output, tested with zips built here and
file:// URLs (never the network)."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from seqrec.data import movielens
from seqrec.data.movielens import DATASETS, Archive, FetchError, fetch
from tests.conftest import shared_data

pytestmark = pytest.mark.unit

FILES = {
    "u.data": b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n",
    "u.item": b"1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n",
}


def _zip(path: Path, folder: str, files: dict[str, bytes], extra: dict[str, bytes] | None = None,
         compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in {**files, **(extra or {})}.items():
            zf.writestr(f"{folder}/{name}", data)
    return path


def _spec(archive: Path, **changes) -> Archive:
    spec = Archive(
        url=archive.as_uri(),
        folder="ml-100k",
        files=tuple(FILES),
        min_bytes=10,
        max_bytes=1_000_000,
        md5=hashlib.md5(archive.read_bytes()).hexdigest(),
        lines={"u.data": 3},
        sha256={"u.data": hashlib.sha256(FILES["u.data"]).hexdigest()},
    )
    return dataclasses.replace(spec, **changes)


@pytest.fixture
def archive(tmp_path) -> Path:
    return _zip(tmp_path / "ml-100k.zip", "ml-100k", FILES, extra={"u1.base": b"1\t1\t5\t0\n", "allbut.pl": b"#"})


def _use(monkeypatch, spec: Archive) -> None:
    monkeypatch.setitem(DATASETS, "movielens-100k", spec)


def test_fetch_extracts_only_the_listed_files_atomically(tmp_path, archive, monkeypatch):
    _use(monkeypatch, _spec(archive))
    out = tmp_path / "raw"
    folder = fetch("movielens-100k", out)
    assert folder == out / "movielens-100k"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FILES  # no u1.base, no archive left
    assert [p.name for p in out.iterdir()] == ["movielens-100k"]  # no temporary folder left


def test_verified_folder_is_not_downloaded_again_unless_forced(tmp_path, archive, monkeypatch):
    _use(monkeypatch, _spec(archive))
    folder = fetch("movielens-100k", tmp_path / "raw")
    stamp = (folder / "u.data").stat().st_ino
    missing = (tmp_path / "nowhere.zip").as_uri()
    assert fetch("movielens-100k", tmp_path / "raw", url=missing) == folder  # no download attempted
    assert (folder / "u.data").stat().st_ino == stamp
    with pytest.raises(FetchError, match="could not download"):
        fetch("movielens-100k", tmp_path / "raw", url=missing, force=True)
    assert {p.name for p in folder.iterdir()} == set(FILES)  # the good copy survives the failed refetch


def test_network_failure_gives_a_clear_error_and_no_folder(tmp_path, archive, monkeypatch):
    _use(monkeypatch, _spec(archive))
    url = (tmp_path / "absent" / "ml-100k.zip").as_uri()
    with pytest.raises(FetchError, match=r"movielens-100k: could not download .*ml-100k\.zip.*file://"):
        fetch("movielens-100k", tmp_path / "raw", url=url)
    assert list((tmp_path / "raw").iterdir()) == []


def test_corrupt_existing_folder_is_replaced(tmp_path, archive, monkeypatch):
    _use(monkeypatch, _spec(archive))
    broken = tmp_path / "raw" / "movielens-100k"
    broken.mkdir(parents=True)
    (broken / "u.data").write_bytes(b"1\t2\t3\t4\n")
    (broken / "u.item").write_bytes(FILES["u.item"])
    folder = fetch("movielens-100k", tmp_path / "raw")
    assert (folder / "u.data").read_bytes() == FILES["u.data"]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["movielens-100k"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"md5": "0" * 32}, "has MD5"),
        ({"sha256": {"u.data": "0" * 64}}, r"u\.data has SHA-256"),
        ({"lines": {"u.data": 100_000}}, r"u\.data has 3 lines, expected 100,000"),
        ({"files": ("u.data", "u.user")}, "archive has no member ml-100k/u.user"),
        ({"max_bytes": 50}, "larger than 50 bytes"),
        ({"min_bytes": 10_000_000}, "gave only"),
    ],
)
def test_verification_failures_name_the_problem_and_leave_nothing(tmp_path, archive, monkeypatch, changes, message):
    _use(monkeypatch, _spec(archive, **changes))
    with pytest.raises(FetchError, match=message):
        fetch("movielens-100k", tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []


def test_not_a_zip_and_crc_corruption_are_rejected(tmp_path, monkeypatch):
    page = tmp_path / "error.html"
    page.write_bytes(b"<html>503 Service Unavailable</html>" * 10)
    _use(monkeypatch, _spec(page))
    with pytest.raises(FetchError, match="not a valid zip"):
        fetch("movielens-100k", tmp_path / "raw")
    stored = _zip(tmp_path / "stored.zip", "ml-100k", FILES, compression=zipfile.ZIP_STORED)
    data = bytearray(stored.read_bytes())
    data[data.index(b"881250949")] ^= 0x01  # flip one bit inside u.data: the CRC no longer matches
    stored.write_bytes(bytes(data))
    _use(monkeypatch, _spec(stored))
    with pytest.raises(FetchError, match="ml-100k/u.data is corrupt"):
        fetch("movielens-100k", tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []


def test_unknown_name_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown MovieLens dataset 'movielens-20m'"):
        fetch("movielens-20m", tmp_path)  # type: ignore[arg-type]


def test_every_archive_comes_from_the_grouplens_download_page():
    for name, spec in DATASETS.items():
        assert spec.url == f"https://files.grouplens.org/datasets/movielens/{spec.folder}.zip", name
        assert set(spec.lines) <= set(spec.files) and set(spec.sha256) <= set(spec.files)
    assert movielens.DATASETS["movielens-1m"].files == ("README", "movies.dat", "ratings.dat", "users.dat")


@pytest.mark.parametrize(("name", "folder"), [("movielens-100k", "ml-100k"), ("movielens-latest-small", "ml-latest-small")])
def test_pinned_facts_match_the_real_files(tmp_path, monkeypatch, name, folder):
    """The real spec (checksums, line counts, file names) accepts a re-zipped copy of the real data."""
    real = shared_data(name)
    files = {f: (real / f).read_bytes() for f in DATASETS[name].files}
    archive = _zip(tmp_path / f"{folder}.zip", folder, files)
    # Only the archive-level facts change: a re-zipped copy has its own size and MD5.
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], md5=None, min_bytes=1))
    out = fetch(name, tmp_path / "raw", url=archive.as_uri())
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in real.iterdir())
