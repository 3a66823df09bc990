"""Planning: what a configuration costs on an accelerator, compiled on this host.

Modules: `compile` (the real train step lowered and compiled for a target with abstract inputs),
`report` (per-device memory against the target, FLOPs, collectives, the largest buffers, the
verdict), `hlo_text` / `hlo_stats` (reading the compiled HLO: loops and trip counts, collectives
and their wire bytes by mesh axis, dot FLOPs), `targets` (the GPU / TPU targets, compile-only
devices from the plugins, host device counts), `eval_plan` (`meditron-jax eval plan`), and the
predicted step: `hardware` (per-device facts with sources, links between devices), `hlo_cost`
(FLOPs and HBM bytes per instruction), `step_time` (the schedule replayed on the hardware:
step time, tokens/s, MFU, compute / exposed communication / bubble), `layouts` (what
`--search` enumerates and prunes, `--candidates` files), `search` (compiling and ranking
layouts) and `workers` (the compile processes: a time limit per layout, a row for a compiler
that aborts).

Does not own: the step it compiles (`training.state.build_step`, shared with `train`).
"""
