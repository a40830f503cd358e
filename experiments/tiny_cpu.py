"""A tiny Llama-family model on 8 emulated CPU devices: the whole InstructGPT pipeline, or one phase.

Run:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m instruct_jax pipeline --experiment experiments/tiny_cpu.py --workdir runs/pipeline
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m instruct_jax sft --experiment experiments/tiny_cpu.py --workdir runs/tiny-sft
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m instruct_jax pretrain --experiment experiments/tiny_cpu.py:pretrain --workdir runs/tiny-pt

arg: "pipeline" (default; the built-in task end to end, docs/PIPELINE.md), "ci" (the same, sized to
finish in about two minutes for the test suite), "sft" (Self-Instruct seed demonstrations) or
"pretrain" (tinyshakespeare text).
Data files come from $INSTRUCT_JAX_DATA, else the repository's data/ folder; any
local path or Hub dataset name works with --set data.source=...
"""

import os

from instruct_jax.config import (CheckpointConfig, Config, DPOConfig, LoggingConfig, OptimConfig, PipelineConfig,
                                 PPOConfig, StageConfig, TrainConfig)
from instruct_jax.data.config import DataConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig

DATA = os.environ.get("INSTRUCT_JAX_DATA",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))


ARGS = ("pipeline", "ci", "sft", "pretrain")  # the args get_config accepts (tests build each)


def get_config(arg=None) -> Config:
    phase = arg or "pipeline"
    if phase not in ARGS:
        raise ValueError(f"tiny_cpu.py: arg must be one of {ARGS}, got {arg!r}")
    if phase in ("pipeline", "ci"):
        return pipeline_config(ci=phase == "ci")
    shakespeare = os.path.join(DATA, "tinyshakespeare.txt")
    if phase == "sft":
        data = DataConfig(
            source=os.path.join(DATA, "self_instruct_seed_tasks.jsonl"), format="sft",
            prompt_field="instruction", input_field="instances[0].input", response_field="instances[0].output",
            # The tokenizer learns from both the corpus and the demonstrations' own text.
            tokenizer_train_files=(shakespeare, os.path.join(DATA, "self_instruct_seed_tasks.jsonl")),
            vocab_size=1024, eval_fraction=0.1, on_overlength="truncate")
    else:
        data = DataConfig(source=shakespeare, format="text", text_unit="paragraph", vocab_size=1024,
                          eval_fraction=0.05)
    return Config(
        name=f"tiny-{phase}",
        model=ModelConfig(vocab_size=1024, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          mlp_dim=192, max_seq_len=256),
        mesh=MeshConfig(data=2, fsdp=-1),  # 2 x 4 on 8 emulated devices
        data=data,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=5, decay="cosine", weight_decay=0.01),
        train=TrainConfig(steps=40, global_batch_size=16, microbatches=1, seq_len=256, eval_every=20,
                          eval_batches=2),
        checkpoint=CheckpointConfig(every_steps=20, keep=2),
        logging=LoggingConfig(log_every=5),
    )


def pipeline_config(ci: bool) -> Config:
    """The built-in task end to end (python -m instruct_jax pipeline). `ci`: every stage, a fraction of the work."""
    stage = StageConfig
    if ci:
        pipeline = PipelineConfig(
            pretrain_paragraphs=400, sft_demos=200, eval_prompts=64, label_prompts=64, ppo_prompts=128,
            responses_per_prompt=4, snapshots=2, best_of=(4,), kl_samples=1, oracle=True,
            pretrain=stage(steps=20, global_batch_size=16, seq_len=128, learning_rate=3e-3),
            sft=stage(steps=20, global_batch_size=16, seq_len=64, learning_rate=1e-3, eval_every=10),
            rm=stage(steps=16, global_batch_size=16, seq_len=64, learning_rate=1e-3),
            ppo=stage(steps=4, global_batch_size=32, seq_len=64, learning_rate=3e-4, warmup_steps=0))
    else:
        pipeline = PipelineConfig(
            pretrain_paragraphs=4000, sft_demos=600, demo_chatty=0.8, label_prompts=3000,
            pretrain=stage(steps=700, global_batch_size=32, seq_len=128, learning_rate=1e-3),
            sft=stage(steps=150, global_batch_size=32, seq_len=80, learning_rate=1e-3, eval_every=10,
                      early_stop_patience=2),
            rm=stage(steps=250, global_batch_size=16, seq_len=80, learning_rate=3e-4),
            ppo=stage(steps=40, global_batch_size=64, seq_len=72, learning_rate=1e-4, warmup_steps=0),
            # opt-in (pipeline.algorithms=ppo,dpo): DPO on the reward model's rankings, its data budget
            dpo=stage(steps=250, global_batch_size=16, seq_len=80, learning_rate=1e-4),
            # opt-in (pipeline.algorithms=...,rloo,grpo): PPO's iterations, sampled rows and learning rate, as
            # 16 prompts x pipeline.group_size (4) samples, so each method generates what PPO generates
            rloo=stage(steps=40, global_batch_size=64, seq_len=72, learning_rate=1e-4, warmup_steps=0),
            grpo=stage(steps=40, global_batch_size=64, seq_len=72, learning_rate=1e-4, warmup_steps=0),
            # opt-in (...,dpo,rloo_dpo): RLOO's budget, rewarded by the DPO policy's implicit reward
            rloo_dpo=stage(steps=40, global_batch_size=64, seq_len=72, learning_rate=1e-4, warmup_steps=0),
            # opt-in (pipeline.algorithms=...,rft): 2 rounds of best-of-4 on 1,024 PPO prompts (reward model's pick),
            # each fine-tuned for 40 steps of 32; candidates at temperature 0.7 (at 1, best-of-4 is below SFT's
            # greedy answer by gold, and fine-tuning on it lowers the greedy policy: docs/ALGORITHMS.md)
            rft=stage(steps=40, global_batch_size=32, seq_len=80, learning_rate=3e-4),
            rft_prompts=1024, rft_samples=4, rft_rounds=2, rft_temperature=0.7,
            kl_budget=10.0)
    return Config(
        name="tiny-pipeline" + ("-ci" if ci else ""),
        model=ModelConfig(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                          mlp_dim=384, max_seq_len=128),
        mesh=MeshConfig(data=8, fsdp=1),  # pure data parallel: the model is tiny, the collectives are not
        data=DataConfig(vocab_size=1024),  # the pipeline writes the task's files and trains this tokenizer
        optim=OptimConfig(weight_decay=0.0, decay="cosine", b2=0.99),
        checkpoint=CheckpointConfig(every_steps=50, keep=2),
        logging=LoggingConfig(log_every=10),
        dpo=DPOConfig(beta=0.5),  # the dpo stage (pipeline.algorithms=ppo,dpo): docs/ALGORITHMS.md
        ppo=PPOConfig(response_len=24, temperature=1.0, kl_coef=0.2, epochs=4, minibatches=2, clip_ratio=0.2,
                      value_clip=0.2, gamma=1.0, lam=0.95, log_samples=2),
        pipeline=pipeline,
    )
