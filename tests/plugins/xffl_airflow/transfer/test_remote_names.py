"""File names of a transfer that the facility could not print back on one line: refused, both
those we would send (a local folder, a remote path) and those a facility lists back to a pull.

Pure logic: the pull's listing comes from a fake session; nothing is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
from types import SimpleNamespace

import pytest
from xffl_airflow.transfer import RemoteFacility, TransferError, TransferOptions
from xffl_airflow.transfer.facility import check_relative_name
from xffl_airflow.transfer.local import scan_folder
from xffl_airflow.transfer.pull import PullRun

SITE = RemoteFacility(name="site1", conn_id="facility_site1", workdir="/scratch/xffl")
REASON = "names must not hold line breaks, NUL, other control characters or backslashes"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("sub/a\u2028b.bin", r"file name 'sub/a\u2028b.bin' holds U+2028 (LINE SEPARATOR): "),
        ("sub/a\x85b.bin", r"file name 'sub/a\x85b.bin' holds U+0085 (NEXT LINE): "),
    ],
)
def test_file_names_with_a_line_break_are_refused(name, message):
    with pytest.raises(ValueError) as caught:
        check_relative_name(name)
    assert str(caught.value) == message + REASON


def test_a_local_file_with_a_line_break_is_not_sent(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    (tmp_path / "odd\u2029name.bin").write_bytes(b"y")
    with pytest.raises(ValueError) as caught:
        scan_folder(tmp_path)
    assert str(caught.value) == (
        f"file name 'odd\\u2029name.bin' holds U+2029 (PARAGRAPH SEPARATOR): {REASON}"
    )


def test_a_remote_path_with_a_line_break_is_refused_naming_the_facility():
    with pytest.raises(TransferError) as caught:
        SITE.resolve("round-1\x1cglobal")
    assert str(caught.value) == (
        f"facility site1: remote path 'round-1\\x1cglobal' holds U+001C (FILE SEPARATOR): {REASON}"
    )
    assert caught.value.path == "round-1\x1cglobal" and not caught.value.retryable


def entry(name: str, mode: int, size: int = 0) -> SimpleNamespace:
    return SimpleNamespace(filename=name, attrs=SimpleNamespace(permissions=mode, size=size))


class ListingOnly:
    """A facility session that can list folders and nothing else: the pull must stop there."""

    def __init__(self, folders: dict[str, list[SimpleNamespace]]):
        self.sftp = SimpleNamespace(readdir=self.readdir, scandir=self.scandir)
        self.folders = folders

    async def readdir(self, folder: str) -> list[SimpleNamespace]:
        return self.folders[folder]

    async def scandir(self, folder: str):
        for item in self.folders[folder]:
            yield item

    async def confine(self, path: str) -> str:
        return path

    @contextlib.contextmanager
    def translate(self, action: str, path: str):
        yield

    def __getattr__(self, name: str):
        raise AssertionError(f"the pull went on to {name}() after a bad listing")


def test_a_listed_name_with_a_line_break_stops_the_pull_before_anything_is_written(tmp_path):
    local = tmp_path / "global"
    local.mkdir()
    session = ListingOnly(
        {
            "/scratch/xffl/round-1": [
                entry(".", stat.S_IFDIR | 0o755),
                entry("a.bin", stat.S_IFREG | 0o644, 10),
                entry("sub", stat.S_IFDIR | 0o755),
            ],
            "/scratch/xffl/round-1/sub": [
                entry("b.bin", stat.S_IFREG | 0o644, 10),
                entry("c\x85.bin", stat.S_IFREG | 0o644, 10),
            ],
        }
    )
    run = PullRun(facility=SITE, target=None, options=TransferOptions(), local_dir=local,
                  remote_dir="/scratch/xffl/round-1")  # fmt: skip
    with pytest.raises(TransferError) as caught:
        asyncio.run(run.attempt(session))
    assert str(caught.value) == (
        "facility site1: the listing of '/scratch/xffl/round-1/sub' holds an unusable name: "
        f"file name 'sub/c\\x85.bin' holds U+0085 (NEXT LINE): {REASON}"
    )
    assert caught.value.path == "/scratch/xffl/round-1/sub/c\x85.bin"
    assert list(local.iterdir()) == []  # no folder, no part file


def test_a_listed_name_holding_a_slash_is_refused(tmp_path):
    session = ListingOnly({"/scratch/xffl/r": [entry("../../etc/passwd", stat.S_IFREG | 0o644)]})
    run = PullRun(facility=SITE, target=None, options=TransferOptions(), local_dir=tmp_path,
                  remote_dir="/scratch/xffl/r")  # fmt: skip
    with pytest.raises(TransferError, match=r"file name '\.\./\.\./etc/passwd' holds '/'"):
        asyncio.run(run.attempt(session))
