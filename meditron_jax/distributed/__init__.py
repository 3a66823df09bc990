"""Parallelism below the model: devices, meshes, layouts and processes.

Modules: `meshes` (gin `mesh.*` / `placement.*`: the (data, stage, fsdp, tensor) mesh and how its
axes fall on hosts), `sharding` (the one place logical axes become mesh axes: rules, the sharding
context that `constrain` pins activations against, parameter and optimizer-state layouts,
ZeRO-1, gin `sharding.*`), `host_batch` (which global-batch rows a process supplies, and its
rows assembled into global arrays), `multihost` (joining the cluster, barriers, small
all-gathers between processes).

Does not own: the pipeline schedule over `stage` (`training/pipeline.py`: it runs the model's
layers, so it sits above `models/`) or the train step (`training/`).
"""
