"""The one place the project reaches into Orbax beyond its documented save / restore calls.

Everything else uses Orbax's public API as documented: `CheckpointManager` with a handler
registry, `Checkpointer`, `StandardCheckpointer`, `args.*`, `utils.*`, and the manager's own
error report (`wait_until_finished`, which raises a failed save's error). Three things have no
documented form, and live here:

- `named_as(base)`: a handler subclass that writes `base`'s name into the checkpoint's step
  metadata (`CheckpointHandler.typestr`), so readers pick Orbax's own handler for the item.
  Import writes params with a `PyTreeCheckpointHandler` named as the standard handler (the two
  write one format in orbax-checkpoint 0.12.8: `StandardCheckpointHandler.save` validates its
  leaves, then saves through a `PyTreeCheckpointHandler`); the trainer's watched handlers
  (`watching`) are named as the handler they extend, so their checkpoints are byte-for-byte
  Orbax's.
- `watching(handler_cls, wrap)`: the handler of an item whose save futures
  (`AsyncCheckpointHandler.async_save`'s return value, `orbax.checkpoint.future.Future`) pass
  through `wrap`, so the trainer learns that this process's write failed while Orbax itself
  still waits for the other processes at its barriers (faults.py).
- The tensorstore side of a checkpoint leaf (`leaf_write_spec`, `leaf_read_spec`, ...): import
  streams each parameter block by block into the array Orbax would have written, and export
  reads slices of it; Orbax's helpers for these specs are public names whose signatures have
  changed between releases (`get_json_tspec_write` is marked for removal in 0.12.8).

`RELIES_ON` lists each name used here (and in convert/stream.py, which subclasses the public
`type_handlers.NumpyHandler`) with the parameters passed to it; tests/test_orbax_extension.py
checks them against the installed Orbax, and saves and restores through each extension, so an
Orbax that changed any of them fails a test instead of a run. pyproject.toml pins the tested
version.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

# dotted name under `orbax.checkpoint` -> parameters this project passes to it by name
RELIES_ON: dict[str, tuple[str, ...]] = {
    "CheckpointManager": ("directory", "options", "handler_registry"),
    "CheckpointManager.wait_until_finished": (),
    "CheckpointManager.is_saving_in_progress": (),
    "handlers.DefaultCheckpointHandlerRegistry.add": ("item", "args", "handler"),
    "StandardCheckpointHandler.async_save": ("directory", "args"),
    "JsonCheckpointHandler.async_save": ("directory", "args"),
    "StandardCheckpointHandler.typestr": (),
    "PyTreeCheckpointHandler": ("type_handler_registry", "use_ocdbt"),
    "type_handlers.NumpyHandler.serialize": ("values", "infos", "args"),
    "type_handlers.create_type_handler_registry": (),
    "type_handlers.ParamInfo": ("name", "parent_dir", "is_ocdbt_checkpoint", "use_zarr3", "ts_context"),
    "type_handlers.ParamInfo.await_path_creation": (),
    "type_handlers.get_json_tspec_write": ("info", "use_ocdbt", "global_shape", "local_shape", "dtype",
                                           "process_index", "arg"),
    "type_handlers.get_json_tspec_read": ("info", "use_ocdbt"),
    "type_handlers.is_ocdbt_checkpoint": (),
    "future.CommitFutureAwaitingContractedSignals": ("coro", "name"),
}


def named_as(base: type) -> Callable[[type], type]:
    """Class decorator: the handler records itself in a checkpoint's metadata as `base`."""
    def decorate(cls: type) -> type:
        cls.typestr = classmethod(lambda _cls: base.typestr())
        return cls
    return decorate


def watching(handler_cls: type, wrap: Callable[[Any], Any]):
    """An instance of `handler_cls` (an Orbax async checkpoint handler) whose save futures go
    through `wrap(future) -> future` and that is recorded in the checkpoint as `handler_cls`."""
    @named_as(handler_cls)
    class Watched(handler_cls):
        async def async_save(self, directory, *args, **kwargs):
            futures = await super().async_save(directory, *args, **kwargs)
            return [wrap(f) for f in futures or []]

    Watched.__name__ = Watched.__qualname__ = f"Watched{handler_cls.__name__}"
    return Watched()


# ---- the tensorstore array of one checkpoint leaf ------------------------------------------

async def leaf_dir_ready(info) -> None:
    """Waits until Orbax has created the item directory the leaf `info` is written into."""
    await info.await_path_creation()


def leaf_context(info):
    """The tensorstore context Orbax opened the item with (shared by its leaves)."""
    return info.ts_context


def leaf_write_spec(info, global_shape: tuple[int, ...], chunk_shape: tuple[int, ...], dtype,
                    arg) -> dict:
    """The tensorstore spec Orbax writes a numpy leaf of this shape with (zarr v2 in the item's
    OCDBT database when the checkpoint uses OCDBT), with `chunk_shape` chunks."""
    use_ocdbt = bool(info.is_ocdbt_checkpoint)
    return ocp.type_handlers.get_json_tspec_write(
        info, use_ocdbt=use_ocdbt, global_shape=tuple(global_shape), local_shape=tuple(chunk_shape),
        dtype=np.dtype(dtype), process_index=0 if use_ocdbt else None, arg=arg)


def commit_future(coro, name: str):
    """The future a type handler's `serialize` returns for work `coro` done in the background."""
    return ocp.future.CommitFutureAwaitingContractedSignals(coro, name=name)


def is_ocdbt(item_dir: str) -> bool:
    return ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(item_dir))


def leaf_read_spec(item_dir: str, name: str, use_ocdbt: bool, use_zarr3: bool, context) -> dict:
    """The tensorstore spec that opens the stored array `name` of the PyTree item at `item_dir`."""
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(item_dir), is_ocdbt_checkpoint=use_ocdbt,
                                       use_zarr3=use_zarr3, ts_context=context)
    return ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
