"""Honest throughput numbers (training/metrics.py `TrainLog`, `PEAK_FLOPS_BF16`), with an injected
clock so that the accounting is asserted, not timings:

- `mfu` is logged for every device kind of the table, given device objects reporting the kind
  strings real devices report, against the vendor's dense bf16 peak written out here; an unknown
  kind (CPU, an H100 NVL) gets no `mfu` and one log line;
- the first interval starts after the compile (reported once as `compile_s`), evaluation and
  checkpoint time is taken out of the interval it falls in and reported as `eval_s` / `save_s`,
  and the totals give the summary's goodput.
"""

from __future__ import annotations

import json
import logging
import types

import numpy as np
import pytest

from meditron_jax.training import metrics
from meditron_jax.training.loop import StepInfo
from meditron_jax.training.metrics import MetricsWriter, TrainLog

# device_kind as the devices report it -> dense bf16 FLOP/s per device from the vendors' sheets
REPORTED = {
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12, "NVIDIA B200": 2250e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12,
}
TOKENS, FPT = 1000, 6e9  # tokens per step, FLOPs per token


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_log(tmp_path, kind: str, n_devices: int = 4, clock=None):
    writer = MetricsWriter(str(tmp_path), total_steps=100, enabled=True, tensorboard=False, progress=False,
                           console=False)
    devices = [types.SimpleNamespace(device_kind=kind)] * n_devices
    return writer, TrainLog(writer, TOKENS, FPT, devices=devices, clock=clock or Clock())


def records(tmp_path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def step(log, n: int, clock: Clock, seconds: float = 1.0, compile_s: float | None = None):
    """Step n as the loop runs it: the call returns once compiled (the first) and dispatched; the
    step then runs on the device for `seconds` while the host moves on to its hooks."""
    if compile_s is not None:
        clock.t += compile_s
    info = StepInfo(n, {}, {"loss": np.float32(2.0)}, last=False, compile_s=compile_s)
    log.collect(info)
    clock.t += seconds
    return info


@pytest.mark.parametrize("kind", sorted(REPORTED))
def test_mfu_is_logged_for_every_device_kind_of_the_table(tmp_path, kind):
    clock = Clock()
    writer, log = make_log(tmp_path, kind, clock=clock)
    for s in (1, 2):
        info = step(log, s, clock, seconds=0.5)
    log.flush(info)
    writer.close()
    [_, last] = records(tmp_path)
    assert last["tokens_per_sec"] == pytest.approx(2 * TOKENS / 1.0)
    assert last["mfu"] == pytest.approx(2 * TOKENS * FPT / (REPORTED[kind] * 4))


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA H100 NVL", "TPU v3"])
def test_an_unknown_kind_gets_no_mfu_and_one_line(tmp_path, kind):
    from meditron_jax import console

    lines = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage())
    console.log.addHandler(handler)
    old = console.log.level
    console.log.setLevel(logging.INFO)
    metrics._UNKNOWN_LOGGED.discard(kind)
    try:
        clock = Clock()
        writer, log = make_log(tmp_path, kind, clock=clock)
        (tmp_path / "again").mkdir()
        make_log(tmp_path / "again", kind)  # a second TrainLog on the same kind says nothing more
        log.flush(step(log, 1, clock))
        writer.close()
    finally:
        console.log.removeHandler(handler)
        console.log.setLevel(old)
    assert "mfu" not in records(tmp_path)[-1]
    assert lines == [f"no peak known for {kind}: mfu not logged"]


def test_compile_eval_and_save_time_are_not_step_time(tmp_path):
    clock = Clock()
    writer, log = make_log(tmp_path, "TPU v5", clock=clock)
    clock.t = 7.0  # building the data, restoring: before the first step, never step time

    def evaluate(info):
        clock.t += 5.0

    def save(info):
        clock.t += 3.0
    evaluate, save = log.excluding("eval_s", evaluate), log.excluding("save_s", save)

    # steps 1-4 at 1 s each; step 1's call also compiled for 20 s
    info = step(log, 1, clock, compile_s=20.0)
    for s in (2, 3, 4):
        info = step(log, s, clock)
    log.flush(info)
    evaluate(info)  # eval and save after a logged step, as the trainer's hooks run
    save(info)
    for s in (5, 6):  # steps 5-8 at 2 s each, an eval in the middle of the interval
        info = step(log, s, clock, seconds=2.0)
    evaluate(info)
    for s in (7, 8):
        info = step(log, s, clock, seconds=2.0)
    log.flush(info)
    save(info)  # the last save: after the last record, in the totals only
    writer.close()

    recs = records(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 9))
    first, second = recs[3], recs[7]
    assert first["step_time"] == pytest.approx(1.0) and first["tokens_per_sec"] == pytest.approx(TOKENS / 1.0)
    assert first["compile_s"] == pytest.approx(20.0) and "eval_s" not in first and "save_s" not in first
    assert second["step_time"] == pytest.approx(2.0) and second["tokens_per_sec"] == pytest.approx(TOKENS / 2.0)
    assert second["eval_s"] == pytest.approx(10.0) and second["save_s"] == pytest.approx(3.0)
    assert "compile_s" not in second
    assert second["mfu"] == pytest.approx(TOKENS / 2.0 * FPT / (459e12 * 4))
    assert log.totals == pytest.approx({"step_s": 12.0, "compile_s": 20.0, "eval_s": 10.0, "save_s": 6.0})
    assert clock.t == pytest.approx(7.0 + 20.0 + 12.0 + 10.0 + 6.0)
    assert log.goodput(clock.t) == pytest.approx(12.0 / 55.0)


def test_summary_line_carries_goodput(tmp_path):
    from meditron_jax import console

    line = console.summary_line(10, 10, {"loss": 1.5}, 10_000, 60.0, None,
                                {"goodput": 0.25, "compile_s": 30.0, "eval_s": 12.0, "save_s": 3.0})
    assert "goodput 25% (compile 30s, eval 12s, save 3s)" in line
