"""Which checkpoint a run resumes from, decided once for all its processes.

Owns (docs/reliability.md, "Resume rules"):
- `newest_readable`: the newest checkpoint that restores on every process. Incomplete steps
  (remains of an interrupted save or deletion) and damaged ones (torn, corrupted or missing
  array files) are named in one warning and moved to `WORKDIR/checkpoints_unreadable/`, never
  deleted; one of another model (names or shapes differ) is refused in one line, never skipped.
- `check_resume_step` / `set_aside_newer`: `train --resume_step N` (or gin
  `train.resume_step = N`) restores exactly step N (refusing one that isn't there, before
  anything is built); checkpoints newer than N are moved to `WORKDIR/checkpoints_superseded/`,
  never deleted, and metrics.jsonl is cut back to N by the trainer's usual resume rule.
- `read_step`: one process reads its shards of a step, with no cross-process barrier inside.
Does not own: the checkpoint layout and the damage / mismatch verdict of one step
(checkpoint.py), the workdir's paths (workdir.py).
"""

from __future__ import annotations

import logging
import sys

import jax
import orbax.checkpoint as ocp

from meditron_jax.distributed import multihost
from meditron_jax.errors import UserError
from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.storage import paths
from meditron_jax.storage.workdir import Workdir


def read_step(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite):
    """Reads checkpoint `step` of `manager`'s directory on this process alone.

    Each process reads the shards its devices hold; there is no cross-process barrier inside
    (Orbax's own restore ends with one, where a process whose read failed would leave the others
    waiting). `newest_readable` makes the processes agree afterwards."""
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=options) as ckptr:
        return ckptr.restore(paths.join(str(manager.directory), str(step)), args=args)


def newest_readable(manager: ocp.CheckpointManager, workdir: Workdir, restore, targets: dict,
                    restart_from_scratch: bool = False):
    """(restore(step), step) for the newest checkpoint that restores on every process, or None for
    a fresh start. Every process of a multi-host run takes the same decision.

    Candidates are the committed, complete steps that every process sees (Orbax renames a save's
    temporary directory when it commits, and the manager removes leftovers when it opens); the
    others are moved aside. Newest first, each process checks the candidate's metadata against
    `targets` (item name -> the run's abstract tree: `checkpoint.check_shapes`) and restores it
    (`restore` reads without cross-process barriers: `read_step`), then all exchange the
    outcome. A checkpoint of another model (names or shapes differ) is a configuration error:
    every process refuses with the line naming what differs. If any process could not read it
    (damaged files, array data missing), all skip it, and process 0 warns once for the run,
    naming the processes and reasons. Skipped steps are moved to WORKDIR/checkpoints_unreadable/
    (so later saves at those steps don't collide) once everyone has stopped reading them. If all
    fail, every process refuses with the same line unless `restart_from_scratch`.
    """
    root = workdir.checkpoints
    listed = sorted(manager.all_steps())
    seen = multihost.allgather_json([listed, [s for s in listed if ckpt.is_complete(workdir.step_dir(s))]])
    everywhere = set.intersection(*(set(complete) for _, complete in seen))
    remnants = sorted(set().union(*(set(lst) for lst, _ in seen)) - everywhere)
    if remnants:
        _warn(f"checkpoint steps {remnants} in {root} are incomplete (left by an interrupted save "
              f"or deletion); moved to {workdir.unreadable}")
        move_aside(manager, workdir, remnants, workdir.unreadable)
    steps = sorted(everywhere, reverse=True)
    if steps:
        _silence_failed_reads()
    skipped, reasons = [], []
    for step in steps:
        restored, outcome = None, ["ok", ""]
        try:
            for item, target in targets.items():
                ckpt.check_shapes(paths.join(workdir.step_dir(step), item), target)
            restored = restore(step)
        except ckpt.CheckpointMismatch as e:
            outcome = ["mismatch", str(e)]
        except Exception as e:  # torn, corrupted or missing files: try the previous checkpoint
            reason = " ".join(str(e).split(" See full TensorStore details")[0].split())[:200]
            outcome = ["unreadable", f"{type(e).__name__}: {reason}"]
        votes = multihost.allgather_json(outcome)
        mismatch = next((msg for st, msg in votes if st == "mismatch"), None)
        if mismatch is not None:
            raise ckpt.CheckpointMismatch(f"cannot resume from {workdir}: {mismatch}")
        failed = [(p, msg) for p, (st, msg) in enumerate(votes) if st != "ok"]
        if failed:
            where = "; ".join((f"process {p}: " if len(votes) > 1 else "") + msg for p, msg in failed)
            reasons.append(f"checkpoint step {step} in {root} is unreadable, skipping it ({where})")
            skipped.append(step)
            del restored
            continue
        if skipped:
            _warn("; ".join(reasons) + f"; resuming from step {step}, not from the newest step {skipped[0]} "
                  f"(unreadable steps {sorted(skipped)} moved to {workdir.unreadable})")
            move_aside(manager, workdir, skipped, workdir.unreadable)
        return restored, step
    if steps and not restart_from_scratch:
        raise ckpt.CheckpointError(f"{root}: none of the checkpoints {sorted(steps)} can be restored; refusing "
                                   f"to start from scratch (pass --restart-from-scratch to start over; they are "
                                   f"then moved to {workdir.unreadable})")
    if steps:
        _warn("; ".join(reasons) + f"; --restart-from-scratch: no readable checkpoint; starting at step 0, "
              f"unreadable steps {sorted(steps)} moved to {workdir.unreadable}")
        move_aside(manager, workdir, steps, workdir.unreadable)
    return None


def _warn(msg: str):
    if jax.process_index() == 0:
        print(f"meditron-jax train: warning: {msg}", file=sys.stderr, flush=True)


def move_aside(manager: ocp.CheckpointManager, workdir: Workdir, steps, dest_root: str):
    """Moves step directories to `dest_root/<step>` (`<step>.1`, ... when taken), never deleting
    what this run did not write. Called by every process at the same point: process 0 moves them
    once all have arrived (none still reads them), and nobody goes on before the move is done."""
    multihost.barrier()
    if jax.process_index() == 0:
        paths.makedirs(dest_root)
        for step in steps:
            dest, n = paths.join(dest_root, str(step)), 1
            while paths.exists(dest):
                dest, n = paths.join(dest_root, f"{step}.{n}"), n + 1
            paths.rename(workdir.step_dir(step), dest)
    multihost.barrier()
    manager.reload()


def _silence_failed_reads():
    """A failed Orbax read leaves its sibling reads running and un-awaited: when they finish
    after their event loop closed, or are garbage-collected (often at exit), Python prints
    'Event loop is closed' / 'Exception ignored in <coroutine _read_array_index_...>' and asyncio
    logs '_GatheringFuture exception was never retrieved', with tracebacks. The warning naming
    the step already said it all: drop just those reports."""
    previous = sys.unraisablehook
    if getattr(previous, "_meditron_quiet", False):
        return

    def hook(unraisable):  # reads finishing after their event loop closed report here too
        late = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
        if not late and "_read_array_index" not in repr(getattr(unraisable, "object", "")):
            previous(unraisable)
    hook._meditron_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: "error while reading array index" not in record.getMessage())


# ---- resuming from a chosen step -------------------------------------------------------------

def check_resume_step(workdir: Workdir, flag: int | None, gin_value: int | None = None) -> int | None:
    """The step to resume from: `--resume_step N` or gin `train.resume_step = N` (the same value
    if both are given). It must be a complete checkpoint of this workdir; checked up front, before
    data is built or anything compiles. Returns it (None: the newest that restores)."""
    if flag is not None and gin_value is not None and flag != gin_value:
        raise UserError(f"--resume_step {flag} disagrees with train.resume_step = {gin_value}; give one of them")
    step = flag if flag is not None else gin_value
    if step is None:
        return None
    what = "--resume_step" if flag is not None else "train.resume_step ="
    if step < 0:
        raise UserError(f"{what} {step}: must be >= 0")
    steps = ckpt.complete_steps(workdir.checkpoints)
    if step not in steps:
        have = f"it has {steps}" if steps else "it has none"
        raise UserError(f"{what} {step}: workdir {workdir} has no complete checkpoint at step {step} ({have})")
    return step


def set_aside_newer(manager, workdir: Workdir, step: int) -> list[int]:
    """Moves checkpoints newer than `step` to WORKDIR/checkpoints_superseded/ (process 0; all
    processes wait), so the resumed run can save those steps again. Returns the moved steps."""
    newer = sorted(s for s in manager.all_steps() if s > step)
    if newer:
        move_aside(manager, workdir, newer, workdir.superseded)
        if jax.process_index() == 0:
            from meditron_jax import console
            console.log.warning(f"--resume_step {step}: newer checkpoints {newer} moved to {workdir.superseded}")
    return newer
