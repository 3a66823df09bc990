"""Training metrics: FLOPs accounting, MFU, and the writers (metrics.jsonl, TensorBoard,
wandb, progress bar).

Owns: the one FLOPs formula used by `mfu` and the benchmarks, the device peak table, and
writing metrics (only process 0 writes), the training loop's logging hook (`TrainLog`) and,
on resume, dropping records past the restored step (`truncate_metrics`). Does not own:
computing loss or gradients.

FLOPs convention (per trained token, forward + backward = 3 x forward):
    6 x (non-embedding parameters + lm_head parameters)          matmuls with weights
  + 6 x layers x seq_len x hidden                                 attention scores + values
The attention term is 12 x L x T x D for full attention (QK^T and AV, 2 FLOPs per MAC, x3 for
the backward), halved for causal masking, as in the PaLM / MaxText accounting. The embedding
lookup costs no FLOPs; remat recomputation is not counted (it is overhead, not model FLOPs).
"""

from __future__ import annotations

import datetime
import json
import math
import re
import threading
import time

import jax

from meditron_jax.storage import paths
from meditron_jax.storage.workdir import Workdir
from meditron_jax.models.config import LlamaConfig
from meditron_jax.errors import storage_fault, storage_faults

_RERUN = "the checkpoints are untouched: a rerun resumes from the newest"

# Dense bf16 peak FLOP/s of one JAX device, keyed on the exact `device_kind` string the device
# reports (a regular expression matched against the whole string). A kind not listed gets no
# `mfu` (one log line says so) rather than a guessed peak: an H100 NVL or H200 NVL (lower clocks)
# is not an SXM part. Sources, dense (the datasheets' "with sparsity" figures are twice these):
# - A100 40 GB / 80 GB, SXM4 and PCIe: 312 TFLOPS BF16 Tensor Core, NVIDIA A100 datasheet
#   (nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf).
# - H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 sparse -> 989 TFLOPS; H100 PCIe: 1,513 sparse -> 756,
#   NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100/).
# - H200 SXM ("NVIDIA H200"; XLA's target spec says "NVIDIA H200 141GB HBM3e"): 1,979 sparse -> 989,
#   NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200/).
# - B200 (HGX, 1,000 W): 4.5 PFLOPS sparse FP16/BF16 -> 2,250 TFLOPS, NVIDIA HGX B200 specifications
#   (nvidia.com/en-us/data-center/hgx/).
# - TPU v4 275, v5e ("TPU v5 lite") 197, v5p ("TPU v5") 459, v6e ("TPU v6 lite") 918 TFLOPS bf16 per
#   chip, one JAX device per chip: Google Cloud TPU docs, cloud.google.com/tpu/docs/v4, /v5e, /v5p,
#   /v6e. The kind strings are the ones JAX's own Pallas TPU tests match (jax tests/pallas/tpu_info_test.py).
PEAK_FLOPS_BF16 = {
    r"NVIDIA A100-SXM4-40GB|NVIDIA A100-SXM4-80GB|NVIDIA A100-PCIE-40GB|NVIDIA A100 80GB PCIe": 312e12,
    r"NVIDIA H100 80GB HBM3": 989e12,
    r"NVIDIA H100 PCIe": 756e12,
    r"NVIDIA H200|NVIDIA H200 141GB HBM3e": 989e12,
    r"NVIDIA B200": 2250e12,
    r"TPU v4": 275e12,
    r"TPU v5 lite|TPU v5e": 197e12,
    r"TPU v5|TPU v5p": 459e12,
    r"TPU v6 lite|TPU v6e": 918e12,
}
_UNKNOWN_LOGGED: set = set()


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    non_embedding = cfg.num_params(include_embedding=False)  # includes lm_head
    return 6.0 * non_embedding + 6.0 * cfg.num_layers * seq_len * cfg.hidden_size


def device_peak_flops(device=None) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (default: the first device), or None when its kind is
    not in `PEAK_FLOPS_BF16` (CPU included); an unknown kind is logged once per process."""
    device = device or jax.devices()[0]
    kind = str(getattr(device, "device_kind", ""))
    for pattern, peak in PEAK_FLOPS_BF16.items():
        if re.fullmatch(pattern, kind):
            return peak
    if kind not in _UNKNOWN_LOGGED:
        _UNKNOWN_LOGGED.add(kind)
        from meditron_jax import console
        console.log.info(f"no peak known for {kind}: mfu not logged")
    return None


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard events, + wandb if enabled and installed, + a tqdm bar, + the
    console lines of `meditron_jax.console`).

    Every record gets `time` (UTC, ISO 8601) and `elapsed_s` (wall seconds since this writer
    opened, i.e. since this run started), and `tokens` (cumulative tokens trained, counting from
    step 0 across resumes) when `tokens_per_step` is given. TensorBoard tags are `train/*` and
    `eval/*` (`eval_loss` -> `eval/loss`); the operative config is written once as text.
    The bar is drawn only when `progress` and stderr is a terminal; a plain log line is written
    at every record with a loss (and every eval record) when `console`.
    """

    def __init__(self, workdir: Workdir | str, total_steps: int, start_step: int = 0, enabled: bool | None = None,
                 tensorboard: bool = True, wandb_project: str | None = None, progress: bool = True,
                 config: dict | None = None, tokens_per_step: int = 0, config_text: str | None = None,
                 console: bool = True):
        from meditron_jax import console as _console

        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        workdir = Workdir.resolve(workdir)
        self.path = workdir.metrics
        self._tb = self._wandb = self._bar = None
        self.total_steps, self.start_step, self.tokens_per_step = total_steps, start_step, tokens_per_step
        self.t0 = time.time()
        self._t_first = None  # (time, step) of the first step line: ETA excludes the compile
        self.last: dict = {}  # newest value of each metric (the end-of-run summary)
        self.last_step = start_step
        self._console = console and self.enabled
        if not self.enabled:
            return
        progress = _console.progress_enabled(progress)
        with storage_faults("opening", self.path):
            self._file = RemoteAppendFile(self.path) if paths.is_remote(self.path) else open(self.path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                # purge_step: TensorBoard hides events of earlier files at steps >= it, i.e. what
                # an interrupted run logged after the checkpoint this run resumes from (the same
                # records truncate_metrics moves out of metrics.jsonl), so no step shows twice
                # max_queue: tensorboardX's writer thread dies on a failed write; a small queue then
                # blocks add_scalar forever, a large one lets write() notice the dead thread first
                self._tb = SummaryWriter(workdir.tensorboard, purge_step=start_step + 1,
                                         max_queue=1000)
                _capture_tensorboard_thread_errors()
                if config_text:  # markdown: indent 4 = a code block, the config stays readable
                    self._tb.add_text("config/operative_gin", "\n".join("    " + ln for ln in config_text.splitlines()),
                                      start_step)
            except ImportError:
                pass
        if wandb_project:
            try:
                import wandb
                self._wandb = wandb.init(project=wandb_project, config=config or {}, dir=workdir.root,
                                         resume="allow")
            except ImportError:
                print("wandb not installed; skipping wandb logging", flush=True)
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             mininterval=1.0)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        now = time.time()
        record = {"step": int(step), **{k: (float(v) if not isinstance(v, (int, str)) else v)
                                        for k, v in metrics.items()}}
        if self.tokens_per_step:
            record["tokens"] = int(step) * self.tokens_per_step
        record["time"] = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="milliseconds")
        record["elapsed_s"] = round(now - self.t0, 3)
        with storage_faults("writing metrics to", self.path, hint=_RERUN):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        self.last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
        self.last_step = max(self.last_step, int(step))
        if self._tb is not None:
            self._check_tensorboard()
            with storage_faults("writing TensorBoard events to", getattr(self._tb, "logdir", None), hint=_RERUN):
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tb.add_scalar(tensorboard_tag(k), v, step)
        if self._console:
            self._console_line(int(step), record, now)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}",
                                  tok_s=f"{record.get('tokens_per_sec', 0):.0f}", refresh=False)

    def _check_tensorboard(self):
        """tensorboardX writes events in a thread, which dies on a failed write (a full disk):
        raise its error here, in the loop, instead of losing events or blocking on its queue."""
        dead = [ev for ev in _event_writers(self._tb) if getattr(ev, "_worker", None) is not None
                and not ev._worker.is_alive() and not getattr(ev, "_closed", False)]
        if not dead:
            return
        error = getattr(dead[0]._worker, "_meditron_error", None)
        logdir = getattr(self._tb, "logdir", None)
        self._abandon_tensorboard()
        fault = storage_fault(error, "writing TensorBoard events to", logdir, hint=_RERUN) if error else None
        if fault is not None:
            raise fault from error
        raise RuntimeError(f"the TensorBoard writer thread for {logdir} stopped ({error!r})")

    def _abandon_tensorboard(self):
        """Marks the event writers closed without flushing (a dead thread's queue would block, its
        failed file would fail again at exit)."""
        for ev in _event_writers(self._tb):
            ev._closed = True
        self._tb = None

    def _console_line(self, step: int, record: dict, now: float):
        from meditron_jax import console

        if "eval_loss" in record:
            console.log.info(console.eval_line(step, record))
        if "loss" not in record or "tokens_per_sec" not in record:
            return  # only the step that closes a logging interval carries the rates
        eta = None
        if self._t_first is None:
            self._t_first = (now, step)
        elif step > self._t_first[1]:
            per_step = (now - self._t_first[0]) / (step - self._t_first[1])
            eta = per_step * (self.total_steps - step)
        console.log.info(console.step_line(step, self.total_steps, record, eta))

    def summary(self, checkpoint: str | None = None, exit_code: int = 0, log: "TrainLog | None" = None,
                started: float | None = None) -> str:
        """The end-of-run line (logged on process 0; returned for callers); with the run's
        `TrainLog`, its goodput and where the rest of the wall time went. `started`: when the
        run began (`time.time()`; default: when this writer opened, after the data was built)."""
        from meditron_jax import console

        wall = time.time() - (self.t0 if started is None else started)
        timing = None
        if log is not None and log.goodput(wall) is not None:
            timing = {"goodput": log.goodput(wall), **{k: v for k, v in log.totals.items() if k != "step_s"}}
        line = console.summary_line(self.last_step, self.total_steps, self.last,
                                    self.last_step * self.tokens_per_step, wall, checkpoint, timing)
        if exit_code:
            line = line.replace("done:", f"stopped (exit {exit_code}):", 1)
        if self._console:
            console.log.info(line)
        return line

    def sync(self):
        """Makes every record written so far durable now (remote metrics.jsonl: uploads it; a local
        file is already flushed at every record). The trainer calls it before each save."""
        if self.enabled and isinstance(self._file, RemoteAppendFile):
            with storage_faults("writing metrics to", self.path, hint=_RERUN):
                self._file.upload()

    def advance(self, n: int = 1):
        if self._bar is not None:
            self._bar.update(n)

    def close(self):
        if not self.enabled:
            return
        try:
            self._file.close()
        except OSError:
            pass  # a failed write already raised (and named the file); close must not mask it
        if self._tb is not None:
            if any(getattr(ev, "_worker", None) is not None and not ev._worker.is_alive()
                   for ev in _event_writers(self._tb)):
                self._abandon_tensorboard()
            else:
                try:
                    self._tb.close()
                except OSError:
                    self._abandon_tensorboard()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


class RemoteAppendFile:
    """metrics.jsonl on remote storage, where an object cannot be appended to: the content is kept
    here and the whole object is rewritten, at most every `interval_s` at a flush, and always at
    `upload()` (before each checkpoint save) and `close()`. A reader sees a whole file; a crash
    loses at most the records since the last upload, all after the newest checkpoint, which a
    resume drops and re-logs anyway (train.truncate_metrics)."""

    def __init__(self, path: str, interval_s: float = 10.0):
        self.path, self.interval_s = path, interval_s
        self._text = paths.read_text(path) if paths.exists(path) else ""
        self._dirty, self._last = False, time.monotonic()
        self.closed = False

    def write(self, text: str) -> int:
        self._text += text
        self._dirty = True
        return len(text)

    def flush(self):
        if self._dirty and time.monotonic() - self._last >= self.interval_s:
            self.upload()

    def upload(self):
        if self._dirty:
            paths.write_text(self.path, self._text)
            self._dirty, self._last = False, time.monotonic()

    def close(self):
        if not self.closed:
            self.upload()
            self.closed = True


def _event_writers(tb) -> list:
    return [w.event_writer for w in (getattr(tb, "all_writers", None) or {}).values() if hasattr(w, "event_writer")]


def _capture_tensorboard_thread_errors():
    """A failed write kills tensorboardX's writer thread with a traceback on stderr: keep the
    error on the thread (`MetricsWriter` raises it as one line) and print nothing."""
    previous = threading.excepthook
    if getattr(previous, "_meditron_tensorboard", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_EventLoggerThread" and isinstance(args.exc_value, OSError):
            args.thread._meditron_error = args.exc_value
            return
        previous(args)
    hook._meditron_tensorboard = True
    threading.excepthook = hook


def tensorboard_tag(key: str) -> str:
    """`eval_loss` -> `eval/loss`, `eval_ppl` -> `eval/ppl`, anything else -> `train/<key>`."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + key


EXCLUDED = ("eval_s", "save_s")  # hook time that is not step time (`TrainLog.excluding`)


class TrainLog:
    """The training loop's logging hooks: `collect` (every step: keep the step's device metrics,
    advance the progress bar) and `flush` (at logged steps and before every checkpoint: fetch
    what was kept, write one record per step; the last record of a flush carries the timing:
    `step_time`, `tokens_per_sec`, `mfu` where the device peak is known, `pipeline_bubble` with
    pipelining). Hands the last finite loss on (`info.notes["loss"]`, recorded in the
    checkpoint's meta).

    Timing covers training steps only. An interval runs from one flush to the next; the first
    starts once the first step has compiled (`info.compile_s`: the loop's own "compiled" line,
    and `compile_s` in the first record), and the time of the hooks wrapped by `excluding`
    (evaluation, checkpoint saves) is taken out of the interval it falls in and reported in the
    record that closes it as `eval_s` / `save_s`. `totals` adds it all up for the end-of-run
    summary (`goodput`: step time / wall time). `clock` and `devices` are injectable (tests)."""

    def __init__(self, writer: MetricsWriter, tokens_per_step: int, flops_per_token_: float,
                 bubble: float | None = None, devices=None, clock=time.perf_counter):
        self.writer, self.tokens_per_step, self.fpt, self.bubble = writer, tokens_per_step, flops_per_token_, bubble
        devices = jax.devices() if devices is None else list(devices)
        self.peak, self.num_devices = device_peak_flops(devices[0]), len(devices)
        self.clock = clock
        self.t = clock()  # start of the open interval
        self.excluded = dict.fromkeys(EXCLUDED, 0.0)  # in the open interval
        self.totals = {"step_s": 0.0, "compile_s": 0.0, **dict.fromkeys(EXCLUDED, 0.0)}
        self.compile_s = None  # for the next record
        self.pending = []

    def collect(self, info):
        if info.compile_s is not None:  # the run's first step: the interval starts after its compile
            self.t = self.clock()
            self.compile_s = info.compile_s
            self.totals["compile_s"] += info.compile_s
        self.pending.append(info.metrics)
        self.writer.advance()

    def excluding(self, key: str, hook):
        """`hook` wrapped so that its time counts as `key` (one of `EXCLUDED`), not step time. The
        steps dispatched before it finish first, on step time."""
        def timed(info):
            jax.block_until_ready(info.metrics)
            t0 = self.clock()
            try:
                return hook(info)
            finally:
                spent = self.clock() - t0
                self.excluded[key] += spent
                self.totals[key] += spent
        return timed

    def flush(self, info):
        fetched = jax.device_get(self.pending)
        loss = float(fetched[-1]["loss"]) if fetched and "loss" in fetched[-1] else None
        info.notes["loss"] = loss if loss is not None and math.isfinite(loss) else None
        now = self.clock()
        dt = max(now - self.t - sum(self.excluded.values()), 1e-9)
        self.t = now
        if fetched:
            self.totals["step_s"] += dt
        for i, m in enumerate(fetched):
            record = {k: float(v) for k, v in m.items()}
            if i == len(fetched) - 1:
                record["step_time"] = dt / len(fetched)
                record["tokens_per_sec"] = self.tokens_per_step * len(fetched) / dt
                if self.peak:
                    record["mfu"] = record["tokens_per_sec"] * self.fpt / (self.peak * self.num_devices)
                if self.bubble is not None:
                    record["pipeline_bubble"] = self.bubble
                record.update({k: v for k, v in self.excluded.items() if v})
                if self.compile_s is not None:
                    record["compile_s"], self.compile_s = self.compile_s, None
            self.writer.write(info.step - len(fetched) + i + 1, record)
        self.excluded = dict.fromkeys(EXCLUDED, 0.0)
        self.pending = []

    def goodput(self, wall_s: float) -> float | None:
        """The share of `wall_s` spent in training steps (None before any step was timed)."""
        return self.totals["step_s"] / wall_s if self.totals["step_s"] and wall_s > 0 else None


def truncate_metrics(workdir: Workdir | str, step: int) -> int:
    """Keeps metrics.jsonl records with step <= `step` (the restored step); later ones (written
    after the last checkpoint of an interrupted run, re-logged by this run) and a torn last line
    are appended to metrics.dropped.jsonl. Returns the number of records moved."""
    workdir = Workdir.resolve(workdir)
    path = workdir.metrics
    if not paths.exists(path):
        return 0
    keep, drop = [], []
    for line in paths.read_text(path).splitlines(keepends=True):
        try:
            ok = line.endswith("\n") and int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        (keep if ok else drop).append(line)
    if drop:
        dropped = workdir.metrics_dropped
        before = paths.read_text(dropped) if paths.exists(dropped) else ""
        paths.write_text(dropped, before + "".join(x if x.endswith("\n") else x + "\n" for x in drop))
        paths.write_text(path, "".join(keep))
    return len(drop)
