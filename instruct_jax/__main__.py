"""Command line: `python -m instruct_jax <command> --experiment FILE[:arg] [--workdir DIR] [--set k=v ...]`.

Commands:
  pretrain   next-token training on plain text (data.format=text)
  sft        supervised fine-tuning on demonstrations (loss on assistant tokens only)
"""

from __future__ import annotations

import argparse
import os
import sys

COMMANDS = {
    "pretrain": "next-token pretraining on plain text (every real token is a target)",
    "sft": "supervised fine-tuning on demonstrations (only assistant tokens are targets)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m instruct_jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--experiment", required=True, metavar="FILE[:ARG]",
                       help="experiment file defining get_config(arg); ':ARG' is passed to it")
        p.add_argument("--workdir", default=None,
                       help="where checkpoints, metrics.jsonl and TensorBoard files go (default runs/<name>-<command>)")
        p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override config fields, e.g. --set train.steps=20 optim.learning_rate=1e-3")
    return parser


def setup_compilation_cache(workdir: str) -> str:
    """Persistent XLA cache so re-runs and restarts after preemption don't recompile.

    $JAX_CACHE_DIR if set, else a user cache dir shared by all runs on this machine.
    """
    import jax

    cache = os.environ.get("JAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "instruct_jax", "jax_cache")
    os.makedirs(cache, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from instruct_jax.config import ConfigError, apply_overrides, load_experiment, validate

    try:
        cfg = apply_overrides(load_experiment(args.experiment), args.overrides)
        validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = args.workdir or os.path.join("runs", f"{cfg.name}-{args.command}")
    if cfg.compilation_cache:
        setup_compilation_cache(workdir)

    if args.command in ("pretrain", "sft"):
        from instruct_jax.train.trainer import run_lm

        try:
            run_lm(cfg, workdir, phase=args.command)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
