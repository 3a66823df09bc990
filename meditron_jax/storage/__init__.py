"""A run on disk (local or `gs://`): the workdir, checkpoints and what can go wrong writing them.

Modules: `paths` (the one path layer: local paths as `str` on `os`, `gs://` through etils epath,
as Orbax), `workdir` (`Workdir`: every path of a run; the run lock), `checkpoint` (the Orbax
layout {params, opt_state, data, meta}, damaged vs mismatched, the save hook; gin
`checkpoint.*`), `resume` (the step a run resumes from, decided by all processes together;
`--resume_step`), `listing` (what a workdir holds), `tokenizer_store` (the tokenizer file a
checkpoint records and carries), `faults` (full disk, quota and I/O errors of checkpoint saves:
watched saves, space checks), `staging` (outputs of other commands built under a temporary
name), `orbax_extension` (the one place that reaches into Orbax beyond its documented calls).

Does not own: what is saved (`training/`), weight formats of other frameworks (`convert/`).
"""
