"""Training: the run from gin files to checkpoints.

Modules: `train` (the entry: cluster, gin, data, state, loop with its hooks), `config` (gin
`train.*`, the run's configuration read once, start-up validation, the operative config),
`state` (the abstract state, the one jitted step shared with `plan`, fresh / init_from /
restored state), `step` (the pure train step: accumulation, one gradient reduction, skipped
non-finite steps), `fused_accum` (gradient-accumulation fusion in the backward layer scan),
`pipeline` (the pipeline schedule over `stage`: GPipe, circular repeats; gin `pipeline.*`),
`optimizer` (AdamW, warmup + cosine, clipping; gin `optimizer.*`), `init_from` (starting from
imported weights, vocabulary growth), `loop` (the step loop, hook cadences, the bad-step guard),
`preemption` (signals, the stop vote across processes), `metrics` (FLOPs, MFU, metrics.jsonl,
TensorBoard, the logging hook), `profiling` (profiler traces, the compilation cache),
`eval_hook` (held-out loss during training), `hostmem` (the host malloc policy).

Does not own: the model (`models/`), layouts and meshes (`distributed/`), the files of a run
(`storage/`), the data pipeline (`data/`).
"""
