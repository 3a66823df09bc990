"""`train.profile_steps` and `train.compilation_cache_dir`.

Owns:
- `StepProfiler`: a `jax.profiler` trace of the steps in `train.profile_steps` (a pair
  `(first, last)`, inclusive, 1-based like the logged steps) written to WORKDIR/profile/
  (TensorBoard's profile plugin / Perfetto / XProf read it). The trace starts before step
  `first` is dispatched and stops after step `last` has finished on the device, so the window
  holds exactly those steps' device work. Process 0 only by default (each process can trace
  its own devices; one trace is what people read). Pick steps after the first: step 1 is
  dominated by compilation. With a remote workdir (gs://) the trace is written to a local
  temporary directory and uploaded to WORKDIR/profile/ when it stops (the profiler writes
  local files).
- `enable_compilation_cache(dir)`: JAX's persistent compilation cache. It helps when the same
  program is compiled again -- a restarted or resumed run, a preempted job rerun, the
  `plan`/`train` pair of one config, the test suite -- and not within one run (each program is
  compiled once per process anyway). `compiled_afresh()`: the cache off for a compile whose
  side products are read (XLA's dump is written only when XLA compiles, never on a cache hit).
"""

from __future__ import annotations

import contextlib
import os

import jax

from meditron_jax.storage.workdir import Workdir


def parse_steps(value) -> tuple[int, int] | None:
    """() / None -> None; (a, b) -> (a, b); a single int n -> (n, n)."""
    from meditron_jax.errors import UserError

    if value in (None, (), []):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 1 <= value[0] <= value[1]):
        raise UserError(f"train.profile_steps = {value!r}: expected (first, last) steps with 1 <= first <= last")
    return int(value[0]), int(value[1])


_active: list = []


def stop_active():
    """Stops a trace a run left open (it ended before the window's last step)."""
    for p in list(_active):
        p.stop()


class StepProfiler:
    def __init__(self, steps, workdir: Workdir, all_processes: bool = False):
        """Traces go to `workdir.profile`."""
        self.window = parse_steps(steps)
        self.dir = workdir.profile
        self.local = None  # a remote workdir: the local directory the trace goes to first
        self.active = False
        if not all_processes and jax.process_index() != 0:
            self.window = None

    def before(self, step: int):
        """Call before dispatching step `step` (1-based)."""
        if self.window and step == self.window[0] and not self.active:
            from meditron_jax import console
            from meditron_jax.storage import paths
            if paths.is_remote(self.dir):
                import tempfile
                self.local = tempfile.mkdtemp(prefix="meditron-jax-profile-")
            else:
                os.makedirs(self.dir, exist_ok=True)
            jax.profiler.start_trace(self.local or self.dir)
            self.active = True
            _active.append(self)
            console.log.info(f"profiling steps {self.window[0]}-{self.window[1]} into {self.dir}")

    def after(self, step: int, outputs):
        """Call after dispatching step `step`; stops the trace once its work is done."""
        if self.active and step >= self.window[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self):
        if self.active:
            from meditron_jax import console
            jax.profiler.stop_trace()
            self.active = False
            if self in _active:
                _active.remove(self)
            if self.local:
                _upload(self.local, self.dir)
                self.local = None
            console.log.info(f"profile written to {self.dir}")


def _upload(local: str, remote: str):
    """Copies the trace files under `local` to `remote` (same relative names), then removes them."""
    import shutil

    from etils import epath
    for root, _, files in os.walk(local):
        for f in files:
            src = os.path.join(root, f)
            dst = epath.Path(remote) / os.path.relpath(src, local)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fh:
                dst.write_bytes(fh.read())
    shutil.rmtree(local, ignore_errors=True)


def enable_compilation_cache(directory: str | None):
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))


@contextlib.contextmanager
def compiled_afresh():
    """JAX's persistent compilation cache off inside the block (`plan`'s dump, `--explain`).
    JAX decides once per process whether it uses the cache, so the decision is reset on entry
    and on exit."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()
