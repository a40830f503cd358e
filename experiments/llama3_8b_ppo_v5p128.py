"""Llama-3-8B PPO against an 8B reward model on one TPU v5p-128 slice (64 chips), InstructGPT-style.

Run (on every worker of the slice, see tpu/README.md), after the SFT and reward-model phases:
  python -m instruct_jax ppo --experiment experiments/llama3_8b_ppo_v5p128.py \
      --workdir gs://BUCKET/llama3-8b-ppo \
      --set train.init_from=gs://BUCKET/llama3-8b-sft ppo.reward_model=gs://BUCKET/llama3-8b-rm

Four parameter trees of the same model code on one 64-way FSDP mesh: the policy and the value model
train (params + Adam moments: 8B x 12 bytes each, 1.5 GB per chip each), the reference and the
reward model are frozen (0.5 GB per chip each). Rollouts decode in this mesh with the KV cache
(512 prompts x (512 + 512) slots x 32 layers x 8 kv heads x 128 x 2 (k, v) x 2 bytes = 69 GB over
the slice, about 1.1 GB per chip), then one forward pass per model scores them.

Settings follow InstructGPT's appendix C.4 where it gives them: 512 prompts per rollout, minibatches
of 64 (8 optimizer steps, one epoch), KL coefficient 0.02, no discount (gamma 1, lambda 0.95), clip
0.2, sampling temperature 1, policy EMA 0.992, PPO-ptx with coefficient 27.8 on pretraining text.
256k episodes = 500 iterations x 512 prompts.
"""

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, PPOConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig

TOKENIZER = "gs://BUCKET/llama3-8b-params/tokenizer.json"


def get_config(arg=None) -> Config:
    return Config(
        name="llama3-8b-ppo",
        model=ModelConfig(
            vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
            mlp_dim=14336, max_seq_len=8192, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0,
            rope_original_max_len=8192, norm_eps=1e-5, dtype="bfloat16", remat="dots_no_batch",
            loss_chunk=64),  # 128k vocabulary: the loss never holds [B, T, V] (config.py)
        mesh=MeshConfig(data=1, fsdp=-1, num_devices=64, topology="v5p:4x4x4"),
        # Prompts: the HH-RLHF dialogues up to their last Assistant turn, left-padded to 512 tokens.
        data=DataConfig(source="Anthropic/hh-rlhf", hub_data_dir="helpful-base", split="train", format="prompt",
                        transcript="hh", prompt_field="chosen", tokenizer=TOKENIZER, chat_template="model",
                        max_prompt_len=512, on_overlength="truncate"),
        optim=OptimConfig(learning_rate=9e-6, warmup_steps=10, decay="cosine", min_lr_ratio=0.1, b1=0.9, b2=0.95,
                          eps=1e-5, weight_decay=0.0, grad_clip=1.0),
        # steps = PPO iterations; global_batch_size = prompts per rollout; seq_len = ptx rows' length.
        train=TrainConfig(steps=500, global_batch_size=512, seq_len=1024, init_from="gs://BUCKET/llama3-8b-sft"),
        checkpoint=CheckpointConfig(every_steps=25, keep=3),
        logging=LoggingConfig(log_every=1, peak_flops_per_device=459e12),
        ppo=PPOConfig(reward="model", reward_model="gs://BUCKET/llama3-8b-rm", response_len=512, temperature=1.0,
                      kl_coef=0.02, gamma=1.0, lam=0.95, epochs=1, minibatches=8, clip_ratio=0.2, value_clip=0.2,
                      value_learning_rate=9e-6, missing_eos="replace", missing_eos_score=-1.0,
                      ema_decay=0.992, ptx_coef=27.8, ptx_batch_size=64,
                      # 500 iterations x 64 x 8 minibatches = 256k packed sequences of 1,024 tokens (~262M
                      # tokens); 400k fineweb-edu documents cover that, instead of all 9.7M rows of sample-10BT.
                      ptx=DataConfig(source="HuggingFaceFW/fineweb-edu", hub_config="sample-10BT", format="text",
                                     tokenizer=TOKENIZER, max_rows=400_000)),
    )
