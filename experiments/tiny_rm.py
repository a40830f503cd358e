"""A tiny reward model that learns a synthetic preference rule on 8 emulated CPU devices in about a minute.

Run:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m instruct_jax rm --experiment experiments/tiny_rm.py --workdir runs/tiny-rm
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m instruct_jax score --experiment experiments/tiny_rm.py --workdir runs/tiny-rm --input pairs.jsonl

The comparisons are generated in memory (data/synthetic_prefs.py): K = 2..4 answers of six
words, ranked by (# positive words) - (# negative words), ties allowed. The gold rule is
learnable by this model, so held-out pairwise accuracy should pass 90% (tests/test_reward_train.py
checks it). Normalization uses the best-ranked training answers as the reference set.
"""

import os

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, RewardConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig

DATA = os.environ.get("INSTRUCT_JAX_DATA",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))


def get_config(arg=None) -> Config:
    if arg:
        raise ValueError(f"tiny_rm.py takes no arg, got {arg!r}")
    return Config(
        name="tiny-rm",
        model=ModelConfig(vocab_size=1024, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          mlp_dim=192, max_seq_len=64),
        mesh=MeshConfig(data=2, fsdp=-1),  # 2 x 4 on 8 emulated devices
        # No source: reward.synthetic generates the rankings. The tokenizer is the tinyshakespeare
        # one of tiny_cpu.py, so its pretraining run can initialise the trunk (train.init_from).
        data=DataConfig(format="ranking", tokenizer_train_files=(os.path.join(DATA, "tinyshakespeare.txt"),),
                        vocab_size=1024, eval_fraction=0.2, max_responses=4),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=10, decay="cosine", weight_decay=0.0),
        train=TrainConfig(steps=150, global_batch_size=16, seq_len=48, eval_every=50),
        checkpoint=CheckpointConfig(every_steps=50, keep=2),
        logging=LoggingConfig(log_every=10),
        reward=RewardConfig(synthetic=2000, normalize_std=False),
    )
