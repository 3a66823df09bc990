"""What `eval` and `generate` evaluate: a model from a checkpoint or HF dir, plus its tokenizer.

Owns: resolving the tokenizer (`--tokenizer`, else the one the checkpoint recorded, else an HF
dir's `tokenizer.model`), checking that tokenizer and model agree on the vocabulary, and the
shared command-line flags. Does not own: weight loading (`meditron_jax.from_pretrained`),
tokenization (`meditron_jax.data.tokenizer`).
"""

from __future__ import annotations

import json
import os
import sys

from meditron_jax.storage import paths as _paths
from meditron_jax.errors import UserError


class LoadError(UserError, ValueError):
    """Checkpoint / tokenizer problems a user can fix (missing file, vocab mismatch)."""


def add_model_arguments(parser, tokenizer_required: bool = False):
    parser.add_argument("--checkpoint", required=True,
                        help="meditron-jax workdir / checkpoint dir, or a Hugging Face model dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece .model or an HF tokenizer dir (adds its added tokens); default: "
                             "the one the checkpoint recorded, or the HF model dir's own")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the checkpoint's config)")
    parser.add_argument("--mesh", default=None,
                        help="run sharded, e.g. 'tensor=8' or 'data=2,tensor=4' (axes data, fsdp, tensor; "
                             "data takes the remaining devices); default: one device")
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file whose mesh.* bindings give the mesh (when --mesh is not given)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. 'mesh.tensor=4'")
    parser.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                        help="memory of one device for the fit check (default: what the backend reports)")
    parser.add_argument("--coordinator_address", default=None,
                        help="multi-host: host:port of process 0 (SLURM, Open MPI, TPU VMs and GKE TPU pods are detected), as for train")
    parser.add_argument("--num_processes", type=int, default=None, help="multi-host: total number of processes")
    parser.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index")


def hf_added_tokens(directory: str, base_vocab: int) -> list[str]:
    """Tokens an HF tokenizer dir adds after the SentencePiece vocab (added_tokens.json or
    tokenizer_config.json's added_tokens_decoder), in id order; ids must run on from base_vocab."""
    by_id = {}
    path = os.path.join(directory, "added_tokens.json")
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    try:
        if os.path.isfile(path):
            with open(path) as f:
                by_id = {int(i): t for t, i in json.load(f).items()}
        elif os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                dec = json.load(f).get("added_tokens_decoder") or {}
            by_id = {int(i): v["content"] for i, v in dec.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise LoadError(f"{directory}: unreadable added-token file ({e})") from None
    extra = sorted(i for i in by_id if i >= base_vocab)
    if extra != list(range(base_vocab, base_vocab + len(extra))):
        raise LoadError(f"{directory}: added token ids {extra[:5]}... do not follow the base vocab {base_vocab}")
    return [by_id[i] for i in extra]


def recorded_tokenizer(checkpoint: str, step: int | None = None) -> dict:
    """What the checkpoint says about its tokenizer: {path, fingerprint, added_tokens} (maybe empty).
    For an HF dir: its tokenizer.model (added tokens are read when it is loaded)."""
    if os.path.isfile(os.path.join(checkpoint, "config.json")):  # Hugging Face directory
        path = os.path.join(checkpoint, "tokenizer.model")
        return {"path": path} if os.path.isfile(path) else {}
    try:
        from meditron_jax.storage.checkpoint import read_meta
    except ImportError:
        return {}
    tok = read_meta(checkpoint, step).get("tokenizer") or {}
    return {"path": tok} if isinstance(tok, str) else dict(tok)


def load_tokenizer(path: str, added_tokens=None):
    """A SentencePiece .model file, or an HF tokenizer dir (tokenizer.model + its added tokens)."""
    from meditron_jax.data.tokenizer import Tokenizer

    directory = None
    if os.path.isdir(path):
        directory, path = path, os.path.join(path, "tokenizer.model")
    elif os.path.isfile(path) and added_tokens is None:
        directory = os.path.dirname(os.path.abspath(path))  # tokenizer.model inside an HF dir
        if not os.path.isfile(os.path.join(directory, "added_tokens.json")) and not os.path.isfile(
                os.path.join(directory, "tokenizer_config.json")):
            directory = None
    if not os.path.isfile(path):
        raise LoadError(f"{path}: tokenizer file not found")
    if added_tokens is None and directory is not None:
        added_tokens = hf_added_tokens(directory, Tokenizer(path).base_vocab_size)
    return Tokenizer(path, tuple(added_tokens or ()))


def resolve_tokenizer(checkpoint: str, tokenizer: str | None, step: int | None = None):
    rec = recorded_tokenizer(checkpoint, step)
    if tokenizer is None:  # the recorded file, or the copy stored in the checkpoint (tokenizer_store)
        from meditron_jax.storage.tokenizer_store import recorded_file
        path = recorded_file(rec) or rec.get("path")
    else:
        path = tokenizer
    if path is None:
        raise LoadError(f"{checkpoint} records no tokenizer; pass --tokenizer FILE.model")
    if tokenizer is None and not os.path.exists(path):
        raise LoadError(f"{checkpoint} records tokenizer {path}, which does not exist here; pass --tokenizer")
    tok = load_tokenizer(path, rec.get("added_tokens") or None)
    fp = getattr(tok, "fingerprint", None)
    if rec.get("fingerprint") and fp and rec["fingerprint"] != fp:
        print(f"warning: tokenizer {path} (fingerprint {fp[:12]}) is not the one {checkpoint} was trained with "
              f"({rec['fingerprint'][:12]})", file=sys.stderr)
    return tok


def check_vocab(tokenizer, cfg, tokenizer_name: str = "tokenizer"):
    """A tokenizer no larger than the model's vocab is accepted, as `train` does (the README's
    tiny model has 2048 rows, the demo tokenizer 1024 ids): ids past the tokenizer are never
    produced by it, and `generate` never samples them. A larger one is refused."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LoadError(f"{tokenizer_name} has {tokenizer.vocab_size} tokens but the checkpoint's vocab is "
                        f"{cfg.vocab_size}; pass the tokenizer the model was trained with (an HF dir brings "
                        "its added tokens, e.g. Meditron's 17)")


def load(args):
    """(model, tokenizer) from parsed `add_model_arguments` flags; vocab checked."""
    from meditron_jax import from_pretrained

    if not _paths.exists(args.checkpoint):  # local or gs:// (meditron_jax.storage.paths)
        raise LoadError(f"{args.checkpoint}: no such checkpoint or model directory")
    tok = resolve_tokenizer(args.checkpoint, args.tokenizer, args.step)
    model = from_pretrained(args.checkpoint, dtype=args.dtype, step=args.step)
    check_vocab(tok, model.cfg, args.tokenizer or "the recorded tokenizer")
    return model, tok


def load_for_inference(args, batch: int = 8, seq_len: int | None = None, cache_len: int = 0,
                       what: str = "inference", tokenizer: bool = True):
    """(model, tokenizer or None, Placement) from the flags: on the mesh of --mesh / gin `mesh.*`
    (parameters restored straight into their shards, fit checked first), else on one device."""
    from meditron_jax import from_pretrained
    from meditron_jax.eval import distributed

    if not _paths.exists(args.checkpoint):  # local or gs:// (meditron_jax.storage.paths)
        raise LoadError(f"{args.checkpoint}: no such checkpoint or model directory")
    from meditron_jax.distributed import multihost  # before any device query, as training does

    cluster = multihost.init_distributed(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
                                         getattr(args, "process_id", None))  # the environment's cluster, else one process
    if cluster is not None:  # one process: stderr stays as it was
        multihost.log_start(cluster)
    tok = resolve_tokenizer(args.checkpoint, args.tokenizer, args.step) if tokenizer else None
    sizes = distributed.mesh_from_flags(getattr(args, "mesh", None), getattr(args, "gin_file", ()),
                                        getattr(args, "gin_param", ()))
    if sizes is None:
        model = from_pretrained(args.checkpoint, dtype=args.dtype, step=args.step)
        placement = distributed.Placement(None)
    else:
        from meditron_jax.distributed import sharding
        from meditron_jax.distributed import meshes
        mesh = meshes.make_mesh(sizes)
        model = distributed.load_model_on_mesh(args.checkpoint, mesh, dtype=args.dtype, step=args.step,
                                               device_memory_gib=getattr(args, "device_memory", None),
                                               batch=batch, seq_len=seq_len, cache_len=cache_len, what=what)
        placement = distributed.Placement(mesh)
        info = distributed.mesh_summary(model, mesh)
        print(f"mesh {distributed.fmt_mesh(sizes)} on {info['devices']} devices: "
              f"{info['param_bytes_per_device'] / 2**30:.2f} GiB of weights per device", file=sys.stderr)
    if tok is not None:
        check_vocab(tok, model.cfg, args.tokenizer or "the recorded tokenizer")
    return model, tok, placement
