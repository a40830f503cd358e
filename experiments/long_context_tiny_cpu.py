"""A tiny model trained at 32,768 tokens per row on 8 emulated CPU devices (sequence parallel).

Run:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m instruct_jax pretrain --experiment experiments/long_context_tiny_cpu.py --workdir runs/lc-tiny

Each row packs tinyshakespeare paragraphs into 32,768 tokens; the `sequence` mesh axis
splits it 8 ways (4,096 tokens per device) and `auto` attention is ring attention. The mask
keeps paragraphs apart, so the ring and blockwise kernels skip the cross-paragraph blocks.
arg: "ring" (default), "blockwise" (one device's worth of attention, the length still split
for the other layers) or any ATTENTION_IMPLS name, e.g. `:reference` to see the memory wall.
"""

import os

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.model.config import ATTENTION_IMPLS, ModelConfig
from instruct_jax.parallel.mesh import MeshConfig

DATA = os.environ.get("INSTRUCT_JAX_DATA",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
SEQ_LEN = 32768

ARGS = ("ring", "blockwise")  # the args tests build (any ATTENTION_IMPLS name is accepted)


def get_config(arg=None) -> Config:
    attention = arg or "ring"
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"long_context_tiny_cpu.py: arg must be one of {ATTENTION_IMPLS}, got {arg!r}")
    shakespeare = os.path.join(DATA, "tinyshakespeare.txt")
    return Config(
        name=f"long-context-tiny-{attention}",
        model=ModelConfig(vocab_size=1024, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          mlp_dim=96, max_seq_len=SEQ_LEN, rope_theta=500000.0, attention=attention,
                          attention_block_q=1024, attention_block_kv=1024,
                          loss_chunk=64),  # 32k positions: never hold the [1, T, V] logits
        mesh=MeshConfig(data=1, fsdp=1, sequence=8),
        data=DataConfig(source=shakespeare, format="text", text_unit="paragraph", vocab_size=1024,
                        eval_fraction=0.1, packing=True),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=2, decay="cosine"),
        train=TrainConfig(steps=8, global_batch_size=1, seq_len=SEQ_LEN, eval_every=8, eval_batches=1),
        checkpoint=CheckpointConfig(every_steps=0, keep=1, async_save=False),
        logging=LoggingConfig(log_every=1, tensorboard=False),
    )
