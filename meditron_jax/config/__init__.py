"""Gin: where a run's gin files are found, how they are parsed, and the checks every bound value
passes before anything runs.

Modules: `gin_files` (the search order of `--gin_file` and `include`, the shipped `configs/`,
`import` statements refused, `parse`), `checks` (each value against the type hints and `Range`
bounds of the configurable that receives it; gin's parse errors as one line).

Does not own the configurables: each lives with its owner (`train.*` in `training/config.py`,
`model.*` in `models/config.py`, `optimizer.*` in `training/optimizer.py`, `mesh.*` /
`placement.*` in `distributed/meshes.py`, `sharding.*` in `distributed/sharding.py`,
`pipeline.*` in `training/pipeline.py`, `data.*` in `data/config.py`, `checkpoint.*` in
`storage/checkpoint.py`). `training.config.parse_gin` registers them all, then parses.
"""
