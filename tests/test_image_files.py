"""Stored images: content-addressed, written so that a crash never leaves a half image under a real name, and
the name itself made durable before the job that points at it commits."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from imagesmith.storage.files import ImageFiles


def test_an_image_is_stored_by_its_hash_and_its_folder_entries_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = ImageFiles(tmp_path / "images")
    synced: list[str] = []
    real_open, real_fsync = os.open, os.fsync
    opened: dict[int, str] = {}

    def recording_open(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        fd = real_open(path, flags, *args)
        opened[fd] = str(path)
        return fd

    def recording_fsync(fd: int) -> None:
        synced.append(opened.get(fd, "file"))
        real_fsync(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    data = b"\x89PNG not really"
    stored = files.put(data, "image/png")
    digest = hashlib.sha256(data).hexdigest()
    target = files.path_for(digest, "png")
    assert stored.sha256 == digest and target.read_bytes() == data
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp-")]
    if os.name == "posix":
        # The new two-character folder's entry in the root, the data, then the file's name in its folder.
        root_entry, written, name = synced
        assert root_entry == str(files.root) and name == str(target.parent)
        assert Path(written).parent == target.parent and Path(written).name.startswith(".tmp-")  # pre-rename
    files.put(data, "image/png")  # already stored: nothing is written or synced again
    assert len(synced) == (3 if os.name == "posix" else 1)


def test_only_whole_image_names_parse() -> None:
    from imagesmith.storage.files import parse_image_name

    name = "a" * 64 + ".png"
    assert parse_image_name(name) == ("a" * 64, "png")
    for bad in (
        name + "\n",
        " " + name,
        name + ".png",
        "A" * 64 + ".png",
        "a" * 63 + ".png",
        "a" * 64 + ".gif",
    ):
        assert parse_image_name(bad) is None, repr(bad)
