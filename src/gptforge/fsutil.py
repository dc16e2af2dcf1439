"""Atomic file and directory writes, JSON files, SHA256SUMS: one of each for the package.

Writes: to a temporary name in the same directory, flush + fsync, rename over the final name
(atomic on POSIX), then fsync the directory so the rename itself is durable; a reader never sees
a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from gptforge.errors import GPTForgeError

TMP_PREFIX = ".tmp-"
SUMS = "SHA256SUMS"  # the format of coreutils' sha256sum: `cd DIR && sha256sum -c SHA256SUMS` checks it
_SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](\S.*)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename/creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success fsync it and rename it into place.

    On any exception the temporary file is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(final)  # a failed write or close (a full disk) names no file by itself
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `final`; on success fsync every file in it and
    rename it to `final` (which must not exist yet). On failure the temporary directory is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_file(p)
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_tmp(directory: str | os.PathLike) -> None:
    """Delete leftovers of writes that were interrupted (kill -9) in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob(TMP_PREFIX + "*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


_DIGESTS: dict[tuple, str] = {}  # (device, inode, size, mtime_ns, ctime_ns) -> sha256, this process only


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: str | os.PathLike, block: int = 1 << 24, progress=None) -> str:
    """The sha256 of a file, read in blocks into one buffer (hashlib releases the GIL, so threads
    hash in parallel). Remembered for this process while the file's inode, size, mtime and ctime
    stay the same: a checkpoint verified once (say by `--resume auto`) is not hashed again when it
    is loaded. `progress(n)` is called with the bytes of every block read."""
    import hashlib

    before = _stat_key(os.stat(path))
    if before in _DIGESTS:
        return _DIGESTS[before]
    h = hashlib.sha256()
    buf = bytearray(min(block, max(before[2], 1)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress is not None:
                progress(n)
    digest = h.hexdigest()
    if _stat_key(os.stat(path)) == before:  # not changed while it was read
        _DIGESTS[before] = digest
    return digest


def cache_root() -> Path:
    """The gptforge cache: $GPTFORGE_CACHE, else $XDG_CACHE_HOME/gptforge, else ~/.cache/gptforge.
    (Here at the bottom of the house so that device.py can cache its probe; data.prepare uses it too.)"""
    if os.environ.get("GPTFORGE_CACHE"):
        return Path(os.environ["GPTFORGE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "gptforge"
    return Path.home() / ".cache" / "gptforge"


# ---------------------------------------------------------------------------------------------
# JSON


def dumps_json(obj) -> str:
    """Deterministic JSON text (sorted keys, indented, a final newline)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as JSON atomically (temp name, fsync, rename), deterministically (sorted keys)."""
    atomic_write_text(path, dumps_json(obj))


def loads_object(text: str | bytes, where: str, expected: str = "a JSON object", hint: str = "") -> dict:
    """One JSON object from `text` (a line of a .jsonl file, say); not JSON, or JSON of another
    kind, is one GPTForgeError naming `where` and what was `expected` (`hint` follows a parse error)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise GPTForgeError(f"{where}: not valid JSON ({e.msg} at column {e.colno}){hint}") from e
    if not isinstance(obj, dict):
        raise GPTForgeError(f"{where}: expected {expected}, got {type(obj).__name__}")
    return obj


def read_json(path: str | os.PathLike, error: type[GPTForgeError] = GPTForgeError, hint: str = "") -> dict:
    """A JSON object from `path`; anything else (missing, unreadable, not JSON, not an object) is one
    `error` naming the file (FileNotFoundError passes through: callers say what a missing file means)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable or not JSON ({e}){hint}") from e
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}{hint}")
    return obj


# ---------------------------------------------------------------------------------------------
# SHA256SUMS


def sums_text(digests: dict[str, str]) -> str:
    """SHA256SUMS lines (`<sha256>  <name>`), sorted by name."""
    return "".join(f"{d}  {n}\n" for n, d in sorted(digests.items()))


def write_sums(directory: str | os.PathLike, digests: dict[str, str] | None = None,
               hasher: Callable[[list[Path]], list[str]] | None = None) -> None:
    """Write `directory`/SHA256SUMS: the given name -> sha256, else the sha256 of every file in the
    directory (by `hasher`, default one file after another). Callers write it last, inside their
    atomic directory."""
    directory = Path(directory)
    if digests is None:
        files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != SUMS)
        digests = dict(zip((p.name for p in files), (hasher or (lambda fs: [sha256_file(f) for f in fs]))(files)))
    (directory / SUMS).write_text(sums_text(digests), encoding="utf-8")


def _inside(name: str) -> bool:
    """A SHA256SUMS entry names a file of its own directory: relative, no `..`, no drive."""
    p = Path(name)
    return not (p.is_absolute() or name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name)
                or p.drive or "\0" in name)


def read_sums(directory: str | os.PathLike, error: type[GPTForgeError] = GPTForgeError) -> dict[str, str] | None:
    """name -> sha256 from `directory`/SHA256SUMS; None when there is none. Strict: every line is
    `<64 lowercase hex digits>  <name>` (or ` *<name>`, sha256sum's binary mode) with a name inside
    the directory (never absolute, never `..`); anything else is one `error` naming file and line."""
    path = Path(directory) / SUMS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable ({e})") from e
    sums: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        m = _SUM_LINE.match(line)
        if not m:
            raise error(f"{path}: line {i} is not '<64 hex digits>  FILE' ({line[:80]!r})")
        digest, name = m.groups()
        if not _inside(name):
            raise error(f"{path}: line {i} names {name[:80]!r}, a path outside {Path(directory)}; "
                        "a checksum file lists only files of its own directory")
        if name in sums:
            raise error(f"{path}: line {i} lists {name[:80]!r} a second time")
        sums[name] = digest
    return sums


# ---------------------------------------------------------------------------------------------
# paths read from files, and directories replaced on request


def inside(directory: str | os.PathLike, rel: str, where: str) -> Path:
    """`directory / rel` for a path read from a file (`where` names it): refused, in one line, when
    it is absolute, climbs out with `..`, or resolves (through symlinks) outside `directory`."""
    directory = Path(directory)
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise GPTForgeError(f"{where}: path {rel!r} is not a plain name inside {directory}; refusing to read it")
    path = directory / rel
    if not path.resolve().is_relative_to(directory.resolve()):
        raise GPTForgeError(f"{where}: path {rel!r} leads outside {directory} (a symlink); refusing to read it")
    return path


def _overlap(out: Path, src: Path) -> str | None:
    """How `out` and `src` overlap ('is', 'contains', 'is inside'), or None."""
    o, s = out.resolve(), src.resolve()
    if o == s:
        return "is"
    if o in s.parents:
        return "contains"
    if s in o.parents:
        return "is inside"
    return None


def replace_dir(target: str | os.PathLike, write, kind: str, is_kind, *, inputs=(), overwrite: bool = False) -> Path:
    """Write a directory of `kind` at `target` with `write(tmp_dir)`: into a fresh unique temporary
    directory beside it, fsynced, then renamed into place. With `overwrite` an existing `target`
    is replaced, but only when it is empty or `is_kind(target)` says it is a `kind` directory; the
    old one is moved to a fresh unique name of our own and removed only after the swap, so
    nothing the user named otherwise (`target.old`, say) is ever touched. An output that is,
    contains or is inside one of `inputs` is refused before anything is written."""
    target = Path(target).expanduser()
    for src in inputs:
        how = _overlap(target, Path(src))
        if how:
            raise GPTForgeError(f"{target}: the output {how} the input {src}; choose an output directory outside it")
    existed = target.exists() or target.is_symlink()
    if existed:
        if not overwrite:
            raise GPTForgeError(f"{target} already exists (pass --overwrite to replace it)")
        if target.is_symlink() or not target.is_dir():
            raise GPTForgeError(f"{target}: not a directory; not replacing it")
        if any(target.iterdir()) and not is_kind(target):
            raise GPTForgeError(f"{target}: not a {kind} directory (it holds other files); not replacing it: "
                                "remove it yourself or choose another output")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        write(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_file(p)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not existed:
        try:
            os.rename(tmp, target)  # fails if a non-empty target appeared meanwhile
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(target.parent)
        return target
    old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + target.name + ".old.", dir=target.parent))
    os.rename(target, old)  # onto our own empty directory: the old one now has a name no one else uses
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target
