"""The error types every command shares, and the exit statuses they map to.

* `UserError`: a problem with the user's input (bad path, bad config, bad file). The CLI prints it
  as one line on stderr and exits with status 2.
* `StorageFault`: the environment failed a writer or a reader (a full disk or quota, an I/O error,
  a read-only or forbidden filesystem: ENOSPC, EDQUOT, EIO, EROFS, EACCES). The CLI prints one line
  naming the operation, the path and the OS error (for space: the bytes needed and free where they
  are known) and exits with status 74 (`EXIT_STORAGE`, sysexits.h's EX_IOERR), distinct from user
  errors (2), the trainer's non-finite stop (3) and preemption (75).
  `storage_fault(exc, operation, path)` recognises such a fault in any exception, whatever raised
  it: Python's `OSError`s, tensorstore's (Orbax's) `ValueError`s carrying `os_error_code`, Riegeli's
  (ArrayRecord's) `RuntimeError`s carrying the OS message.

Anything else is a bug and keeps its traceback. A traceback of the two kinds above is printed
only with `--debug` or `MEDITRON_JAX_DEBUG=1` (`debug_enabled`).
"""

from __future__ import annotations

import errno as _errno
import os
import re
import shutil

EXIT_USER = 2
EXIT_BAD_STEPS = 3  # train: train.max_bad_steps non-finite steps in a row, or a non-finite state to save
EXIT_STORAGE = 74  # sysexits.h EX_IOERR
DEBUG_ENV = "MEDITRON_JAX_DEBUG"

# The environment faults, by errno. EDQUOT is missing on some platforms.
FAULT_ERRNOS = tuple(e for e in (_errno.ENOSPC, getattr(_errno, "EDQUOT", None), _errno.EIO, _errno.EROFS,
                                 _errno.EACCES) if e is not None)
SPACE_ERRNOS = tuple(e for e in (_errno.ENOSPC, getattr(_errno, "EDQUOT", None)) if e is not None)


class UserError(Exception):
    """A problem with the user's input; the message names the value or file at fault."""


class StorageFault(Exception):
    """An OS-level storage failure of a writer (or reader): one line naming operation, path, error.

    `operation` says what was being done ("checkpoint save at step 6", "export", "write metrics"),
    `path` where; `needed` / `free` are bytes (None when unknown; `free` is measured on the
    filesystem of `path` when not given); `hint` ends the line (what was kept, what to do)."""

    def __init__(self, operation: str, path: str | None, errno: int, needed: int | None = None,
                 free: int | None = None, hint: str = "", detail: str = ""):
        self.operation, self.path, self.errno = operation, path, errno
        self.needed = needed
        self.free = free if free is not None or errno not in SPACE_ERRNOS or not path else free_bytes(path)
        self.hint, self.detail = hint, detail
        super().__init__(self._message())

    def _message(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        msg = f"{self.operation}"
        if self.path:
            msg += f" {self.path}"
        msg += f": {os.strerror(self.errno)} ({name})"
        space = []
        if self.needed is not None:
            space.append(f"needs {format_bytes(self.needed)}")
        if self.free is not None:
            space.append(f"{format_bytes(self.free)} free")
        if space:
            msg += f"; {', '.join(space)}"
        if self.hint:
            msg += f"; {self.hint}"
        return msg

    def remeasured(self) -> "StorageFault":
        """The same fault with the free space measured now (after the failed command removed its
        partial output: what the user has to work with)."""
        if self.errno not in SPACE_ERRNOS or not self.path:
            return self
        fault = StorageFault(self.operation, self.path, self.errno, self.needed, None, self.hint, self.detail)
        fault.__dict__.update({k: v for k, v in self.__dict__.items() if k not in fault.__dict__})
        return fault

    def with_context(self, operation: str | None = None, hint: str | None = None,
                     needed: int | None = None) -> "StorageFault":
        """The same fault, re-described by a caller that knows more (the step, what was kept)."""
        return StorageFault(operation or self.operation, self.path, self.errno,
                            needed if needed is not None else self.needed, self.free,
                            hint if hint is not None else self.hint, self.detail)


# -- recognising a fault ---------------------------------------------------------------------------
_OS_CODE = re.compile(r"os_error_code='?(\d+)'?|\[Errno (\d+)\]")
_PATHS = (re.compile(r'Failed (?:writing|reading|to open|to create)[^"]*"([^"]+)"'),
          re.compile(r'local file "([^"]+)"'),
          re.compile(r"(?:writing|reading|opening) (/[^;:,\s]+)"))


def _chain(exc: BaseException):
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def fault_errno(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, path or None) when `exc` (or what caused it) is an environment fault, else None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in FAULT_ERRNOS:
            return e.errno, e.filename
    for e in _chain(exc):
        text = str(e)
        code = None
        for m in _OS_CODE.finditer(text):
            n = int(m.group(1) or m.group(2))
            if n in FAULT_ERRNOS:
                code = n
                break
        if code is None:
            code = next((n for n in FAULT_ERRNOS if os.strerror(n) in text), None)
        if code is not None:
            path = next((m.group(1) for p in _PATHS for m in [p.search(text)] if m), None)
            return code, path
    return None


def storage_fault(exc: BaseException, operation: str, path: str | None = None, needed: int | None = None,
                  hint: str = "") -> StorageFault | None:
    """`exc` as a `StorageFault` (an existing one gets `operation` only if it has none), or None
    when it is not an environment fault. `path` defaults to the one the OS error names."""
    if isinstance(exc, StorageFault):
        return exc
    found = fault_errno(exc)
    if found is None:
        return None
    code, where = found
    return StorageFault(operation, path or where, code, needed=needed, hint=hint,
                        detail=" ".join(str(exc).split())[:300])


class storage_faults:
    """Context manager: an environment fault raised inside becomes a `StorageFault` naming
    `operation` and `path`; other exceptions pass unchanged.

        with storage_faults("export", out, needed=total_bytes):
            ...
    """

    def __init__(self, operation: str, path: str | None = None, needed: int | None = None, hint: str = ""):
        self.operation, self.path, self.needed, self.hint = operation, path, needed, hint

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, (StorageFault, UserError)) or not isinstance(exc, Exception):
            return False
        fault = storage_fault(exc, self.operation, self.path, self.needed, self.hint)
        if fault is None:
            return False
        raise fault from exc


# -- space -----------------------------------------------------------------------------------------
def existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int | None:
    """Bytes available to this user on the filesystem holding `path` (or its nearest existing
    parent); None when it cannot be measured."""
    try:
        return shutil.disk_usage(existing_parent(path)).free
    except OSError:
        return None


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _FaultRecordFilter:
    """Drops log records that report an environment fault (Orbax's background threads log each
    failed write with a traceback, several times; asyncio adds 'exception was never retrieved')."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (fault_errno(exc) is not None or _late_work(exc)):
            return False
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return fault_errno(Exception(text)) is None


def _late_work(exc: BaseException) -> bool:
    """Sibling work of a failed write that ran after its asyncio loop and executor were shut
    down (what a failed synchronous Orbax save leaves running)."""
    return any(isinstance(e, RuntimeError) and ("cannot schedule new futures after shutdown" in str(e)
                                                or "Event loop is closed" in str(e)) for e in _chain(exc))


def quiet_fault_logs() -> None:
    """Installs the filter on the loggers Orbax, tensorstore's asyncio glue and JAX log through
    (once); the CLI then reports the fault in its one line."""
    import logging

    for name in ("absl", "asyncio", "jax", "orbax"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _FaultRecordFilter) for f in logger.filters):
            logger.addFilter(_FaultRecordFilter())
    quiet_late_callbacks()


def _late_callback(exc: BaseException | None, tb) -> bool:
    """tensorstore completing a write whose asyncio loop is gone (Orbax closed it after a sibling
    write failed): `call_soon_threadsafe` raises 'Event loop is closed', printed from C++."""
    if not (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)):
        return False
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def quiet_late_callbacks() -> None:
    """After a failed write, its sibling writes still finish, and each prints 'RuntimeError: Event
    loop is closed' with a traceback (through sys.unraisablehook); drop just those reports."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_meditron_late", False):
        return

    def hook(unraisable):
        if not _late_callback(unraisable.exc_value, unraisable.exc_traceback):
            previous(unraisable)
    hook._meditron_late = True
    sys.unraisablehook = hook
