"""What goes wrong with the files and options a user gives us, said in one line: the file named and what to do.

Our refusals are `Refusal`s (a ValueError) whose message names the file, key or argument; the operating system's
errors about files (a missing file, a read-only folder, a full disk, a planted link) are the OSErrors of
`FILE_SYSTEM_ERRORS` and `FILE_SYSTEM_ERRNOS`. Each command's `main` is wrapped in `exits_with_message`, its one
error path: either ends as `error: <one line>` and exit status 1, not a traceback. Any other exception, a plain
ValueError included, is a bug and keeps its traceback. Values quoted in a message go through `quoted` (a bounded
repr), and what a file can make us read is bounded (`read_small_text`).
"""

import errno
import functools
import glob
import json
import os
import reprlib
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)
# What the file system says of the paths a user gave: these OSErrors (ours too, raised with a message of our own and
# no errno), and the plain OSErrors of the errnos below (a full disk, a read-only disk, a planted link, a long name).
# The user's to fix, so said in one line; any other OSError (a socket's, a bug's) keeps its traceback.
FILE_SYSTEM_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
FILE_SYSTEM_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY,
                                errno.ELOOP, errno.ENAMETOOLONG, errno.EXDEV, errno.EBUSY, *DISK_FULL, *NOT_ALLOWED})
# Configs, manifests, meta.json, sampling.json: a few KB when written by us or by hand.
SMALL_FILE_BYTES = 1 << 20
MESSAGE_CHARACTERS = 600

_REPR = reprlib.Repr()  # its limits set one by one: Python 3.11's takes no arguments
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 8, 8, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


class Refusal(ValueError):
    """Bad input refused by promoe (a file, a config, an argument, a limit), its message one line naming what and
    what to do. The commands say it as `error: <message>`; a plain ValueError is a bug and keeps its traceback."""


def quoted(value) -> str:
    """repr(value), bounded in length and in the work it takes (a nested value is cut, never expanded whole)."""
    return _REPR.repr(value)


def one_line(text: str, limit: int = MESSAGE_CHARACTERS) -> str:
    """`text` on one line, at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 40] + f"... ({len(text)} characters in all)"


def read_small_text(path: str | Path, what: str, limit: int = SMALL_FILE_BYTES) -> str:
    """The UTF-8 text of a small file (`what` it should hold, e.g. "a run config"); a larger file is refused
    after reading `limit` bytes of it, so a wrong or crafted file cannot make us read without end, and anything but
    a regular file (a FIFO, a device) is refused without waiting for a writer."""
    path = Path(path)
    if path.is_dir():
        raise Refusal(f"{path} is a folder; it should be a file holding {what}")
    with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise Refusal(f"{path} is not a regular file (a FIFO or a device?); it should be a file holding {what}")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise Refusal(f"{path} is larger than {limit // 1024} KiB, too large for {what}: is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(f"{path} is not UTF-8 text, so it cannot hold {what}: is it the right file?") from None


def parse_json(text: str):
    """json.loads, with text that is not JSON, or a value nested too deeply for Python's recursion, refused in one
    line (a Refusal): callers name the file."""
    try:
        return json.loads(text)
    except RecursionError:
        raise Refusal(NESTED_TOO_DEEPLY) from None
    except ValueError as error:  # json.JSONDecodeError; an integer of more digits than Python converts
        raise Refusal(one_line(str(error), 200)) from None


NESTED_TOO_DEEPLY = "nested deeper than Python's recursion allows: not a file promoe wrote"


def os_error_message(error: OSError) -> str:
    """One line for an OSError: the file, what happened, what to do."""
    path = error.filename
    if path is None or error.errno is None:
        return one_line(str(error))
    what = f"{path}: {error.strerror}"
    if error.errno in DISK_FULL:
        return f"{what}: the disk is full; free space there, then run the same command again"
    if error.errno in NOT_ALLOWED:
        return f"{what}: a read-only or someone else's folder? Change its permissions or choose another path"
    if error.errno == errno.ELOOP and os.path.islink(path):
        return f"{path} is a link (to {os.readlink(path)}); promoe does not write through links: remove it"
    if error.errno in (errno.ENOENT, errno.EEXIST) and os.path.islink(path) and not os.path.exists(path):
        return f"{path} is a link to {os.readlink(path)}, which does not exist: fix or remove the link"
    if error.errno == errno.ENOENT:
        return f"{what}: check the path"
    if error.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{what}: a file stands where a folder is meant; give a folder"
    if error.errno == errno.EISDIR:
        return f"{what}: a folder stands where a file is meant; give a file"
    return one_line(what)


def error_message(error: BaseException) -> str:
    return os_error_message(error) if isinstance(error, OSError) else one_line(str(error))


@contextmanager
def written_atomically(path: str | Path):
    """Yields the temporary path to write `path` through: a new file of a unique name in the same folder (created
    with O_EXCL, so neither a planted link nor another writer's file is written through), renamed over `path` when
    the block ends (a link at `path` is replaced, not followed) and removed when it fails. So a full disk or a kill
    leaves the file of before, whole, and concurrent writers each rename a whole file of their own. The file takes
    the mode a plain `open` gives under the umask. An OSError that names no file (a write to an open file object)
    is raised naming `path`."""
    path = Path(path)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        tmp.replace(path)
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


def not_following_links(path: str, flags: int) -> int:
    """`open`'s opener that refuses (ELOOP) to open a file through a link planted at its name."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def temporaries_of(path: Path) -> list[Path]:
    """The temporary files that writes of `path` killed before their end left behind (`written_atomically`'s, and the
    fixed `<name>.tmp` of before)."""
    name = glob.escape(path.name)
    return [*path.parent.glob(f".{name}.*.tmp"), *path.parent.glob(f"{name}.tmp")]


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomically(path: Path, text: str) -> None:
    with written_atomically(path) as tmp:
        tmp.write_text(text)


def is_users_to_fix(error: BaseException) -> bool:
    """True for our refusals and the file system's errors: what the one-line path says; anything else is a bug."""
    return isinstance(error, (Refusal, *FILE_SYSTEM_ERRORS)) or isinstance(error, OSError) and (
        error.errno in FILE_SYSTEM_ERRNOS)


@contextmanager
def said_in_one_line():
    """Our refusals (`Refusal`) and the file system's errors inside become `error: <one line>`, exit status 1; any
    other exception (a bug's ValueError deep in a training step) goes on with its traceback."""
    try:
        yield
    except (ValueError, OSError) as error:
        if not is_users_to_fix(error):
            raise
        raise SystemExit(f"error: {error_message(error)}") from None


def exits_with_message(main):
    """A command's `main` under `said_in_one_line`: its one error path."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        with said_in_one_line():
            return main(*args, **kwargs)
    return run
