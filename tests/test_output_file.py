"""Where the CLI writes an image: the name, the format, and the checks made before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagesmith.output_file import OutputPathError, output_option, planned_output, write_whole
from imagesmith.schemas import OutputFormat


def test_the_name_and_the_format_option_agree_or_the_format_adds_its_suffix(tmp_path: Path) -> None:
    png = OutputFormat.PNG
    cases = {
        ("hero.png", None): ("hero.png", OutputFormat.PNG),
        ("hero.JPG", None): ("hero.JPG", OutputFormat.JPEG),
        ("hero", "webp"): ("hero.webp", OutputFormat.WEBP),
        ("hero", None): ("hero.png", OutputFormat.PNG),
        # A dot that is part of the name, with --format: the format's suffix is added (it was refused).
        ("hero.v2", "png"): ("hero.v2.png", OutputFormat.PNG),
        ("2024.05.01-hero", "jpeg"): ("2024.05.01-hero.jpg", OutputFormat.JPEG),
    }
    for (name, format_option), (expected, output_format) in cases.items():
        assert planned_output(tmp_path / name, format_option, png) == (tmp_path / expected, output_format), (
            name
        )


def test_names_that_would_lie_about_their_bytes_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        OutputPathError, match=r"hero.png is named as png but --format is jpeg; name the file hero.jpg"
    ):
        planned_output(tmp_path / "hero.png", "jpeg", OutputFormat.PNG)
    with pytest.raises(
        OutputPathError, match=r"^\.v2 is not a format imagesmith writes; .* \(or give --format\)$"
    ):
        planned_output(tmp_path / "hero.v2", None, OutputFormat.PNG, " (or give --format)")
    with pytest.raises(
        OutputPathError, match=r"is not a format imagesmith writes; name the file .png, .jpg or .webp$"
    ):
        planned_output(tmp_path / "hero.v2", None, OutputFormat.JPEG)  # search: no --format to suggest


@pytest.mark.parametrize("folder", ["/proc", "/sys"])
def test_a_folder_that_takes_no_file_is_refused_before_any_work(folder: str) -> None:
    """Checked by making a file there: as root (CI, containers) a permission test passes /proc and /sys, and the
    CLI refused the write only after the generation."""
    with pytest.raises(OutputPathError, match=f"cannot write in {folder} .*choose another folder") as refused:
        planned_output(Path(folder) / "hero.png", None, OutputFormat.PNG)
    assert "no such file" not in str(refused.value)  # /proc answers ENOENT for a folder that is there


def test_a_writable_folder_is_left_as_it_was(tmp_path: Path) -> None:
    planned_output(tmp_path / "new" / "hero.png", None, OutputFormat.PNG)
    assert list(tmp_path.iterdir()) == []  # the probe's file is gone, and no folder is made before the write


def test_an_output_that_is_a_link_is_written_through_to_its_target(tmp_path: Path) -> None:
    """Renamed over, the link became a plain file and the file it pointed at kept the old image."""
    target = tmp_path / "site" / "hero.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "hero.png"
    link.symlink_to(target)
    write_whole(link, b"new image")
    assert link.is_symlink() and target.read_bytes() == b"new image"
    assert not list(tmp_path.rglob(".*.part"))


def test_a_link_that_loops_is_refused_before_any_work(tmp_path: Path) -> None:
    """Resolved only at the write, a loop of links raised RuntimeError, a traceback after the generation."""
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(OutputPathError, match=r"a\.png is a symbolic link that leads nowhere"):
        planned_output(tmp_path / "a.png", None, OutputFormat.PNG)


def test_a_device_keeps_its_name_and_takes_the_bytes_in_place() -> None:
    """'-o /dev/null' wrote /dev/null.png, a new file in /dev; renamed over, /dev/null would have become a PNG."""
    null = Path("/dev/null")
    assert planned_output(null, None, OutputFormat.PNG) == (null, OutputFormat.PNG)
    assert planned_output(null, "jpeg", OutputFormat.PNG) == (null, OutputFormat.JPEG)
    write_whole(null, b"\x89PNG not really")
    assert null.is_char_device()
    assert not Path("/dev/null.png").exists() and not Path("/dev/.null.part").exists()


def test_a_named_pipe_gets_the_whole_image_through_it(tmp_path: Path) -> None:
    import os
    import threading

    pipe = tmp_path / "images"
    os.mkfifo(pipe)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    data = os.urandom(300_000)  # more than a pipe's buffer: the writer must wait for the reader
    path, _ = planned_output(pipe, None, OutputFormat.PNG)
    write_whole(path, data)
    reader.join(timeout=10)
    assert received == [data]
    assert pipe.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_an_empty_name_or_a_folders_name_is_refused_as_typed(tmp_path: Path) -> None:
    """-o "" (an unset $OUT) wrote ./image.png; -o newdir/ wrote newdir.png beside the folder it named."""
    with pytest.raises(OutputPathError, match=r"an empty name; give a file name, e\.g\. -o image\.png"):
        output_option("", "image")
    with pytest.raises(OutputPathError, match="newdir/ names a folder; give a file name in it"):
        output_option(f"{tmp_path}/newdir/", "image")
    assert output_option(None, "image") == Path("image")
    assert output_option(str(tmp_path / "hero.png"), "image") == tmp_path / "hero.png"


def test_a_name_too_long_for_the_file_system_is_refused_not_a_traceback(tmp_path: Path) -> None:
    for too_long in (tmp_path / ("a" * 300 + ".png"), tmp_path / ("d" * 300) / "x.png"):
        with pytest.raises(OutputPathError, match="File name too long; choose another name"):
            planned_output(too_long, None, OutputFormat.PNG)


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_folder_that_is_a_broken_link_is_refused_before_any_work(tmp_path: Path, kind: str) -> None:
    """The walk to the nearest existing folder passed it, and the write failed after the generation ("File
    exists")."""
    link = tmp_path / "out"
    if kind == "dangling":
        link.symlink_to(tmp_path / "nowhere" / "dir")
    else:
        (tmp_path / "other").symlink_to(link)
        link.symlink_to(tmp_path / "other")
    with pytest.raises(
        OutputPathError, match="out is a symbolic link that leads nowhere; choose another folder"
    ):
        planned_output(link / "x.png", None, OutputFormat.PNG)
