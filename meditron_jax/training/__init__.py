"""The training run's parts; `meditron_jax/train.py` is the entry that puts them together.

Modules: `config` (gin `train.*`, the run's configuration read once, startup validation),
`state` (the abstract state, the one jitted step shared with `plan`, fresh / init_from /
restored state), `loop` (the step loop and its hook cadence, the bad-step guard),
`preemption` (signals and the stop vote across processes).
"""
