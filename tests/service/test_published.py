"""Publishing on a full disk: the error is raised and no partial temporary file stays in the job folder.

`write_atomically` used to leave ``.result.json.<pid>.tmp`` behind when the disk filled up while writing it: a
partial file holding the last free blocks of the disk that the job's ``error.json`` then needed.
"""

from __future__ import annotations

import subprocess

import pytest

from distprobe.service.published import read_error, write_atomically


@pytest.fixture
def full_disk(tmp_path):
    """A real 8 KiB tmpfs (skips where mounting is not permitted)."""
    where = tmp_path / "full"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_leaves_no_partial_file_and_room_for_the_error(full_disk):
    with pytest.raises(OSError, match="No space left on device"):
        write_atomically(full_disk / "result.json", "x" * 100_000)
    assert list(full_disk.iterdir()) == []
    write_atomically(full_disk / "error.json", '{"format": 1, "error": "OSError: disk full"}')
    assert read_error(full_disk) == "OSError: disk full"
