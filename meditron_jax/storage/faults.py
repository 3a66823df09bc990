"""Storage faults on the write side: outputs built under a temporary name that no dead run leaves
behind, and checkpoint saves that are watched, space-checked and fail cleanly.

Owns:
* `staging_dir(out, command)` / `commit_dir` / `discard_dir`: an output (an export, an imported
  checkpoint, a preprocessed directory) is built in a sibling `.NAME.partial-XXXX` and renamed to
  NAME when complete. While the run lives it holds a lock (`fcntl.lockf`, which NFS supports too)
  on `.NAME.partial-XXXX.lock`; a partial whose lock nobody holds was left by a run that died
  (SIGKILL, OOM, power loss) and is removed by the next run for the same destination, which says
  so in one line. A partial another live run is building is left alone.
* `WatchedManager`: the trainer's Orbax `CheckpointManager` with the save side watched. `poll()`
  (every logged step; never blocks) notices a failed asynchronous save as soon as the step after
  it is logged, instead of when the next save waits for it; a failed save (async or not) removes
  its temporary step directory and raises one `StorageFault` that names the step and the newest
  complete checkpoint a rerun resumes from. With several processes they agree (one small
  all-reduce at each logged step and after each save) and stop together. Before each save the
  free space is compared with the size of the last checkpoint (the state's bytes for the first):
  a warning, once, when the next save will not fit; `startup_space_check` sizes the whole run's
  footprint (the first save and `checkpoint.keep` of them, plus the one being written).
Remote storage (`gs://`, `paths.py`): there is no free-space figure for a bucket, so the space
checks are skipped there, with one log line (`free_space`).
Does not own: the checkpoint layout and the restore decision (`checkpoint.py`), the messages'
exit statuses (`errors.py`).
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
from meditron_jax.errors import (SPACE_ERRNOS, StorageFault, UserError, format_bytes, free_bytes,
                                 storage_fault)

PARTIAL = ".partial-"
LOCK_SUFFIX = ".lock"
_HELD: dict[str, int] = {}  # partial dir -> fd of its held lock (this process)
_HELD_LOCK = threading.Lock()


# ---- outputs built under a temporary name --------------------------------------------------
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


# ---- checkpoint saves ----------------------------------------------------------------------------
_REMOTE_SPACE_NOTED: set[str] = set()


def free_space(path) -> int | None:
    """Free bytes where `path` lives; None when unknown. For remote storage (an object store has no
    free-space figure) None, and the space checks that use it are skipped, said once per path."""
    if paths.is_remote(path):
        if path not in _REMOTE_SPACE_NOTED:
            _REMOTE_SPACE_NOTED.add(path)
            import jax
            if jax.process_index() == 0:
                from meditron_jax import console
                console.log.info(f"free-space checks skipped for {path} (remote storage has no free-space figure)")
        return None
    return free_bytes(path)


def _warn(msg: str) -> None:
    import jax
    if jax.process_index() == 0:
        print(f"meditron-jax train: warning: {msg}", file=sys.stderr, flush=True)


def _any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (a blocking all-reduce; one process: no-op)."""
    import jax
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))))


_BACKGROUND_ERRORS: list[BaseException] = []  # failed background saves of this process


class _BackgroundSaveErrors:
    """Records the error of a failed background save as Orbax logs it ('Failed to run ... in
    background save thread', with the exception). With several processes Orbax's own failure
    report waits for barriers the failed process never reaches (its timeout is 10 minutes);
    the log record is the one prompt, public trace of it."""

    def filter(self, record) -> bool:
        if record.exc_info and record.exc_info[1] is not None and "background save thread" in str(record.msg):
            _BACKGROUND_ERRORS.append(record.exc_info[1])
        return True


def _record_background_errors() -> None:
    import logging

    logger = logging.getLogger("absl")
    if not any(isinstance(f, _BackgroundSaveErrors) for f in logger.filters):
        logger.filters.insert(0, _BackgroundSaveErrors())  # before filters that drop the record
    if logger.getEffectiveLevel() > logging.ERROR:
        logger.setLevel(logging.ERROR)


class WatchedManager:
    """An Orbax `CheckpointManager` whose saves are watched (see the module docstring). Every
    other attribute is the manager's own, so it stands in for the manager everywhere."""

    def __init__(self, manager, workdir: str, state_bytes: int):
        from meditron_jax.storage import checkpoint as ckpt

        self._manager = manager
        self.workdir = workdir
        self.root = ckpt.checkpoint_dir(workdir)
        self.state_bytes = int(state_bytes)
        self.pending: int | None = None  # the step whose save may still be in flight
        self.last_size: int | None = None
        self.failed = False
        self.multi = False
        self._space_warned = False
        _record_background_errors()
        del _BACKGROUND_ERRORS[:]

    def __getattr__(self, name):
        return getattr(self._manager, name)

    # -- the watched operations --
    def save(self, step, *args, **kwargs):
        self.poll()  # a failed save in flight stops the run before Orbax blocks on it
        self._check_space(step)
        error = None
        try:
            result = self._manager.save(step, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below
            error = e
        if _any_process(error is not None):
            # Orbax waits for the previous save inside save(): its failure surfaces here
            failed_step = self.pending if self.pending is not None and not self._committed(self.pending) else step
            raise self._fail(failed_step, error)
        self.pending = step
        self._note_committed()
        return result

    def poll(self) -> None:
        """At a logged step: has the save in flight failed? Never blocks on a running save."""
        failed = bool(_BACKGROUND_ERRORS) and self.pending is not None
        if not failed and self.pending is not None and not self._manager.is_saving_in_progress():
            failed = not self._note_committed()
        if _any_process(failed):
            error = None
            if _BACKGROUND_ERRORS:
                error = _BACKGROUND_ERRORS[0]
            elif failed:
                try:  # the save has finished (failed): this returns at once, raising its error
                    self._manager.wait_until_finished()
                except Exception as e:  # noqa: BLE001
                    error = e
            raise self._fail(self.pending, error)

    def wait_until_finished(self):
        if self.failed:
            return  # already reported
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            if self.pending is None:
                raise
            raise self._fail(self.pending, e) from None
        self._note_committed()

    def close(self):
        if self.failed:
            return  # its failed save was reported; nothing else is outstanding
        self.wait_until_finished()
        self._manager.close()

    # -- helpers --
    def _committed(self, step: int) -> bool:
        from meditron_jax.storage import checkpoint as ckpt
        from meditron_jax.storage import paths
        return ckpt.is_complete(paths.join(self.root, str(step)))

    def _note_committed(self) -> bool:
        """If the pending step has committed: record its size, clear it, True."""
        if self.pending is None or self._manager.is_saving_in_progress() or not self._committed(self.pending):
            return False
        self.last_size = paths.tree_bytes(paths.join(self.root, str(self.pending)))
        self.pending = None
        return True

    def _check_space(self, step: int) -> None:
        if self._space_warned:
            return
        need = self.last_size or self.state_bytes
        free = free_space(self.root)
        if free is not None and need and free < need:
            self._space_warned = True
            what = "the last checkpoint took" if self.last_size else "the train state is"
            _warn(f"{self.root} has {format_bytes(free)} free and {what} {format_bytes(need)}: the checkpoint "
                  f"at step {step} will probably not fit (free space, or lower checkpoint.keep)")

    def _fail(self, step: int, error: BaseException | None) -> BaseException:
        """Cleans up after the failed save of `step`; the exception to raise."""
        import jax

        from meditron_jax.storage import checkpoint as ckpt

        self.failed = True
        # With several processes Orbax's save threads now wait at barriers that the failed
        # process never reaches (for 10 minutes): the CLI exits at once after the one line.
        self.multi = jax.process_count() > 1
        removed = True
        if jax.process_index() == 0:
            removed = _remove_temporaries(self.root, step)
        steps = ckpt.complete_steps(self.root)
        if steps:
            resume = f"the newest complete checkpoint is still step {steps[-1]}: a rerun resumes from it"
        else:
            resume = "no checkpoint was completed: a rerun starts from step 0"
        kept = "its temporary files were removed" if removed else "its temporary files could not all be removed"
        hint = f"the checkpoint at step {step} was not saved ({kept}); {resume}"
        operation = f"checkpoint save at step {step} to"
        if error is None:  # this process's save went through, another's did not (that one names the cause)
            return _exit_now(PeerSaveFailed(operation, self.root, 0, hint=f"it failed on another process; {hint}"),
                             self.multi)
        fault = storage_fault(error, operation, None, needed=self.last_size or self.state_bytes, hint=hint)
        if fault is None:
            return error  # not the environment: a bug keeps its traceback
        return _exit_now(StorageFault(operation, self.root, fault.errno, needed=fault.needed, hint=hint,
                                      detail=f"{fault.path or ''} {fault.detail}".strip()), self.multi)


def _exit_now(fault: StorageFault, flag: bool) -> StorageFault:
    fault.exit_now = flag  # the CLI ends the process with os._exit after printing it
    return fault


def _remove_temporaries(root: str, step: int, timeout_s: float = 10.0) -> bool:
    """Removes `root/<step>.orbax-checkpoint-tmp*`; the failed save's sibling writes may still be
    landing for a moment (a synchronous save raises at its first failed write), so retry until
    they are gone. True when nothing is left."""
    import time

    from meditron_jax.storage import checkpoint as ckpt
    from meditron_jax.storage import paths

    step_dir = paths.join(root, str(step))  # on GCS Orbax writes the final name and commits by a marker file
    if paths.is_remote(root) and paths.exists(step_dir) and not ckpt.is_complete(step_dir):
        paths.rmtree(step_dir)
    deadline = time.monotonic() + timeout_s
    empty = 0
    while True:
        left = paths.glob(root, f"{step}.orbax-checkpoint-tmp*")
        for tmp in left:
            paths.rmtree(tmp)
        empty = 0 if left else empty + 1
        if empty == 2:  # gone, and still gone a moment later
            return True
        if time.monotonic() > deadline:
            return not paths.glob(root, f"{step}.orbax-checkpoint-tmp*")
        time.sleep(0.1)


class PeerSaveFailed(StorageFault):
    """A multi-process save failed on another process (which prints the OS error)."""

    def _message(self) -> str:
        return f"{self.operation} {self.path}: {self.hint}"


def startup_space_check(workdir: str, state_bytes: int, keep: int | None, saves: int, existing_steps: int) -> None:
    """Warns (once, at start) when the checkpoints this run will hold at its peak do not fit:
    `keep` of them plus the one being written (all `saves` when keep is None), less the steps
    already there. Refusing when not even one fits is `train.check_workdir`'s job."""
    from meditron_jax.storage import checkpoint as ckpt

    root = ckpt.checkpoint_dir(workdir)
    peak = saves if not keep else min(saves, keep + 1 - min(existing_steps, keep))
    need = max(1, peak) * int(state_bytes)
    free = free_space(root)
    if free is not None and free < need:
        _warn(f"{root} has {format_bytes(free)} free; this run's checkpoints need up to {format_bytes(need)} "
              f"({max(1, peak)} x {format_bytes(state_bytes)}: checkpoint.keep={keep} plus the one being written): "
              f"a later save may fail for lack of space")
