"""Reward model on Anthropic HH-RLHF helpful-base pairs: a CPU-sized run and a GPU-sized one.

Run (cpu: the 2,354 pairs of data/hh_helpful_base_test.jsonl.gz, 20% of prompts held
out, a tiny trunk trained from scratch; a few minutes on a 2-core CPU):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m instruct_jax rm --experiment experiments/hh_rm.py:cpu --workdir runs/hh-rm
  python benchmarks/rm_hh_baselines.py --experiment experiments/hh_rm.py:cpu --rm-workdir runs/hh-rm

The trunk and tokenizer match experiments/tiny_cpu.py, so a tinyshakespeare pretraining run can
initialise the trunk (the head always starts fresh):
  python -m instruct_jax pretrain --experiment experiments/tiny_cpu.py:pretrain --workdir runs/tiny-pt-400 \
      --set train.steps=400 train.eval_every=200 checkpoint.every_steps=200
  python -m instruct_jax rm --experiment experiments/hh_rm.py:cpu --workdir runs/hh-rm-pt \
      --set train.init_from=runs/tiny-pt-400

gpu: train on the Hub's full helpful-base train split (~43k pairs; `Anthropic/hh-rlhf`,
data_dir helpful-base), evaluate on the shared test file, a 12-layer trunk at 1,024 tokens in
bfloat16; set train.init_from to an SFT run of the same model to follow InstructGPT:
  python -m instruct_jax rm --experiment experiments/hh_rm.py:gpu --workdir runs/hh-rm-gpu \
      --set train.init_from=runs/hh-sft-gpu

docs/REWARD_MODEL.md reports what each gets next to the "longer answer wins" and
bag-of-words baselines on the same held-out pairs.
"""

import os

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, RewardConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig

DATA = os.environ.get("INSTRUCT_JAX_DATA",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
HH_TEST = os.path.join(DATA, "hh_helpful_base_test.jsonl.gz")

ARGS = ("cpu", "gpu")  # the args get_config accepts (tests build each)


def get_config(arg=None) -> Config:
    size = arg or "cpu"
    if size not in ARGS:
        raise ValueError(f"hh_rm.py: arg must be one of {ARGS}, got {arg!r}")
    if size == "cpu":
        return Config(
            name="hh-rm-cpu",
            # The trunk of tiny_cpu.py (so its pretraining export loads); 256 tokens keep each
            # answer's end (truncation drops the start of long dialogues, never the end-of-turn).
            model=ModelConfig(vocab_size=1024, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                              mlp_dim=192, max_seq_len=256),
            mesh=MeshConfig(data=2, fsdp=-1),
            data=DataConfig(source=HH_TEST, format="pairwise", transcript="hh", eval_fraction=0.2,
                            tokenizer_train_files=(os.path.join(DATA, "tinyshakespeare.txt"),), vocab_size=1024),
            optim=OptimConfig(learning_rate=1e-3, warmup_steps=10, decay="cosine", weight_decay=0.01),
            # ~1,890 training pairs / 32 = 59 steps per epoch: two epochs.
            train=TrainConfig(steps=120, global_batch_size=32, seq_len=256, eval_every=30),
            checkpoint=CheckpointConfig(every_steps=60, keep=2),
            logging=LoggingConfig(log_every=10),
            reward=RewardConfig(reference_max_examples=512),
        )
    shared_text = tuple(os.path.join(DATA, f) for f in ("tinyshakespeare.txt", "self_instruct_seed_tasks.jsonl",
                                                        "self_instruct_user_oriented_eval.jsonl"))
    return Config(
        name="hh-rm-gpu",
        model=ModelConfig(vocab_size=8192, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64,
                          mlp_dim=2048, max_seq_len=1024, dtype="bfloat16", remat="dots"),
        mesh=MeshConfig(data=1, fsdp=-1),
        data=DataConfig(source="Anthropic/hh-rlhf", hub_data_dir="helpful-base", split="train", format="pairwise",
                        transcript="hh", eval_source=HH_TEST, tokenizer_train_files=shared_text, vocab_size=8192),
        optim=OptimConfig(learning_rate=9e-6, warmup_steps=50, decay="cosine", weight_decay=0.0),
        # One epoch of ~43k pairs at 64 per step; InstructGPT: one epoch (more overfits), lr 9e-6 (6B RM).
        train=TrainConfig(steps=670, global_batch_size=64, seq_len=1024, eval_every=100),
        checkpoint=CheckpointConfig(every_steps=100, keep=3),
        logging=LoggingConfig(log_every=10),
        reward=RewardConfig(reference_max_examples=2048),
    )
