"""A run's directory: its layout (`Workdir`) and the lock that makes one run own it.

Owns:
- `Workdir`: every path of a run, local or `gs://` (through `paths.py`), in one place. The layout
  is a contract (existing workdirs keep working):
      WORKDIR/checkpoints/<step>/        Orbax checkpoints (storage/checkpoint.py)
      WORKDIR/checkpoints_unreadable/    steps a resume set aside (unreadable or incomplete)
      WORKDIR/checkpoints_superseded/    steps newer than `--resume_step N`, set aside
      WORKDIR/metrics.jsonl              one JSON record per logged step
      WORKDIR/metrics.dropped.jsonl      records a resume moved out of metrics.jsonl
      WORKDIR/config.gin                 the operative gin config
      WORKDIR/run.lock                   the run lock (below)
      WORKDIR/tensorboard/               TensorBoard events
      WORKDIR/profile/                   profiler traces (`train.profile_steps`)
      WORKDIR/demo_data/                 the demo corpus (`data.demo = True`, local workdirs)
  `Workdir.resolve(text)` turns the user's `--workdir` (a local path, `file:///abs`, `gs://...`)
  into one, refusing what cannot be written in one line before anything runs. Functions that
  take a workdir from outside the package (`train()`, the listing, the lock, the checkpoint
  manager, the metrics writer) accept a `Workdir` or that text; everything inside passes the
  `Workdir` on.
- `RunLock`: `WORKDIR/run.lock`, a JSON file naming host, pid, start time and a heartbeat
  (rewritten every `heartbeat_s` by a daemon thread). It is created with O_CREAT|O_EXCL, so of
  two runs starting together exactly one gets it. A second run refuses in one line naming the
  holder. On remote storage (gs://, `paths.py`) there is no O_EXCL: the lock is created if
  absent, then read back after `REMOTE_SETTLE_S` (of two runs writing it together the last
  write wins and the other sees a token not its own and refuses), and kept by the same
  heartbeat. A lock is stale, and taken over with a warning, when its pid is dead on this host,
  or when its heartbeat is older than `stale_after_s` (a run on another host that died), or
  when it is unreadable and older than that. Multi-host: process 0 holds it and all processes
  learn the outcome (`acquire_for_run`), so a refused start stops every process.
- `releases_lock`: a decorator that releases the locks a call acquired, however it ends.
Does not own: what is written inside (checkpoint.py, training/metrics.py), which checkpoint a
run resumes from (resume.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import socket
import threading
import time
import uuid

from meditron_jax.storage import paths
from meditron_jax.errors import UserError

STALE_AFTER_S = 600.0
HEARTBEAT_S = 30.0
REMOTE_SETTLE_S = 1.0  # remote lock: how long a fresh lock is left before it is read back


class WorkdirLocked(UserError):
    """Another live run owns the workdir."""


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Every path of one run (module docstring). `root`: an absolute local path or a `gs://` URL."""

    root: str

    CHECKPOINTS = "checkpoints"
    UNREADABLE = "checkpoints_unreadable"
    SUPERSEDED = "checkpoints_superseded"
    METRICS = "metrics.jsonl"
    METRICS_DROPPED = "metrics.dropped.jsonl"
    CONFIG = "config.gin"
    LOCK = "run.lock"
    TENSORBOARD = "tensorboard"
    PROFILE = "profile"
    DEMO_DATA = "demo_data"

    @classmethod
    def resolve(cls, workdir: "Workdir | str | os.PathLike") -> "Workdir":
        """The user's text (a local path, a `file://` URL, a `gs://` URL where its filesystem
        package is installed: `paths.resolve`) as a `Workdir`; a `Workdir` is returned as is.
        Anything else is refused in one line, and nothing is created (no local `gs:/bucket`)."""
        if isinstance(workdir, Workdir):
            return workdir
        return cls(paths.absolute(paths.resolve(os.fspath(workdir), "workdir")))

    def __str__(self) -> str:
        return self.root

    def _join(self, *parts) -> str:
        return paths.join(self.root, *parts)

    @property
    def remote(self) -> bool:
        return paths.is_remote(self.root)

    @property
    def checkpoints(self) -> str:
        return self._join(self.CHECKPOINTS)

    def step_dir(self, step: int) -> str:
        return self._join(self.CHECKPOINTS, str(step))

    @property
    def unreadable(self) -> str:
        """Where a resume moves unreadable and incomplete checkpoint steps (the quarantine)."""
        return self._join(self.UNREADABLE)

    @property
    def superseded(self) -> str:
        return self._join(self.SUPERSEDED)

    @property
    def metrics(self) -> str:
        return self._join(self.METRICS)

    @property
    def metrics_dropped(self) -> str:
        return self._join(self.METRICS_DROPPED)

    @property
    def config_gin(self) -> str:
        return self._join(self.CONFIG)

    @property
    def lock(self) -> str:
        return self._join(self.LOCK)

    @property
    def tensorboard(self) -> str:
        return self._join(self.TENSORBOARD)

    @property
    def profile(self) -> str:
        return self._join(self.PROFILE)

    @property
    def demo_data(self) -> str:
        return self._join(self.DEMO_DATA)


def _now_iso(t: float | None = None) -> str:
    return datetime.datetime.fromtimestamp(time.time() if t is None else t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%SZ")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


_held: dict[str, "RunLock"] = {}  # token -> lock, the locks this process holds
_call_stack = threading.local()


class RunLock:
    def __init__(self, workdir: Workdir | str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
                 command: str = "train"):
        self.workdir = Workdir.resolve(workdir)
        self.path = self.workdir.lock
        self.remote = self.workdir.remote
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.token = uuid.uuid4().hex
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now_iso(now),
                       "heartbeat": now, "heartbeat_utc": _now_iso(now), "command": command, "token": self.token}
        self._stop = threading.Event()
        self._thread = None

    # -- acquiring -------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        paths.makedirs(self.workdir.root)
        for _ in range(3):
            try:
                if self.remote:
                    self._create_remote()
                    break
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                reason = self._stale_reason(holder)
                if reason is None:
                    raise WorkdirLocked(self._refusal(holder)) from None
                from meditron_jax import console
                console.log.warning(f"taking over the stale lock of workdir {self.workdir} ({reason})")
                self._write(replace=True)
                time.sleep(0.05)  # two runs taking over together: the last write wins, the other sees it
                if (self._read() or {}).get("token") != self.token:
                    raise WorkdirLocked(self._refusal(self._read())) from None
                break
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.record, f)
                    f.flush()
                    os.fsync(f.fileno())
                break
        else:  # pragma: no cover - the lock keeps vanishing and reappearing
            raise WorkdirLocked(f"workdir {self.workdir}: cannot take its lock {self.path}")
        _held[self.token] = self
        stack = getattr(_call_stack, "locks", None)
        if stack is not None:
            stack.append(self)
        self._thread = threading.Thread(target=self._beat, name="meditron-jax-workdir-lock", daemon=True)
        self._thread.start()
        return self

    def _create_remote(self):
        """Create-if-absent without O_EXCL: write, wait, read back; FileExistsError when another
        run's lock is there (before or after our write)."""
        if paths.exists(self.path):
            raise FileExistsError(self.path)
        self._write(replace=False)
        time.sleep(REMOTE_SETTLE_S)
        if (self._read() or {}).get("token") != self.token:
            raise FileExistsError(self.path)  # another run wrote after us: theirs

    def _read(self) -> dict | None:
        try:
            data = json.loads(paths.read_text(self.path))
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _stale_reason(self, holder: dict | None) -> str | None:
        if holder is None:
            mtime = paths.mtime(self.path)
            if mtime is None:
                return "it vanished"
            age = time.time() - mtime
            return f"unreadable lock file, {age:.0f} s old" if age > min(self.stale_after_s, 10.0) else None
        if holder.get("token") in _held:
            return None  # held by a live lock of this very process: refuse like any other holder
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int):
            if pid == os.getpid():
                return f"left by an earlier run in this process (pid {pid})"
            if not _pid_alive(pid):
                return f"pid {pid} on {host} is not running"
        beat = holder.get("heartbeat")
        if isinstance(beat, (int, float)) and time.time() - beat > self.stale_after_s:
            return (f"no heartbeat from {host} pid {pid} since {holder.get('heartbeat_utc', _now_iso(beat))}, "
                    f"more than {self.stale_after_s:.0f} s")
        return None

    def _refusal(self, holder: dict | None) -> str:
        if holder is None:
            return (f"workdir {self.workdir} is locked by {self.path} (unreadable; if no run uses it, remove it)")
        return (f"workdir {self.workdir} is in use by another run: host {holder.get('host')} pid {holder.get('pid')}, "
                f"started {holder.get('started')}, last heartbeat {holder.get('heartbeat_utc')} ({self.path}; "
                f"it is taken over once that pid is gone or after {self.stale_after_s:.0f} s without a heartbeat)")

    def _write(self, replace: bool):
        paths.write_text(self.path, json.dumps(self.record))  # whole: a temporary name and a rename locally

    # -- holding ---------------------------------------------------------------------------
    def _beat(self):
        while not self._stop.wait(self.heartbeat_s):
            if (self._read() or {}).get("token") != self.token:
                return  # someone took it over (we were declared stale): never write over theirs
            now = time.time()
            self.record.update(heartbeat=now, heartbeat_utc=_now_iso(now))
            try:
                self._write(replace=True)
            except Exception:  # noqa: BLE001 - a missed beat (full disk, network): the next one retries
                pass

    def release(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if _held.pop(self.token, None) is not None and (self._read() or {}).get("token") == self.token:
            try:
                paths.remove(self.path)
            except Exception:  # noqa: BLE001 - left behind: stale once its heartbeat is old
                pass


def releases_lock(fn):
    """Releases every `RunLock` acquired during the call to `fn`, on any exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outer = getattr(_call_stack, "locks", None)
        _call_stack.locks = []
        try:
            return fn(*args, **kwargs)
        finally:
            for lock in reversed(_call_stack.locks):
                lock.release()
            _call_stack.locks = outer
    return wrapper


def acquire_for_run(workdir: Workdir, **kwargs) -> RunLock | None:
    """Process 0 takes the lock; every process learns whether it got it (one device broadcast
    when there are several), so a refused start stops all of them with exit 2."""
    import jax

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock(workdir, **kwargs).acquire()
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            raise WorkdirLocked(f"workdir {workdir}: process 0 could not take the workdir lock (see its log)")
    if error is not None:
        raise error
    return lock
