"""Fault injection for the reliability tests: `python tests/nan_steps.py 4,7,8 train ARGS...`
runs `meditron-jax train ARGS...` with the batches of steps 4, 7 and 8 poisoned on the data
side: their loss mask is NaN, so the production step (unchanged) sees a NaN loss and NaN
gradients. The wrapper reaches the loop through `meditron_jax.cli.train.run(args, wrap_step=...)`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nan_at(steps):
    def wrap(step_fn, start):
        done = [start]

        def step(state, batch):
            done[0] += 1
            if done[0] in steps:
                batch = {**batch, "loss_mask": batch["loss_mask"] * float("nan")}
            return step_fn(state, batch)
        return step
    return wrap


def main():
    steps = {int(s) for s in sys.argv[1].split(",")}
    from meditron_jax import cli
    from meditron_jax.cli import train
    run = train.run
    train.run = lambda args: run(args, wrap_step=nan_at(steps))
    sys.exit(cli.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
