"""`python -m instruct_jax interop import|export`: pretrained checkpoints in, trained ones out.

    python -m instruct_jax interop import SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
    python -m instruct_jax interop import path/to/Qwen2-0.5B-Instruct --out runs/qwen2
    python -m instruct_jax interop import path/to/llava-siglip --out runs/llava     # tower + projector too
    python -m instruct_jax interop export --experiment experiments/smollm2_sft.py --workdir runs/smollm2-sft \
        --out runs/smollm2-sft-hf

An import folder holds what the next phase reads:

    params/      params export (orbax + manifest): --set train.init_from=<out>
    tokenizer/   tokenizer.json + tokenizer_config.json with the model's chat template:
                 --set data.tokenizer=<out>/tokenizer data.chat_template=model
    model.json   {"model": ModelConfig fields, "hf_config": the source's config, "source": ...}; a LLaVA
                 source's `model.vision` holds its tower's settings (interop/llava.py)

Its embedding table has room for the tokenizer's reserved pad id (data/tokenizer.py), so its
`model.vocab_size` may be one more than the checkpoint's; `export` writes every row unless
--vocab-size says fewer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

IMPORT_HELP = ("Hugging Face folder (config.json + safetensors; Llama family or LLaVA) or .gguf file -> params "
               "export + tokenizer folder")
EXPORT_HELP = "a run's params (policy or reward model) -> Hugging Face folder that transformers loads"


def add_parser(sub) -> None:
    """Register `interop` and its `import` / `export` subcommands on the CLI's subparsers."""
    parser = sub.add_parser("interop", help="Hugging Face / GGUF import and Hugging Face export",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="interop_command", required=True, metavar="import|export")
    imp = commands.add_parser("import", help=IMPORT_HELP, description=IMPORT_HELP)
    imp.add_argument("source", help="a Hugging Face model folder or a .gguf file")
    imp.add_argument("--out", required=True, help="folder to write params/, tokenizer/ and model.json into")
    imp.add_argument("--vocab-size", type=int, default=0,
                     help="embedding rows (default: the checkpoint's, plus room for a reserved pad token)")
    imp.add_argument("--experiment", default=None, metavar="FILE[:ARG]",
                     help="shard with this experiment's mesh and rules (default: FSDP over every device)")
    exp = commands.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP)
    exp.add_argument("--experiment", required=True, metavar="FILE[:ARG]",
                     help="the experiment the run used (its model, mesh and tokenizer)")
    exp.add_argument("--workdir", required=True, help="the run's workdir (its params/ export), or a params export")
    exp.add_argument("--out", required=True, help="folder for config.json, safetensors and tokenizer files")
    exp.add_argument("--family", choices=("llama", "mistral", "qwen2"), default=None,
                     help="transformers architecture (default: qwen2 with q/k/v biases, else llama)")
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    exp.add_argument("--vocab-size", type=int, default=0, help="embedding rows to write (default: all)")
    exp.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help="config overrides, as for training")


def _mesh(spec):
    import jax

    from instruct_jax.config import load_experiment
    from instruct_jax.parallel.mesh import MeshConfig, make_mesh

    mesh_cfg = load_experiment(spec).mesh if spec else MeshConfig()
    return make_mesh(mesh_cfg, jax.devices()), mesh_cfg.logical_rules()


def run_import(args) -> int:
    from instruct_jax.checkpoint import export_params
    from instruct_jax.data.tokenizer import load_tokenizer
    from instruct_jax.interop.gguf import gguf_hf_config, gguf_tokenizer, import_gguf
    from instruct_jax.interop.hf import export_tokenizer, import_hf, read_hf_config
    from instruct_jax.interop.hf_config import text_config_of

    source, out = args.source, args.out
    is_gguf = source.endswith(".gguf")
    tokenizer_dir = os.path.join(out, "tokenizer")
    os.makedirs(out, exist_ok=True)
    if is_gguf:
        hf = gguf_hf_config(source)
        gguf_tokenizer(source, tokenizer_dir)
    else:
        hf = read_hf_config(source)
        if os.path.isfile(os.path.join(source, "tokenizer.json")):
            export_tokenizer(source, tokenizer_dir)
        else:
            print(f"warning: {source} has no tokenizer.json; {tokenizer_dir} is not written", file=sys.stderr)
    rows = args.vocab_size or int(text_config_of(hf)["vocab_size"])
    if os.path.isdir(tokenizer_dir) and not args.vocab_size:
        rows = max(rows, load_tokenizer(tokenizer_dir).vocab_size)
    mesh, rules = _mesh(args.experiment)
    params, cfg = (import_gguf if is_gguf else import_hf)(source, mesh=mesh, rules=rules, vocab_size=rows)
    export_params(os.path.join(out, "params"), params)
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(cfg), "hf_config": hf, "source": os.path.abspath(source)}, f, indent=2)
    tower = (f", a {cfg.vision.depth}-block vision tower, {cfg.vision.tokens_per_image} tokens per image"
             if cfg.vision.enabled else "")
    print(f"imported {source} -> {out} ({cfg.num_layers} layers, d_model {cfg.d_model}, vocab rows {cfg.vocab_size}"
          f"{tower})")
    print(f"use it with: --set train.init_from={out} data.tokenizer={tokenizer_dir} data.chat_template=model "
          f"(and model.* as in {os.path.join(out, 'model.json')})")
    return 0


def _export_tokenizer_path(cfg, workdir: str):
    """The tokenizer the run trained with: data.tokenizer, or the sentencepiece model it trained."""
    from instruct_jax.data.config import TRAIN_SENTENCEPIECE

    if cfg.data.tokenizer != TRAIN_SENTENCEPIECE:
        return cfg.data.tokenizer
    trained = os.path.join(workdir, "tokenizer", f"spm_{cfg.data.vocab_size}.model")
    return trained if os.path.isfile(trained) else None


def run_export(args) -> int:
    import jax

    from instruct_jax.checkpoint import load_params, resolve_params_dir
    from instruct_jax.config import apply_overrides, load_experiment, validate
    from instruct_jax.interop.hf import export_hf, target_params

    cfg = apply_overrides(load_experiment(args.experiment), args.overrides)
    validate(cfg)
    # A LoRA run's params export is already merged (model/lora.py): read and write it as the plain model.
    cfg.model = dataclasses.replace(cfg.model, lora_rank=0)
    params_dir = resolve_params_dir(args.workdir)
    norm_file = os.path.join(args.workdir, "reward_norm.json")
    reward = os.path.isfile(norm_file)
    mesh, rules = _mesh(args.experiment)
    abstract, _ = target_params(cfg.model, mesh, rules, reward=reward)
    if reward:
        scalar = jax.ShapeDtypeStruct((), jax.numpy.float32, sharding=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
        loaded = load_params(params_dir, {"params": abstract, "norm": {"gain": scalar, "bias": scalar}})
        params, norm = loaded["params"], {k: float(v) for k, v in loaded["norm"].items()}
    else:
        params, norm = load_params(params_dir, abstract), None
    tokenizer = _export_tokenizer_path(cfg, args.workdir)
    hf = export_hf(args.out, params, cfg.model, tokenizer, family=args.family, vocab_size=args.vocab_size or None,
                   dtype=args.dtype, reward_norm=norm)
    print(f"exported {'reward model' if reward else 'policy'} {params_dir} -> {args.out} ({hf['architectures'][0]})")
    return 0


def main(args) -> int:
    from instruct_jax.errors import ConfigError
    from instruct_jax.interop.hf_config import UnsupportedConfig

    try:
        return run_import(args) if args.interop_command == "import" else run_export(args)
    except (ConfigError, UnsupportedConfig, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
