"""`meditron-jax import --from hf|meta SRC --out CKPT`: Llama-2 weights -> a step-0 checkpoint
(`convert.importer`)."""

from __future__ import annotations

from meditron_jax.convert.importer import import_weights


def add_arguments(parser) -> None:
    parser.add_argument("--from", dest="source_format", choices=("hf", "meta"), required=True,
                        help="hf: a Hugging Face LlamaForCausalLM directory (safetensors or "
                             "pytorch_model*.bin); meta: params.json + consolidated.NN.pth")
    parser.add_argument("src", help="the source directory")
    parser.add_argument("--out", required=True, help="checkpoint directory to create (holds step 0)")
    parser.add_argument("--preset", default=None,
                        help="model preset whose settings (dtype, context, ...) the checkpoint records; "
                             "its architecture must match the source, the vocab size comes from the source")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    step_dir = import_weights(args.source_format, args.src, args.out, args.preset, args.overwrite)
    print(f"wrote {step_dir}")
    return 0
