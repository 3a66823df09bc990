"""Compile worker processes for `plan --search`: each task gets a time limit, and a worker that
hangs or dies becomes one failed row instead of the end of the search.

Owns: the worker processes (spawned; each runs an `init` once, then one task at a time), the
per-task time limit (a worker over it is killed and replaced), a worker's death (an XLA check
failure aborts the whole process: its own stderr, kept in a temporary file, gives the row its
reason), and stopping every worker when the caller stops. Does not own: what a task is or
does (`plan.search.evaluate`).

`multiprocessing.Pool` cannot do this: it cannot stop one task, and a worker that aborts loses
its task, so `imap` waits forever (a 100-layout search once stopped at 94 rows so).
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import shutil
import signal
import tempfile
import time
from typing import Callable, Iterable, Iterator


class Failure(str):
    """A task that did not return: why (the time limit, the worker's death, an exception)."""


def run_tasks(tasks: Iterable, fn: Callable, workers: int = 2, timeout_s: float | None = None,
              init: Callable | None = None) -> Iterator[tuple[int, object]]:
    """Yield (index, fn(task)) as each task finishes, in `workers` spawned processes; a `Failure`
    in place of the result where the task raised, ran past `timeout_s` (its worker is killed and
    replaced) or killed its worker. `fn` and `init` must be importable module-level functions.
    Closing the generator (or an exception in the caller) kills every worker."""
    pending = collections.deque(enumerate(tasks))
    left = len(pending)
    ctx = mp.get_context("spawn")
    logdir = tempfile.mkdtemp(prefix="meditron-plan-workers-")
    numbers = itertools.count()
    spawn = lambda: _Worker(ctx, os.path.join(logdir, f"worker{next(numbers)}.log"), init, fn)  # noqa: E731
    pool: list[_Worker] = []
    try:
        pool = [spawn() for _ in range(min(max(1, workers), left))]
        while left:
            for w in pool:
                if w.ready and w.task is None and pending:
                    w.assign(pending.popleft())
            mp.connection.wait([w.conn for w in pool] + [w.proc.sentinel for w in pool], _next_deadline(pool, timeout_s))
            for k, w in enumerate(pool):
                done = w.receive() or w.failed(timeout_s)
                if w.proc.is_alive():
                    if done is None:
                        continue
                elif w.task is None and not w.ready:
                    raise RuntimeError(f"a compile worker died while starting ({_exit(w.proc.exitcode)}): "
                                       f"{w.reason()}")
                else:  # died or killed: a fresh worker takes its place while tasks wait
                    w.kill()
                    pool[k] = spawn() if pending else None
                if done is not None:
                    left -= 1
                    yield done
            pool = [w for w in pool if w is not None]
    finally:
        for w in pool:
            if w is not None:
                w.kill()
        shutil.rmtree(logdir, ignore_errors=True)


class _Worker:
    def __init__(self, ctx, log: str, init, fn):
        self.log = log
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_main, args=(child, log, init, fn), daemon=True, name="meditron-plan-worker")
        self.proc.start()
        child.close()
        self.ready = False
        self.task = None  # (index, task) while one runs
        self.started = 0.0

    def assign(self, item):
        self.task = item
        self.started = time.monotonic()
        self.conn.send(item)

    def receive(self):
        """(index, result) of a finished task, or None; marks the worker ready / idle."""
        while True:
            try:
                if not self.conn.poll():
                    return None
                msg = self.conn.recv()
            except (EOFError, OSError):
                return None
            if msg == "ready":
                self.ready = True
                continue
            self.task = None
            return msg

    def failed(self, timeout_s) -> tuple[int, Failure] | None:
        """(index, why) of the running task when the worker died under it (its stderr says why)
        or it ran past `timeout_s` (the worker is killed); else None."""
        if self.task is None:
            return None
        if not self.proc.is_alive():
            return self.task[0], Failure(f"the compiler's process died ({_exit(self.proc.exitcode)}): {self.reason()}")
        if timeout_s and time.monotonic() - self.started > timeout_s:
            self.kill()
            return self.task[0], Failure(f"compile over {timeout_s:g} s (--layout_timeout_s): stopped")
        return None

    def reason(self) -> str:
        """Why the worker died, from its stderr. A fatal line written inside
        `console.quiet_native_stderr` reaches the log through that block's filter process a
        moment after the worker is gone: wait for it up to 3 s."""
        text = ""
        for _ in range(30):
            try:
                with open(self.log, errors="replace") as fh:
                    text = fh.read()
            except OSError:
                pass
            if re.search(r"^F\d{4} |Check failed", text, re.M):
                break
            time.sleep(0.1)
        return last_error(text)

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()  # SIGKILL: a compiler thread stuck in a futex ignores SIGTERM's handler
        self.proc.join(10)
        self.conn.close()


def last_error(text: str) -> str:
    """The line of a dead process's stderr that says why: XLA's fatal line (`F1207 ...
    Check failed: ...`), else the last line naming an error, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if re.match(r"^F\d{4} ", ln) or "Check failed" in ln]
    errors = [ln for ln in lines if re.search(r"error|abort|terminate", ln, re.I)]
    line = (fatal[:1] or errors[-1:] or lines[-1:] or ["no output"])[0]
    return " ".join(line.split())[:300]


def _exit(code) -> str:
    if code is not None and code < 0:
        try:
            return f"{signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def _next_deadline(pool: list, timeout_s) -> float | None:
    """Seconds until the first running task's time limit (None: no limit)."""
    if not timeout_s:
        return None
    now = time.monotonic()
    waits = [w.started + timeout_s - now for w in pool if w.task is not None]
    return max(0.0, min(waits)) + 0.05 if waits else None


def _main(conn, log: str, init, fn):
    """A worker: stdout and stderr (Python's and the compiler's) to `log`, `init()`, then
    (index, task) -> (index, fn(task)) until the pipe closes."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the search; the rows done stay
    if init is not None:
        init()
    conn.send("ready")
    while True:
        try:
            i, task = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = fn(task)
        except Exception as e:  # noqa: BLE001 - one task's failure is a row, not the end of the search
            result = Failure(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        conn.send((i, result))
