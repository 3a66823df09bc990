"""A run on disk (local or `gs://`): the workdir, checkpoints and what can go wrong writing them.

Modules: `paths` (the one path layer: local paths as `str` on `os`, `gs://` through etils epath,
as Orbax), `workdir` (the run's directory layout, its lock, the resume step), `checkpoint` (the
Orbax layout {params, opt_state, data, meta}, resume rules, the save hook; gin `checkpoint.*`),
`tokenizer_store` (the tokenizer file a checkpoint records and carries), `faults` (full disk,
quota and I/O errors: watched saves, space checks, removal of partial outputs).

Does not own: what is saved (`training/`), weight formats of other frameworks (`convert/`).
"""
