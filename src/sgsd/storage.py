"""Crash-safe file writing and stable hashing, used by training, evaluation, skill banks and the demo.

Every file this package writes is either rewritten atomically (temporary file in the same folder,
fsync, rename: a reader sees the old file or the new one, never half of one) or is JSONL appended one
complete record at a time and fsynced, so a crash loses at most the record being written and a
resumed stage skips what is already there. What it writes gets the mode a plain `open()` gives under
the user's umask (`plain_file_mode`), so a teammate on a shared filesystem can read what the umask lets
them read; the temporary file of an atomic write is private only until it is complete. Hashes use SHA-256 of UTF-8 text, never Python's
`hash()` (salted per process), so keys and seeds are the same in every process and on every machine.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Union

from sgsd.errors import DataError, UserError, shorten


def stable_hash(text: str, length: int = 16) -> str:
    """First `length` hex digits of SHA-256(text): the same in every process (unlike `hash()`)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def stable_seed(*parts: str) -> int:
    """A 63-bit integer seed from text parts (joined with a separator that cannot occur in ints)."""
    return int(hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16], 16) >> 1


# Input files (skill banks, training data, benchmarks, attribution) are read whole into memory: a bound
# keeps a wrong path (a huge dump, an endless device) from exhausting it. Generous by default; the
# environment variable raises or lowers it for every command (`skills validate` has no config file).
# What `json` writes and reads back as it was: the values of results, records and reports.
JSONValue = Union[None, bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"]]
JSONObject = dict[str, JSONValue]

MAX_INPUT_ENV = "SGSD_MAX_INPUT_MB"
DEFAULT_MAX_INPUT_MB = 4096


def max_input_bytes() -> int:
    """The input-file size bound: `SGSD_MAX_INPUT_MB` megabytes (default 4096)."""
    return _megabytes_env(MAX_INPUT_ENV, DEFAULT_MAX_INPUT_MB)


def _megabytes_env(name: str, default: float) -> int:
    """Bytes from the environment variable `name`, in megabytes (`default` when unset)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return int(default * 1_000_000)
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = float("nan")
    if not megabytes > 0 or megabytes == float("inf"):
        raise UserError(f"{name}={shorten(repr(value), 60)}: expected a positive number of megabytes")
    return int(megabytes * 1_000_000)


def check_input_file(path: str | os.PathLike, what: str) -> int:
    """Size in bytes of the regular file `path`; a one-line `DataError` when it is missing, a directory,
    not a regular file (a device or FIFO, which could be read forever) or over `max_input_bytes()`."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{what}: no such file or directory: {path}") from None
    except OSError as err:
        raise DataError(f"{what} {path}: cannot read ({err.strerror})") from None
    _check_regular(path, info, what)
    return info.st_size


def _open_input(path: Path, what: str) -> BinaryIO:
    """The input file opened for reading without blocking (a FIFO is never waited on), refused unless it is a
    regular file once open (so a file swapped in after `check_input_file` is checked too)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise DataError(f"{what} {path}: cannot read ({err.strerror})") from None
    handle = os.fdopen(fd, "rb")
    try:
        _check_regular(path, os.fstat(fd), what)
    except BaseException:
        handle.close()
        raise
    return handle


def read_input_bytes(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of an input file, with the checks of `check_input_file` (made on the opened file, so a
    FIFO swapped in after the check is refused too, never waited on or read without end)."""
    path = Path(path)
    check_input_file(path, what)
    limit = max_input_bytes()
    with _open_input(path, what) as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as err:
            raise DataError(f"{what} {path}: cannot read ({err.strerror})") from None
    if len(data) > limit:  # it grew after the check
        raise DataError(_too_large(path, what, len(data), limit))
    return data


UTF8_BOM = b"\xef\xbb\xbf"


def decode_utf8(data: bytes, where: str, *, first_line: int = 1, offset: int = 0) -> str:
    """`data` as UTF-8 text, without the byte-order mark some editors put first; a one-line `DataError`
    naming `where`, the line and the byte otherwise (`first_line`, `offset`: where `data` starts in its file)."""
    if offset == 0 and data.startswith(UTF8_BOM):
        data, offset = data[len(UTF8_BOM):], len(UTF8_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + first_line
        raise DataError(f"{where}: line {line}: not UTF-8 text (byte {offset + err.start}: "
                        f"{data[err.start:err.start + 1]!r}); save the file as UTF-8") from None


def parse_json(text: str, where: str, **options: Any) -> Any:
    """`json.loads(text, **options)`, with nesting deeper than Python's recursion allows (about a thousand
    levels, which no input of ours needs) refused as a one-line `DataError` naming `where`; a syntax error
    stays a `json.JSONDecodeError` for the caller to word."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply (over {MAX_NESTING} levels); not read") from None


# nesting a reader walks at most (JSON: Python's parser stops at about the recursion limit; YAML: sgsd.config)
MAX_NESTING = 100


def _check_regular(path: Path, info: os.stat_result, what: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{what} {path}: is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{what} {path}: not a regular file (a device, FIFO or socket); give a file")
    limit = max_input_bytes()
    if info.st_size > limit:
        raise DataError(_too_large(path, what, info.st_size, limit))


def _too_large(path: Path, what: str, size: int, limit: int) -> str:
    return (f"{what} {path}: {size / 1e6:.1f} MB, over the input size bound of {limit / 1e6:g} MB "
            f"(set {MAX_INPUT_ENV} to raise it)")


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raise a one-line `UserError` when `path` cannot become a directory we write into: it is a file,
    or its nearest existing ancestor is a file or not writable. Creates nothing."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: exists and is not a directory")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {ancestor} is not writable")


# errno values that mean "the disk cannot take this write" (full, over quota, read-only, failing, no permission)
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES}
# how writers that do not raise an OSError say the same: torch's zip writer ("[enforce fail at
# inline_container.cc] ... file write failed"), safetensors' IoError (`StorageFull`), numpy, tokenizers
_STORAGE_TEXT = (("No space left on device", "no space left on device"), ("StorageFull", "no space left on device"),
                 ("Disk quota exceeded", "disk quota exceeded"), ("Read-only file system", "read-only file system"),
                 ("file write failed", "the write failed (disk full?)"), ("unexpected pos", "the write failed (disk full?)"))


def storage_failure(err: BaseException) -> tuple[str | None, str] | None:
    """(file, reason) when `err` (or an exception it was raised from) says the disk could not take a
    write, whichever library raised it; None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return current.filename, current.strerror or str(current)
        text = str(current)
        for needle, reason in _STORAGE_TEXT:
            if needle in text:
                return None, reason
        current = current.__cause__ or current.__context__
    return None


_UMASK_LOCK = threading.Lock()
_umask_fallback: int | None = None


def current_umask() -> int:
    """The process's umask, read without changing it: from `/proc/self/status` (Linux 4.7+). Elsewhere
    `os.umask` must be set to read it, which is process-global (a file another thread creates in that
    instant would get the placeholder mask): it is read once, under a lock, and remembered."""
    global _umask_fallback
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        if _umask_fallback is None:
            _umask_fallback = os.umask(0o077)  # the most private placeholder for the instant it is set
            os.umask(_umask_fallback)
        return _umask_fallback


def plain_file_mode() -> int:
    """The permission bits `open(path, "w")` gives a new file under the current umask (0o644 under 0022)."""
    return 0o666 & ~current_umask()


def plain_dir_mode() -> int:
    """The permission bits `mkdir` gives a new folder under the current umask (0o755 under 0022)."""
    return 0o777 & ~current_umask()


def apply_plain_modes(folder: str | os.PathLike) -> None:
    """Give `folder` and every file and folder under it that this process wrote through a library with a
    private mode the mode a plain `open()` / `mkdir` would have given: safetensors (0.8) writes
    `model.safetensors` 0600, `tempfile.mkdtemp` makes 0700 folders. Call it only on what the run itself
    just wrote (a checkpoint, `final/`, an imported model). Entries owned by another account are left
    as they are (only their owner may change them); links are not followed."""
    root = Path(folder)
    file_mode, dir_mode = plain_file_mode(), plain_dir_mode()
    entries = [(root, True)]
    for parent, dirs, files in os.walk(root):
        entries += [(Path(parent) / d, True) for d in dirs] + [(Path(parent) / f, False) for f in files]
    for path, is_dir in entries:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
            continue
        wanted = dir_mode if is_dir else file_mode
        if stat.S_IMODE(info.st_mode) != wanted:
            os.chmod(path, wanted)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; see `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically: temp file in the same folder, fsync, rename, fsync folder.
    The file gets the mode a plain `open()` gives under the umask (`plain_file_mode`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), plain_file_mode())  # mkstemp's 0600, until complete
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never leave the temporary file behind, whatever interrupted the write.
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def strict_json(obj: Any, **options: Any) -> str:
    """`obj` as strict JSON (RFC 8259, which strict readers such as `jq` and browsers require): a NaN or an
    infinity, which Python would write as the bare words `NaN` / `Infinity`, is written as null."""
    return json.dumps(_finite(obj), allow_nan=False, ensure_ascii=False, **options)


def _finite(obj: JSONValue) -> JSONValue:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: JSONValue) -> Path:
    return atomic_write_text(path, strict_json(obj, indent=2) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[JSONValue]) -> Path:
    return atomic_write_text(path, "".join(strict_json(r) + "\n" for r in records))


def append_jsonl(path: str | os.PathLike, record: JSONValue) -> None:
    """Append one complete JSON line and fsync it (the resumable-stage write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


# A JSONL line is one problem, rollout or record: a line longer than this is a wrong file (or an attack), refused
# while it is read, before it costs more memory than the bound (the environment variable raises it)
MAX_LINE_ENV = "SGSD_MAX_LINE_MB"
DEFAULT_MAX_LINE_MB = 16


def max_line_bytes() -> int:
    """The JSONL line bound: `SGSD_MAX_LINE_MB` megabytes (default 16)."""
    return _megabytes_env(MAX_LINE_ENV, DEFAULT_MAX_LINE_MB)


def read_input_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of an input JSONL file from a user, read line by line
    with the checks of `read_input_bytes` (bounded, regular file), as UTF-8 (a leading byte-order mark is
    skipped); a line over `max_line_bytes()` is refused as soon as the bound is read, and a line that is not
    a JSON object is a one-line `DataError` naming the file and the line."""
    path = Path(path)
    check_input_file(path, what)
    limit, line_limit = max_input_bytes(), max_line_bytes()
    with _open_input(path, what) as handle:
        offset = 0
        for number in itertools.count(1):
            try:
                raw = handle.readline(line_limit + 1)
            except OSError as err:
                raise DataError(f"{what} {path}: cannot read ({err.strerror})") from None
            if not raw:
                return
            if len(raw) > line_limit and not raw.endswith(b"\n"):
                raise DataError(f"{what} {path}: line {number}: longer than the line bound of {line_limit / 1e6:g} MB "
                                f"(set {MAX_LINE_ENV} to raise it); not read further")
            line = decode_utf8(raw, str(path), first_line=number, offset=offset)
            offset += len(raw)
            if offset > limit:  # it grew after the check
                raise DataError(_too_large(path, what, offset, limit))
            if not line.strip():
                continue
            try:
                row = parse_json(line, f"{path}: line {number}")
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number}: invalid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object")
            yield number, row


def read_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = True) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file, one per non-empty line.

    A last line without its newline is what a crash during `append_jsonl` leaves: with
    `tolerate_torn_tail` it is skipped (the stage redoes that record); any other bad line is a
    `DataError` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            is_tail = number == len(lines) and not text.endswith("\n")
            if tolerate_torn_tail and is_tail:
                return
            raise DataError(f"{path}: line {number}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
        yield record


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line left without its newline by a crash, so the next record starts on its own line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        handle.truncate(data.rfind(b"\n") + 1)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported everywhere (e.g. Windows), where it is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
