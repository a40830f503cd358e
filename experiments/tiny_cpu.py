"""A tiny Llama-family model that trains in seconds on 8 emulated CPU devices.

Run:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m instruct_jax sft --experiment experiments/tiny_cpu.py --workdir runs/tiny-sft
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m instruct_jax pretrain --experiment experiments/tiny_cpu.py:pretrain --workdir runs/tiny-pt

arg: "sft" (default; Self-Instruct seed demonstrations) or "pretrain" (tinyshakespeare text).
Data files come from $INSTRUCT_JAX_DATA, else ../shared/data beside the repository; any
local path or Hub dataset name works with --set data.source=...
"""

import os

from instruct_jax.config import (CheckpointConfig, Config, LoggingConfig, MeshConfig, ModelConfig, OptimConfig,
                                 TrainConfig)
from instruct_jax.data.config import DataConfig

DATA = os.environ.get("INSTRUCT_JAX_DATA",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


ARGS = ("sft", "pretrain")  # the args get_config accepts (tests build each)


def get_config(arg=None) -> Config:
    phase = arg or "sft"
    if phase not in ("sft", "pretrain"):
        raise ValueError(f"tiny_cpu.py: arg must be 'sft' or 'pretrain', got {arg!r}")
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
