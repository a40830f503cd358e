"""Llama-3-8B SFT on one TPU v5p-128 slice (64 chips; v5p names count TensorCores, 2 per chip).

Run (on every worker of the slice, see tpu/README.md; /mnt/gcs is a gcsfuse mount of a bucket):
  python -m instruct_jax sft --experiment experiments/llama3_8b_sft_v5p128.py \
      --workdir /mnt/gcs/llama3-8b-sft --set train.init_from=/mnt/gcs/llama3-8b-params

Mesh: 64-way FSDP (params, grads and Adam moments each split 64 ways: 8B x 16 bytes / 64
= 2 GB per chip), no tensor parallelism (8 KV heads and d_model 4096 do not need it at
this size), batch over (data, fsdp). Sequences of 8,192 tokens, the model's native
context, with dots-saveable remat so activations fit in the 95 GB of HBM.
"""

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig


def get_config(arg=None) -> Config:
    return Config(
        name="llama3-8b-sft",
        model=ModelConfig(
            vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
            mlp_dim=14336, max_seq_len=8192, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0,
            rope_original_max_len=8192, norm_eps=1e-5, dtype="bfloat16", remat="dots_no_batch",
            loss_chunk=64),  # 128k vocabulary: the loss never holds [B, T, V] (config.py)
        mesh=MeshConfig(data=1, fsdp=-1, num_devices=64, topology="v5p:4x4x4"),
        data=DataConfig(source="HuggingFaceH4/ultrachat_200k", split="train_sft", format="sft",
                        messages_field="messages", tokenizer="/mnt/gcs/llama3-8b-params/tokenizer.json",
                        chat_template="model"),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=100, decay="cosine", min_lr_ratio=0.1,
                          weight_decay=0.0, b2=0.95, grad_clip=1.0),
        train=TrainConfig(steps=2000, global_batch_size=128, microbatches=1, seq_len=8192, eval_every=200),
        checkpoint=CheckpointConfig(every_steps=200, keep=3),
        logging=LoggingConfig(log_every=10, peak_flops_per_device=459e12),  # v5p bf16 peak per chip
    )
