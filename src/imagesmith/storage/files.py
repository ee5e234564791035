"""Content-addressed image files under <data_dir>/images/<first two hex>/<sha256>.<ext>.

The name is derived from the bytes, never from the client, so there is no path to inject; the same bytes stored
twice are one file, which also makes re-running an interrupted job harmless. Files are written to a temporary
name, fsynced and renamed, so a crash never leaves a half-written image under a real name.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
MEDIA_TYPES = {ext: media for media, ext in EXTENSIONS.items()}
_NAME = re.compile(r"([0-9a-f]{64})\.(png|jpg|webp)")  # whole names only: fullmatch ($ allows a "\n")


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    extension: str
    size: int

    @property
    def name(self) -> str:
        return f"{self.sha256}.{self.extension}"

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.extension]


def parse_image_name(name: str) -> tuple[str, str] | None:
    """(sha256, extension) for a valid image file name, None for anything else."""
    match = _NAME.fullmatch(name)
    return (match.group(1), match.group(2)) if match else None


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder for fsync; NTFS journals renames itself
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ImageFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def remove_partial_writes(self) -> int:
        """Delete the temporary files of writes a crash cut short (put() renames a whole file or removes its
        temporary one; a kill -9 in between leaves it, and nothing else ever would). Only for the process that
        holds the job store's lock, at start: another process's put() may be writing one. Returns how many."""
        partial = list(self.root.glob("*/.tmp-*"))
        for path in partial:
            path.unlink(missing_ok=True)
        return len(partial)

    def path_for(self, sha256: str, extension: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.{extension}"

    def put(self, data: bytes, media_type: str) -> StoredImage:
        extension = EXTENSIONS[media_type]
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path_for(sha256, extension)
        if not target.exists():
            new_folder = not target.parent.exists()
            target.parent.mkdir(parents=True, exist_ok=True)
            if new_folder:
                _fsync_dir(self.root)  # the new two-character folder's entry must last too
            fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, target)
                # The file's data is on disk; the rename lives in the folder, which must reach the disk too
                # before the job that points at this file commits (ext4 orders this, other filesystems not).
                _fsync_dir(target.parent)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        return StoredImage(sha256=sha256, extension=extension, size=len(data))

    def get(self, name: str) -> Path | None:
        parsed = parse_image_name(name)
        if parsed is None:
            return None
        path = self.path_for(*parsed)
        return path if path.is_file() else None

    def stored(self) -> Iterator[Path]:
        """Every image file (named sha256.ext), none of put()'s temporary ones."""
        for path in self.root.glob("??/*"):
            if parse_image_name(path.name) is not None and path.is_file():
                yield path
