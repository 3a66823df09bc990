"""The step loop and its hooks (Levanter's `add_hook(fn, every=n)` is the model).

Owns: `Loop` (feed a batch, run the jitted step, then the hooks that are due), `StepInfo` (what a
hook sees), `BadStepGuard` (stop after `train.max_bad_steps` non-finite steps in a row) and
`log0`. Each other hook lives with its concern: logging `metrics.TrainLog`, evaluation
`eval.during_training.EvalHook`, saving `checkpoint.CheckpointHook`, preemption
`training.preemption.PreemptionHook`, tracing `profiling.StepProfiler`. Does not own: the
step's math (training/step.py), what the run is built from (training/state.py, train.py).

A hook is `fn(info) -> int | None`, added with a cadence: it runs after step s when s is a
multiple of one of its `every` values, and (`at_end=True`) after the last step or a step where a
hook asked the loop to stop (`info.request_stop(code)`: the step's remaining hooks run, a forced
checkpoint included, then the loop returns `code`). A hook that returns an int stops the loop at
once with that exit status, skipping the hooks after it. Hooks run in the order they were added.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Iterable

import jax

from meditron_jax import console
from meditron_jax.errors import EXIT_BAD_STEPS


def log0(msg: str):
    """An INFO console line, from process 0 only."""
    if jax.process_index() == 0:
        console.log.info(msg)


@dataclasses.dataclass
class StepInfo:
    step: int  # steps done, counting this one (1-based, like the logged steps)
    state: dict  # the train state after this step (device arrays; reading one waits for the device)
    metrics: dict  # this step's metrics (device arrays)
    last: bool  # step == train.steps
    stop: int | None = None  # exit status a hook asked for (`request_stop`)
    notes: dict = dataclasses.field(default_factory=dict)  # handed from hook to later hooks of this step
    compile_s: float | None = None  # the run's first step only: seconds until its dispatch returned (the compile)

    @property
    def ending(self) -> bool:
        return self.last or self.stop is not None

    def request_stop(self, code: int):
        if self.stop is None:
            self.stop = code


@dataclasses.dataclass(frozen=True)
class _Hook:
    fn: Callable
    every: tuple
    at_end: bool

    def due(self, info: StepInfo) -> bool:
        return any(info.step % e == 0 for e in self.every) or (self.at_end and info.ending)


class Loop:
    """`run(state, start)` steps from `start` to `total_steps`; returns (last step, exit status).

    `step_fn(state, batch) -> (state, metrics)` is the jitted step; `next_batch()` gives the next
    global batch."""

    def __init__(self, step_fn: Callable, next_batch: Callable, total_steps: int):
        self.step_fn, self.next_batch, self.total_steps = step_fn, next_batch, total_steps
        self.hooks: list[_Hook] = []
        self.before_step: list[Callable[[int], None]] = []  # fn(step about to run, 1-based)

    def add_hook(self, fn: Callable, every: int | Iterable[int] = 1, at_end: bool = False):
        every = (every,) if isinstance(every, int) else tuple(every)
        if any(e < 1 for e in every):
            raise ValueError(f"hook cadence must be >= 1, got {every}")
        self.hooks.append(_Hook(fn, every, at_end))

    def run(self, state, start: int) -> tuple[int, int]:
        step = start
        while step < self.total_steps:
            batch = self.next_batch()
            for fn in self.before_step:
                fn(step + 1)
            compile_s = None
            if step == start:  # the first call compiles (dispatch returns once the executable exists)
                log0("compiling the train step")
                with console.Timer() as t:
                    state, metrics = self.step_fn(state, batch)
                compile_s = t.seconds
                log0(f"compiled ({compile_s:.1f} s)")
            else:
                state, metrics = self.step_fn(state, batch)
            step += 1
            info = StepInfo(step, state, metrics, last=step == self.total_steps, compile_s=compile_s)
            for hook in self.hooks:
                if hook.due(info):
                    code = hook.fn(info)
                    if code is not None:
                        return step, code
            if info.stop is not None:
                return step, info.stop
        return step, 0


class BadStepGuard:
    """Loop hook (at logged steps): `train.max_bad_steps` consecutive skipped (non-finite) steps
    stop the run with exit 3. The host waits for the device only here, at logged steps: skipped
    steps leave params and optimizer state untouched, so waiting costs nothing. Hands the streak
    on (`info.notes["bad_streak"]`, recorded in the checkpoint's meta)."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps

    def __call__(self, info: StepInfo):
        bad_streak = int(info.state["bad_streak"])
        info.notes["bad_streak"] = bad_streak
        if bad_streak >= self.max_bad_steps > 0:
            print(f"meditron-jax train: error: {bad_streak} consecutive steps with a non-finite loss or "
                  f"gradient norm (train.max_bad_steps={self.max_bad_steps}); stopped at step {info.step}, "
                  f"last good checkpoint kept", file=sys.stderr)
            return EXIT_BAD_STEPS
        return None
