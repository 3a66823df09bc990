"""Outputs built under a temporary name that no dead run leaves behind (storage faults on the
write side of preprocess, export and import).

Owns `staging_dir(out, command)` / `commit_dir` / `discard_dir`: an output (an export, an
imported checkpoint, a preprocessed directory) is built in a sibling `.NAME.partial-XXXX` and
renamed to NAME when complete. While the run lives it holds a lock (`fcntl.lockf`, which NFS
supports too) on `.NAME.partial-XXXX.lock`; a partial whose lock nobody holds was left by a run
that died (SIGKILL, OOM, power loss) and is removed by the next run for the same destination,
which says so in one line. A partial another live run is building is left alone. Outputs are
local (or mounted) directories: a URL is refused in one line (`local_output`).
Does not own: the training run's checkpoint saves (faults.py), the messages' exit statuses
(`errors.py`).
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import socket
import sys
import tempfile
import threading

from meditron_jax.storage import paths
from meditron_jax.errors import SPACE_ERRNOS, UserError, format_bytes, storage_fault

PARTIAL = ".partial-"
LOCK_SUFFIX = ".lock"
_HELD: dict[str, int] = {}  # partial dir -> fd of its held lock (this process)
_HELD_LOCK = threading.Lock()



def _prefix(out: str) -> str:
    return f".{os.path.basename(os.path.abspath(out))}{PARTIAL}"


def _lock_is_free(lock_path: str) -> bool:
    """True when no live process holds the lock of `lock_path` (or the file is gone)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # cannot tell: leave it alone
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def remove_stale_partials(out: str, command: str, legacy_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Removes the partial outputs for `out` that dead runs left next to it (no live lock), and
    says so in one line on stderr; returns what was removed. `legacy_prefixes`: other temporary
    names this command used before (e.g. preprocess's `.NAME.tmp-`)."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    name = os.path.basename(out)
    patterns = [_prefix(out) + "*"] + [f".{name}{p}*" for p in legacy_prefixes]
    candidates = sorted({p for pat in patterns for p in glob.glob(os.path.join(glob.escape(parent), pat))})
    removed, freed = [], 0
    with _HELD_LOCK:
        held = set(_HELD)
    for path in candidates:
        if path.endswith(LOCK_SUFFIX):
            if not os.path.exists(path[:-len(LOCK_SUFFIX)]) and path[:-len(LOCK_SUFFIX)] not in held \
                    and _lock_is_free(path):
                _unlink(path)  # a lock without its directory: a run that died between the two
            continue
        if path in held or not _lock_is_free(path + LOCK_SUFFIX):
            continue  # another live run (or this one) is building it
        size = paths.tree_bytes(path) if os.path.isdir(path) else os.path.getsize(path)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _unlink(path)
        if not os.path.exists(path):
            _unlink(path + LOCK_SUFFIX)
            removed.append(path)
            freed += size
    if removed:
        names = ", ".join(os.path.basename(p) for p in removed)
        print(f"meditron-jax {command}: removed {len(removed)} partial output(s) of {out} left by an earlier run "
              f"that did not finish ({names}; {format_bytes(freed)} freed)", file=sys.stderr, flush=True)
    return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def local_output(out: str) -> str:
    """`out` unchanged when it is a local path; a URL (gs://, file://) is refused in one line
    (exit 2) instead of becoming a local `gs:/bucket` directory: call before `os.path.abspath`."""
    if "://" in str(out):
        raise UserError(f"output {out}: a URL is not supported for outputs (they are built under a temporary "
                        f"name and renamed); write to a local or mounted directory")
    return out


def staging_dir(out: str, command: str, legacy_prefixes: tuple[str, ...] = ()) -> str:
    """A fresh, locked temporary sibling of `out` to build it in (after removing dead runs'
    partials for the same destination). Release it with `commit_dir` or `discard_dir`.
    Outputs are local (or mounted) directories: a URL is refused, never made a local `gs:/` dir."""
    out = os.path.abspath(local_output(out))
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_partials(out, command, legacy_prefixes)
        fd, lock_path = tempfile.mkstemp(prefix=_prefix(out), suffix=LOCK_SUFFIX, dir=parent)
    except OSError as e:
        raise _creation_error(e, command, out) from None
    tmp = lock_path[:-len(LOCK_SUFFIX)]
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        os.mkdir(tmp, 0o700)
    except OSError as e:
        os.close(fd)
        _unlink(lock_path)
        raise _creation_error(e, command, out) from None
    with _HELD_LOCK:
        _HELD[tmp] = fd
    return tmp


def _creation_error(e: OSError, command: str, out: str) -> Exception:
    """A destination that cannot be written at all (read-only, forbidden, not a directory) is the
    user's choice to fix, like a read-only workdir: exit 2. A full disk or an I/O error: 74."""
    import errno

    if e.errno in SPACE_ERRNOS + (errno.EIO,):
        return storage_fault(e, "creating the output", out)
    return UserError(f"cannot create output next to {out}: {e.strerror}")


def _release(tmp: str) -> None:
    with _HELD_LOCK:
        fd = _HELD.pop(os.path.abspath(tmp), None)
    _unlink(os.path.abspath(tmp) + LOCK_SUFFIX)
    if fd is not None:
        os.close(fd)


def discard_dir(tmp: str) -> None:
    """Removes a partial output of this run (on any failure) and releases its lock."""
    shutil.rmtree(tmp, ignore_errors=True)
    _release(tmp)


def commit_dir(tmp: str, out: str, sync=None) -> None:
    """Puts the finished `tmp` at `out` (an old `out` is moved aside, then removed), then
    releases the lock. `sync(tmp)` runs first (to make the data durable before it is visible)."""
    out = os.path.abspath(out)
    if sync is not None:
        sync(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # made private while partial
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "x"))
    os.rename(tmp, out)
    _release(tmp)
    if old:
        shutil.rmtree(old, ignore_errors=True)
