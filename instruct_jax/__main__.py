"""Command line: `python -m instruct_jax <command> --experiment FILE[:arg] [--workdir DIR] [--set k=v ...]`.

Commands:
  pretrain   next-token training on plain text (data.format=text)
  sft        supervised fine-tuning on demonstrations (loss on assistant tokens only)
  rm         reward model on pairwise / K-wise comparisons, evaluated and normalized
  score      score (prompt, response) pairs with a reward model: --input pairs.jsonl [--output FILE]
  ppo        PPO of the policy against the reward model (InstructGPT step 3)
  pipeline   the whole InstructGPT recipe on the built-in task, with a report (--seeds 0,1,2, --stage NAME)
  eval       decode and score checkpoints on prompts: gold / reward-model scores, win rates, samples file
  interop    import Hugging Face / GGUF checkpoints (import SOURCE --out DIR), export to Hugging Face (export)
  plan       compile the SFT / reward / PPO steps for a TPU topology (--topology v5p:8x8x8): per-chip memory, FLOPs
  chat       talk to a model in the terminal (--model PATH: an interop import folder, a workdir, a params export)
  serve      OpenAI-compatible server + chat page + ranking view (--model [NAME=]PATH ..., --labels FILE)
"""

from __future__ import annotations

import argparse
import os
import sys

from instruct_jax.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OK, ConfigError

COMMANDS = {
    "prepare": "tokenise the data once into data.store (and ppo.ptx.store), each process its share (docs/DATA.md)",
    "pretrain": "next-token pretraining on plain text (every real token is a target)",
    "sft": "supervised fine-tuning on demonstrations (only assistant tokens are targets)",
    "rm": "reward model on pairwise / K-wise comparisons (data.format=pairwise|ranking), evaluated and normalized",
    "score": "score (prompt, response) pairs from a jsonl file with a reward model (--workdir: the rm run)",
    "dpo": "DPO (or IPO) of the policy (train.init_from) on pairwise / K-wise rankings, against its frozen copy",
    "ppo": "PPO of the policy (train.init_from) against the reward model (ppo.reward_model), KL-penalised",
    "pipeline": "pretrain -> SFT -> rankings -> reward model -> PPO -> evaluation on the built-in task (docs/PIPELINE.md)",
    "eval": "evaluate LM checkpoints on prompts (--policy NAME=PATH ...): gold / RM scores, win rates, samples",
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
        dist = p.add_argument_group("multi-host (docs/MULTIHOST.md; auto-detected on TPU VMs)")
        dist.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                          help="process 0's address for jax.distributed (env INSTRUCT_JAX_COORDINATOR)")
        dist.add_argument("--num-processes", type=int, default=None, metavar="N",
                          help="processes in the job (env INSTRUCT_JAX_NUM_PROCESSES)")
        dist.add_argument("--process-id", type=int, default=None, metavar="I",
                          help="this process's index, 0..N-1 (env INSTRUCT_JAX_PROCESS_ID)")
        if name == "score":
            p.add_argument("--input", required=True, help='jsonl rows {"prompt": ..., "response": "..."}')
            p.add_argument("--output", default=None, help="where scored rows go (default: stdout)")
        if name == "pipeline":
            p.add_argument("--seeds", default=None, metavar="S,S,...",
                           help="run one pipeline per seed (<workdir>/seed_S) and report mean +- std")
            p.add_argument("--stage", default=None, help="run only this stage (task pretrain sft label rm ppo eval)")
        if name == "eval":
            from instruct_jax.instructgpt.eval_command import add_arguments as add_eval_arguments

            add_eval_arguments(p)
    from instruct_jax.interop.cli import add_parser as add_interop_parser

    add_interop_parser(sub)  # `interop import|export`: its own arguments, no experiment needed for import
    from instruct_jax.serve.cli import add_parsers as add_serve_parsers

    add_serve_parsers(sub)  # `chat`, `serve`: a model path instead of an experiment
    from instruct_jax import plan as plan_module

    plan_parser = sub.add_parser("plan", help="ahead-of-time per-chip plan for a TPU topology (docs/PLANS.md)",
                                 description=plan_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan_module.add_arguments(plan_parser)
    plan_parser.add_argument("--json", default=None, help="also write the plan as JSON to this file")
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
    from instruct_jax.parallel.distributed import emulate_cpu_devices, skip_absent_tpu

    if "jax" not in sys.modules:  # emulated CPU devices get enough XLA threads (see emulate_cpu_devices)
        emulate_cpu_devices(os.environ)
        skip_absent_tpu(os.environ)  # libtpu installed on a machine without TPUs: no alarming probe error
    args = _parser().parse_args(argv)
    if args.command == "interop":
        from instruct_jax.interop.cli import main as interop_main

        return interop_main(args)
    if args.command in ("chat", "serve"):
        from instruct_jax.serve.cli import main as serve_main

        return serve_main(args)
    if args.command == "plan":  # compiles in a subprocess; this process never touches a device
        from instruct_jax.plan import cli as plan_cli

        return plan_cli(args)
    from instruct_jax.config import apply_overrides, load_experiment, validate

    try:
        cfg = apply_overrides(load_experiment(args.experiment), args.overrides)
        validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # ---- Multi-host: join the job before anything touches devices.
    from instruct_jax.parallel import distributed

    try:
        plan = distributed.plan(cfg.distributed, coordinator=args.coordinator, num_processes=args.num_processes,
                                process_id=args.process_id)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if distributed.initialize(plan, timeout_s=cfg.distributed.timeout_s):
        import jax

        if jax.process_index() == 0:
            print(distributed.describe(), flush=True)
    workdir = args.workdir or os.path.join("runs", f"{cfg.name}-{args.command}")
    if cfg.compilation_cache:
        setup_compilation_cache(workdir)

    from instruct_jax.data.config import DataConfigError
    from instruct_jax.data.stats import MalformedDataError
    from instruct_jax.train.guards import TrainingDiverged

    try:
        return _run(args, cfg, workdir) or EXIT_OK
    except (ConfigError, DataConfigError, MalformedDataError, FileNotFoundError) as e:  # each names its field / file
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as e:  # the message names the checkpoint holding the last good state
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED


def _run(args, cfg, workdir: str):
    """Dispatch to the phase's entry point (imported lazily: each pulls in only what it needs)."""
    if args.command == "prepare":
        from instruct_jax.data.build import prepare_command

        prepare_command(cfg, workdir)
    elif args.command in ("pretrain", "sft"):
        from instruct_jax.train.lm.trainer import run_lm

        run_lm(cfg, workdir, phase=args.command)
    elif args.command == "rm":
        from instruct_jax.train.rm.trainer import run_rm

        run_rm(cfg, workdir)
    elif args.command == "dpo":
        from instruct_jax.train.dpo.trainer import run_dpo

        run_dpo(cfg, workdir)
    elif args.command == "ppo":
        from instruct_jax.rl.ppo.trainer import run_ppo

        run_ppo(cfg, workdir)
    elif args.command == "pipeline":
        if cfg.pipeline.task == "images":  # the image task's stages (docs/MULTIMODAL.md)
            from instruct_jax.instructgpt.image_pipeline import run_image_pipeline as run_pipeline
            from instruct_jax.instructgpt.image_pipeline import run_image_seeds as run_seeds
        else:
            from instruct_jax.instructgpt.pipeline import run_pipeline, run_seeds
        if args.seeds:
            run_seeds(cfg, workdir, [int(x) for x in args.seeds.split(",") if x.strip()], args.stage)
        else:
            run_pipeline(cfg, workdir, args.stage)
    elif args.command == "eval":
        from instruct_jax.instructgpt.eval_command import main as eval_main

        return eval_main(cfg, workdir, args)
    elif args.command == "score":
        from instruct_jax.inference import scorer as score

        return score.main(cfg, args.workdir or os.path.join("runs", f"{cfg.name}-rm"), args.input, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
