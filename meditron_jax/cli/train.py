"""`meditron-jax train`: the flags of a training run; the run itself is `training.train.train`."""

from __future__ import annotations

from meditron_jax import console
from meditron_jax.cli.config import add_gin_arguments
from meditron_jax.training.train import train


def add_arguments(p):
    add_gin_arguments(p)
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, config.gin go here")
    p.add_argument("--resume_step", type=int, default=None,
                   help="resume from this checkpoint step (gin: train.resume_step; default: the newest that "
                        "restores); newer ones are moved to WORKDIR/checkpoints_superseded/")
    p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-host)")
    p.add_argument("--num_processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index (0 = coordinator)")
    p.add_argument("--init_timeout_s", type=int, default=300,
                   help="multi-host: how long to wait for every process to join before giving up")
    p.add_argument("--heartbeat_timeout_s", type=int, default=60,
                   help="multi-host: a process silent this long is declared dead and the others stop")
    p.add_argument("--shutdown_timeout_s", type=int, default=30,
                   help="multi-host: how long a finishing process waits for the others at exit")
    p.add_argument("--restart_from_scratch", "--restart-from-scratch", dest="restart_from_scratch", action="store_true",
                   help="start at step 0 when the workdir has checkpoints but none can be restored "
                        "(they are moved to WORKDIR/checkpoints_unreadable/)")


def run(args, wrap_step=None) -> int:
    console.setup()
    return train(args.workdir, args.gin_file, args.gin_param, args.coordinator_address, args.num_processes,
                 args.process_id, args.restart_from_scratch, args.heartbeat_timeout_s, args.shutdown_timeout_s,
                 args.init_timeout_s, resume_step=args.resume_step, gin_search_path=args.gin_search_path,
                 wrap_step=wrap_step)
