"""Where the CLI writes an image (`generate -o`, `search -o`): checked before any work, written whole.

A path that cannot be written is found before the models load or the Pexels search runs, not after minutes of
work; the bytes go to a temporary file beside the target and are renamed over it, so a full disk or a Ctrl-C
mid-write never leaves half an image under the name asked for.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path

from imagesmith.schemas import OutputFormat

SUFFIXES = {OutputFormat.PNG: ".png", OutputFormat.JPEG: ".jpg", OutputFormat.WEBP: ".webp"}


class OutputPathError(ValueError):
    """An output path that cannot be used, with the fix."""


# `-o -`: the image's bytes to standard output, the Unix way to pipe a file (`... -o - | convert - ...`), where a
# file named '-.png' was written before.
STDOUT = Path("-")
# Names that are standard output itself. `-o /dev/stdout` made a file /dev/stdout.png as root (the link leads to
# /proc/self/fd/1, a pipe resolve() cannot follow, so it looked like no device) and sent the summary where the
# image was meant to go.
STDOUT_NAMES = frozenset({"-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"})


def output_option(typed: str | None, default: str) -> Path:
    """-o as typed, as a path (`default` when not given). An empty value (an unset $OUT) wrote ./image.png; a
    name ending in a slash means a folder, and 'newdir/' wrote newdir.png beside it: both are refused."""
    if typed is None:
        return Path(default)
    if not typed.strip():
        raise OutputPathError(f"an empty name; give a file name, e.g. -o {default}.png")
    if typed.endswith(("/", os.sep)) and not Path(typed).is_dir():
        raise OutputPathError(
            f"{typed} names a folder; give a file name in it, e.g. {Path(typed) / default}.png"
        )
    return Path(typed)


def stdout_format(format_option: str | None, count: int, json_wanted: bool) -> OutputFormat:
    """The format of an image written to standard output (PNG unless --format), once it is known that standard
    output can take it: one image, no JSON beside it, and not a terminal, where the bytes would be garbage on
    the screen."""
    if count != 1:
        raise OutputPathError(
            f"'-' (standard output) takes one image, not --num-images {count}; name a file (-o hero.png writes "
            "hero_0.png, hero_1.png, ...)"
        )
    if json_wanted:
        raise OutputPathError(
            "'-' (standard output) carries the image, so --json cannot go there too; drop --json, or name a file"
        )
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        raise OutputPathError("'-' writes the image to standard output, which is closed here; name a file")
    if sys.stdout.isatty():
        raise OutputPathError(
            "'-' writes the image's bytes to standard output, which is a terminal here; redirect it "
            "(-o - > image.png) or pipe it (-o - | ...), or name a file"
        )
    return OutputFormat(format_option) if format_option else OutputFormat.PNG


def write_stdout(data: bytes) -> None:
    """The image's bytes to standard output, flushed: stdout's text layer may hold nothing of them."""
    try:
        sys.stdout.flush()
        # Until every byte is out: with stdout unbuffered (PYTHONUNBUFFERED, python -u) the buffer is the raw
        # file, whose write may take part of the data; `| head -c 10` got 64 KiB of 2.3 MB and exit 0.
        remaining = memoryview(data)
        while remaining:
            written = sys.stdout.buffer.write(remaining)
            remaining = remaining[written or 0 :]  # None: a non-blocking file that took nothing; try again
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # The reader went away (`| head -c 10`). Python's own flush at exit would fail on the same pipe and print
        # a traceback: point stdout at /dev/null first (the recipe in Python's signal docs), then report it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise


def is_special_file(path: Path) -> bool:
    """An existing path that is neither a regular file nor a folder: a device (/dev/null), a named pipe, a
    socket. Its bytes are written into it as it is: no suffix added to its name, no temporary file renamed over
    it (which would replace /dev/null itself with an image, as root)."""
    try:
        target = link_target(path)
        return target.exists() and not target.is_file() and not target.is_dir()
    except OSError:
        return False


def planned_output(
    output: Path, format_option: str | None, default: OutputFormat, format_hint: str = ""
) -> tuple[Path, OutputFormat]:
    """The file to write and its format, from `-o` and `--format`. A name without a suffix gets the format's
    (a PNG named 'hero' opens in nothing); a suffix that disagrees with --format is refused, as a suffix of
    no format is, since the file's name would lie about its bytes. `format_hint`: added to that refusal where
    the command has a --format to suggest. A device or a pipe (is_special_file) keeps its name."""
    try:
        return _planned_output(output, format_option, default, format_hint)
    except OSError as error:  # a name longer than the file system takes (a traceback before), say
        raise _name_refused(output, error) from None


def _name_refused(path: Path, error: OSError) -> OutputPathError:
    """A path the file system refused to look at, said with the path cut to its start and end (a name of 300
    characters filled the line)."""
    text = str(path)
    shown = text if len(text) <= 80 else f"{text[:40]}...{text[-30:]}"
    return OutputPathError(f"{shown}: {error.strerror or error}; choose another name")


def _planned_output(
    output: Path, format_option: str | None, default: OutputFormat, format_hint: str
) -> tuple[Path, OutputFormat]:
    if is_special_file(output):  # '-o /dev/null' wrote /dev/null.png, a new file in /dev
        return output, OutputFormat(format_option) if format_option else default
    if output.is_dir():  # before a suffix is added: 'adir' must not become 'adir.png' beside it
        check_writable(output)
    chosen = OutputFormat(format_option) if format_option else None
    try:
        named = OutputFormat.for_suffix(output.suffix, chosen or default) if output.suffix else None
    except ValueError as error:
        if chosen is None:
            raise OutputPathError(f"{error}{format_hint}") from error
        named = None  # 'hero.v2 --format png': the dot is part of the name; the format's suffix is added
    if chosen is not None and named is not None and named is not chosen:
        raise OutputPathError(
            f"{output.name} is named as {named.value} but --format is {chosen.value}; name the file "
            f"{output.stem}{SUFFIXES[chosen]}, or leave --format out"
        )
    output_format = chosen or named or default
    path = output if named is not None else output.with_name(output.name + SUFFIXES[output_format])
    check_writable(path)
    return path, output_format


def link_target(path: Path) -> Path:
    """The file a symbolic link `path` leads to (the path itself when it is no link). OSError for a loop of
    links, which Path.resolve raises as RuntimeError on Python 3.11."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:
        raise OSError(f"{path} is a symbolic link that leads nowhere ({error})") from None


def check_writable(path: Path) -> None:
    """Refuse, with the fix, a path that is a folder or whose nearest existing folder cannot be written in
    (the folders below it are made when the file is written). A symbolic link is judged by its target."""
    try:
        path = link_target(path)
    except OSError as error:
        raise OutputPathError(f"{error}; choose another name") from None
    if is_special_file(path):  # written into as it is: its folder (/dev) need not take new files
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"{path} cannot be written by this user; choose another path")
        return
    try:
        if path.is_dir():
            raise OutputPathError(f"{path} is a folder; give a file name, e.g. {path / 'image.png'}")
        existing = next((folder for folder in path.parents if folder.exists()), Path("."))
        # A folder that is a link to nowhere (or a loop of links) does not "exist": the walk passed it, and the
        # whole generation ran before the write failed with "File exists".
        broken = next(
            (folder for folder in path.parents if folder.is_symlink() and not folder.exists()), None
        )
    except OSError as error:  # a name longer than the file system takes
        raise _name_refused(path, error) from None
    if broken is not None:
        raise OutputPathError(f"{broken} is a symbolic link that leads nowhere; choose another folder")
    if not existing.is_dir():
        raise OutputPathError(f"{existing} is a file, so {path} cannot be made; choose another path")
    try:
        # A file made and dropped at once, where a permission test would do: as root os.access says yes to
        # everything, and /proc, /sys or a read-only mount refused the write only after the whole generation.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = (error.strerror or type(error).__name__).lower()
        if error.errno == errno.ENOENT:  # the folder is there: /proc and /sys answer a new file with ENOENT
            reason = "it takes no new files"
        raise OutputPathError(f"cannot write in {existing} ({reason}); choose another folder") from None


def write_whole(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file renamed over it; raises OSError (the temporary file is
    removed) when the disk is full or the folder went away. A symbolic link is written through, to the file it
    points at, as other tools write: renamed over, the link itself became a plain file and its target kept the
    old image."""
    path = link_target(path)
    if is_special_file(path):
        with path.open("wb") as special:  # a device or a pipe takes the bytes as they come
            special.write(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
