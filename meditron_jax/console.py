"""Console output for people and for log files: one `logging` format across subcommands.

Owns: `setup()` (called once by the CLI: a stderr handler on the `meditron_jax` logger with
timestamped plain lines, UTC; absl / Orbax / JAX info chatter lowered to warnings), `log`
(the logger every module uses), the training line formats (`step_line`, `eval_line`,
`summary_line`) and `progress_enabled()`: the tqdm bar is drawn only when stderr is a
terminal, so a SLURM log file gets plain lines and never an endless `\\r` line.

A line looks like
    2026-12-01 22:31:05Z I step 20/150 loss 6.2351 lr 3.00e-03 gnorm 1.21 tok/s 5123 mfu 41.2% eta 1m12s
Lines go through `tqdm.write`, so they stay readable above a live bar on a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time

log = logging.getLogger("meditron_jax")

# Loggers of libraries that print progress chatter at INFO (Orbax through absl, JAX's
# compilation cache, tensorstore through absl): warnings and errors still come through.
_QUIET = ("absl", "orbax", "jax", "tensorstore", "etils", "grain", "asyncio", "gcsfs", "fsspec")


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self):
        super().__init__("%(asctime)sZ %(levelname).1s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


class _Handler(logging.Handler):
    """Writes through tqdm (keeps an active bar intact) to the *current* sys.stderr."""

    def emit(self, record):
        try:
            msg = self.format(record)
            try:
                from tqdm import tqdm
                tqdm.write(msg, file=sys.stderr)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                print(msg, file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # never let logging kill a run
            self.handleError(record)


def setup(level: int = logging.INFO) -> logging.Logger:
    """Installs the one handler (idempotent) and quiets the libraries' INFO chatter."""
    if not any(isinstance(h, _Handler) for h in log.handlers):
        h = _Handler()
        h.setFormatter(_Formatter())
        log.addHandler(h)
    log.setLevel(level)
    log.propagate = False
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING if name != "absl" else logging.ERROR)
    gcsfs_log = logging.getLogger("gcsfs")  # its bucket-type probe needs project credentials; it falls back
    if not any(getattr(f, "_meditron_quiet", False) for f in gcsfs_log.filters):
        drop = lambda record: "Could not determine bucket type" not in record.getMessage()  # noqa: E731
        drop._meditron_quiet = True
        gcsfs_log.addFilter(drop)
    try:  # absl's own verbosity (Orbax logs through absl.logging)
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    return log


def progress_enabled(requested: bool = True, stream=None) -> bool:
    """The bar only when asked for and stderr is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(requested) and stream.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def step_line(step: int, total: int, record: dict, eta_s: float | None) -> str:
    parts = [f"step {step}/{total}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "grad_norm" in record:
        parts.append(f"gnorm {record['grad_norm']:.3g}")
    if "tokens_per_sec" in record:
        parts.append(f"tok/s {record['tokens_per_sec']:.0f}")
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if record.get("skipped"):
        parts.append("skipped (non-finite)")
    if eta_s is not None:
        parts.append(f"eta {duration(eta_s)}")
    return " ".join(parts)


def eval_line(step: int, record: dict) -> str:
    line = f"eval step {step}: loss {record['eval_loss']:.4f}"
    if "eval_ppl" in record:
        line += f" ppl {record['eval_ppl']:.2f}"
    return line


def summary_line(step: int, total: int, last: dict, tokens: int, wall_s: float, checkpoint: str | None,
                 timing: dict | None = None) -> str:
    """`timing`: {"goodput": share of wall time in training steps, "compile_s", "eval_s", "save_s"}."""
    parts = [f"done: step {step}/{total}"]
    if "loss" in last:
        parts.append(f"final loss {last['loss']:.4f}")
    if "eval_loss" in last:
        parts.append(f"eval loss {last['eval_loss']:.4f}")
    parts.append(f"{tokens:,} tokens")
    parts.append(f"wall {duration(wall_s)}")
    if timing:
        rest = ", ".join(f"{k[:-2]} {duration(timing[k])}" for k in ("compile_s", "eval_s", "save_s") if timing.get(k))
        parts.append(f"goodput {100 * timing['goodput']:.0f}%" + (f" ({rest})" if rest else ""))
    if checkpoint:
        parts.append(f"checkpoint {checkpoint}")
    return ", ".join(parts)


def resumed(step: int, path: str) -> None:
    """The one resume announcement, on every process (each restores its own shards): the step and
    the checkpoint it came from; with several processes also which process and host speaks."""
    import jax

    where = ""
    if jax.process_count() > 1:
        import socket
        where = f" on process {jax.process_index()} of {jax.process_count()} (host {socket.gethostname()})"
    log.info(f"resumed from step {step} ({path}){where}")


class Timer:
    """`with Timer() as t: ...; t.seconds` (0 until a block has run)."""
    seconds = 0.0

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False


# ---- native stderr of the accelerator plugins ---------------------------------------------------

NATIVE_NOISE = ("cudart_stub.cc", "All log messages before absl::InitializeLog()",
                "could not determine TPU", "Logging before InitGoogle()", "TPU_WORKER_HOSTNAMES",
                "Source Location Trace", "libtpu_init_utils.cc", "Failed to find host bounds")


# The filter runs in its own small process (`python -S`), reading the block's fd 2 through a
# pipe: when the compiler aborts the whole process (an XLA check failure), the filter still
# gets the fatal line and passes it on before it sees the pipe close. (A temporary file read
# back at the end lost it, with the process.)
_END = b"\0meditron-jax-end\0\n"  # the block's last line: it ended, its capture is read
_FILTER = """
import json, os, sys
noise, also, keep_all, spool, mark = json.loads(sys.argv[1])
out, ended, mark = sys.stdout.buffer, False, mark.encode()
with open(spool or os.devnull, "wb") as box:
    for raw in sys.stdin.buffer:
        if raw.endswith(mark):  # the block ended normally
            raw, ended = raw[:-len(mark)], True
        box.write(raw)
        line = raw.decode(errors="replace")
        if keep_all or (not any(s in line for s in noise) and not any(a in line.lower() for a in also)):
            out.write(raw)
            out.flush()
if spool and not ended:  # the block's process died: nobody reads the capture
    os.unlink(spool)
"""


@contextlib.contextmanager
def quiet_native_stderr(box: list | None = None, also: tuple[str, ...] = ()):
    """Run a block with file descriptor 2 filtered: every line passes, as it is written, except
    the plugins' known start-up notices (`NATIVE_NOISE`: no CUDA driver on this host, libtpu not
    on a TPU VM) and lines containing any of `also` (case-insensitive). The whole output is
    appended to `box` at the end. With `--debug` / MEDITRON_JAX_DEBUG=1 nothing is filtered."""
    import json
    import subprocess

    from meditron_jax.errors import debug_enabled

    sys.stderr.flush()
    saved = os.dup(2)
    spool = None
    if box is not None:
        fd, spool = tempfile.mkstemp(prefix="meditron-jax-stderr-")
        os.close(fd)
    try:
        args = json.dumps([NATIVE_NOISE, [a.lower() for a in also], debug_enabled(), spool, _END.decode()])
        filt = subprocess.Popen([sys.executable, "-S", "-c", _FILTER, args], stdin=subprocess.PIPE, stdout=saved)
        os.dup2(filt.stdin.fileno(), 2)
        filt.stdin.close()
        try:
            yield
        finally:
            sys.stderr.flush()
            os.write(2, _END)
            os.dup2(saved, 2)  # the pipe's last writer closes: the filter drains it and exits
            try:
                filt.wait(30)
            except subprocess.TimeoutExpired:  # a child started in the block still holds the pipe
                filt.kill()
                filt.wait()
            if box is not None:
                with open(spool, "rb") as fh:
                    box.append(fh.read().decode(errors="replace"))
    finally:
        os.close(saved)
        if spool is not None and os.path.exists(spool):
            os.unlink(spool)


def import_jax_quietly():
    """`import jax` with the compile-only CUDA plugin's import-time notices filtered (the `plan`
    extra on a host without a GPU prints "Could not find cuda drivers" while jax loads its CUDA
    version helpers). Call before anything else imports jax."""
    with quiet_native_stderr():
        import jax  # noqa: F401


def start_backends_quietly():
    """Start JAX's backends (plugin discovery, then the devices) with the plugins' start-up
    notices filtered. Call where a command first needs devices: after joining the cluster
    (`jax.distributed.initialize` must come first)."""
    import jax
    with quiet_native_stderr():
        jax.devices()
