"""Storage faults of a training run's checkpoint saves: watched, space-checked, failing cleanly.

Owns `WatchedManager` (built by `watched_manager`): the trainer's Orbax `CheckpointManager` with
the save side watched. `poll()` (every logged step; never blocks) notices a failed asynchronous
save as soon as the step after it is logged, instead of when the next save waits for it: through
Orbax's own report once the save has ended, and through the save's futures (`SaveWatch`) while
Orbax still waits at its cross-process barriers. A failed save (async or not) waits for the
save's other writers, removes its temporary step directory and raises one `StorageFault` that
names the step and the newest complete checkpoint a rerun resumes from; Orbax's background
threads then log nothing more about it (without `--debug`). With several processes they agree
(one small all-reduce at each logged step and after each save) and stop together. Before each
save the free space is compared with the size of the last checkpoint (the state's bytes for the
first): a warning, once, when the next save will not fit; `startup_space_check` sizes the whole
run's footprint (the first save and `checkpoint.keep` of them, plus the one being written).
Remote storage (`gs://`, `paths.py`): there is no free-space figure for a bucket, so the space
checks are skipped there, with one log line (`free_space`).
Does not own: the checkpoint layout and the restore decision (`checkpoint.py`, `resume.py`),
partial outputs of other commands (`staging.py`), the messages' exit statuses (`errors.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading

from meditron_jax.storage import paths
from meditron_jax.storage.workdir import Workdir
from meditron_jax.errors import StorageFault, format_bytes, free_bytes, storage_fault


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


class _ReportingFuture:
    """One future of a checkpoint save (`orbax.checkpoint.future.Future`: `result`, `cancel`)
    that tells `watch` the error it raised, whoever waits for it (Orbax's background thread)."""

    def __init__(self, future, watch: "SaveWatch"):
        self._future, self._watch = future, watch

    def result(self, timeout: float | None = None):
        try:
            return self._future.result(timeout=timeout)
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            raise  # a cancelled save did not fail
        except BaseException as e:
            self._watch.record_error(e)
            raise

    def cancel(self):
        return self._future.cancel()


class SaveWatch:
    """The futures of this process's checkpoint save and the first error one of them raised.

    Orbax reports a failed asynchronous save through `CheckpointManager.wait_until_finished`,
    which raises the save's error once the save has ended. In a multi-process run a process whose
    write failed does not get there for `AsyncOptions.timeout_secs`: Orbax's save thread first
    waits at cross-process barriers that the others pass only when every write is done. The
    futures each item's handler returns (`orbax_extension.watching`) fail at once on the process
    whose write failed, so its run can stop at the next logged step together with the others.
    (`check_for_errors`, the manager's non-blocking check, never sees the error: Orbax's own
    finalize thread takes it first, in orbax-checkpoint 0.12.8, and a caller that took it first
    would let that thread go on to delete older steps as if the save had committed.)"""

    def __init__(self):
        self.error: BaseException | None = None
        self._futures: list = []
        self._lock = threading.Lock()

    def handler(self, handler_cls: type):
        """The handler of a checkpoint item (`checkpoint.make_manager(handler=...)`)."""
        from meditron_jax.storage import orbax_extension
        return orbax_extension.watching(handler_cls, self._watch)

    def _watch(self, future) -> _ReportingFuture:
        with self._lock:
            self._futures.append(future)
        return _ReportingFuture(future, self)

    def record_error(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error

    def started(self) -> None:
        """A new save begins: forget the futures of the previous one (it committed)."""
        with self._lock:
            self._futures = []

    def settle(self, timeout_s: float) -> None:
        """Waits (at most `timeout_s`) until every future of the failed save has ended: a failed
        write's sibling writers (another item's metadata) must not find its directory removed."""
        import time

        deadline = time.monotonic() + timeout_s
        with self._lock:
            futures = list(self._futures)
        for f in futures:
            try:
                f.result(timeout=max(0.0, deadline - time.monotonic()))
            except BaseException:  # noqa: BLE001 - failed or still running: either way, done waiting
                pass


class _AfterFailedSave:
    """Once a save has failed and been reported in one line, drops the exception records Orbax's
    background threads still log about it (a sibling write finding the temporary directory
    removed, a barrier that times out); `--debug` shows them."""

    active = False

    def filter(self, record) -> bool:
        from meditron_jax.errors import debug_enabled

        if not (self.active and record.exc_info) or debug_enabled():
            return True
        tb = record.exc_info[2]  # raised in Orbax's code (the record's own pathname depends on
        while tb is not None:    # whether absl's logger class was installed before it was made)
            if "/orbax/" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


_AFTER_FAILED_SAVE = _AfterFailedSave()


def watched_manager(workdir: Workdir, state_bytes: int) -> "WatchedManager":
    """The trainer's checkpoint manager: Orbax's, saving through handlers a `SaveWatch` watches."""
    from meditron_jax.storage import checkpoint as ckpt

    watch = SaveWatch()
    return WatchedManager(ckpt.make_manager(workdir, handler=watch.handler), workdir, state_bytes, watch)


class WatchedManager:
    """An Orbax `CheckpointManager` whose saves are watched (see the module docstring). Every
    other attribute is the manager's own, so it stands in for the manager everywhere.
    `watch`: the `SaveWatch` whose handlers the manager saves with (`watched_manager`)."""

    def __init__(self, manager, workdir: Workdir | str, state_bytes: int, watch: SaveWatch | None = None):
        self._manager = manager
        self.workdir = Workdir.resolve(workdir)
        self.root = self.workdir.checkpoints
        self.state_bytes = int(state_bytes)
        self.watch = watch or SaveWatch()
        self.pending: int | None = None  # the step whose save may still be in flight
        self.last_size: int | None = None
        self.failed = False
        self.multi = False
        self._space_warned = False
        logger = logging.getLogger("absl")  # Orbax logs through absl
        if _AFTER_FAILED_SAVE not in logger.filters:
            logger.addFilter(_AFTER_FAILED_SAVE)
        _AFTER_FAILED_SAVE.active = False  # a new run: an earlier failed save is not this one's

    def __getattr__(self, name):
        return getattr(self._manager, name)

    # -- the watched operations --
    def save(self, step, *args, **kwargs):
        self.poll()  # a failed save in flight stops the run before Orbax blocks on it
        self._check_space(step)
        self.watch.started()
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
        failed = self.pending is not None and (self.watch.error is not None or (
            not self._manager.is_saving_in_progress() and not self._note_committed()))
        if _any_process(failed):
            raise self._fail(self.pending, self._save_error() if failed else None)

    def _save_error(self) -> BaseException | None:
        """Why this process's save failed: Orbax's own report once the save has ended
        (`wait_until_finished` then returns at once, raising the save's error), else the error
        its futures raised (`SaveWatch`: Orbax still waits at its barriers)."""
        if not self._manager.is_saving_in_progress():
            try:
                self._manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001 - the failed save's own error
                return e
        return self.watch.error

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
        _AFTER_FAILED_SAVE.active = True  # this line reports it; Orbax's threads need not, again
        # With several processes Orbax's save threads now wait at barriers that the failed
        # process never reaches (for 10 minutes): the CLI exits at once after the one line.
        self.multi = jax.process_count() > 1
        self.watch.settle(timeout_s=10.0)  # the failed save's other writers have stopped
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


def startup_space_check(workdir: Workdir | str, state_bytes: int, keep: int | None, saves: int,
                        existing_steps: int) -> None:
    """Warns (once, at start) when the checkpoints this run will hold at its peak do not fit:
    `keep` of them plus the one being written (all `saves` when keep is None), less the steps
    already there. Refusing when not even one fits is `train.check_workdir`'s job."""
    root = Workdir.resolve(workdir).checkpoints
    peak = saves if not keep else min(saves, keep + 1 - min(existing_steps, keep))
    need = max(1, peak) * int(state_bytes)
    free = free_space(root)
    if free is not None and free < need:
        _warn(f"{root} has {format_bytes(free)} free; this run's checkpoints need up to {format_bytes(need)} "
              f"({max(1, peak)} x {format_bytes(state_bytes)}: checkpoint.keep={keep} plus the one being written): "
              f"a later save may fail for lack of space")
