"""Tiny PPO (InstructGPT step 3) on 8 emulated CPU devices: SFT -> RM -> PPO on data/synthetic_prefs.py's task.

Run (each phase a minute or less on a 2-core CPU; all share the tinyshakespeare tokenizer):
  export XLA_FLAGS=--xla_force_host_platform_device_count=8
  python -m instruct_jax pretrain --experiment experiments/tiny_cpu.py:pretrain --workdir runs/tiny-pt
  python -m instruct_jax rm --experiment experiments/tiny_rm.py --workdir runs/tiny-rm \
      --set train.init_from=runs/tiny-pt
  python -m instruct_jax.data.synthetic_prefs --out runs/prefs.jsonl --n 2000
  python -m instruct_jax sft --experiment experiments/tiny_cpu.py:sft --workdir runs/tiny-sft-prefs --set \
      data.source=runs/prefs.jsonl data.prompt_field=prompt data.input_field= 'data.response_field=responses[0]' \
      data.tokenizer=runs/tiny-pt/tokenizer/spm_1024.model train.init_from=runs/tiny-pt train.seq_len=64 train.steps=100
  python -m instruct_jax ppo --experiment experiments/tiny_ppo.py --workdir runs/tiny-ppo
  python -m instruct_jax ppo --experiment experiments/tiny_ppo.py:toy --workdir runs/tiny-ppo-toy

The SFT step teaches the answer format (six words, then end-of-turn) on answers of random quality;
the reward model has learnt the preference (# positive words) - (# negative words); PPO then raises
the answers' quality. docs/PPO.md records a run (score -10.2 -> +12.3 in 40 iterations).

arg "rm" (default): the reward model of tiny_rm.py; the policy and the frozen reference start from
the SFT export, the value model from the reward model. arg "toy": no reward model; the score is the
number of " good" tokens in the response (ppo.reward=count); the value model's trunk starts from the
policy's. Paths are relative to the repository (--set train.init_from=... ppo.reward_model=...).
"""

import os

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, PPOConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "..", "runs")
DATA = os.environ.get("INSTRUCT_JAX_DATA", os.path.join(HERE, "..", "data"))

ARGS = ("rm", "toy")  # the args get_config accepts (tests build each)


def get_config(arg=None) -> Config:
    variant = arg or "rm"
    if variant not in ARGS:
        raise ValueError(f"tiny_ppo.py: arg must be one of {ARGS}, got {arg!r}")
    if variant == "rm":
        reward = dict(reward="model", reward_model=os.path.join(RUNS, "tiny-rm"))
    else:
        reward = dict(reward="count", count_text=" good", missing_eos="none")
    return Config(
        name=f"tiny-ppo-{variant}",
        # tiny_cpu.py's architecture (so its pretraining export loads) at tiny_rm.py's context length.
        model=ModelConfig(vocab_size=1024, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          mlp_dim=192, max_seq_len=64),
        mesh=MeshConfig(data=2, fsdp=-1),  # 2 x 4 on 8 emulated devices
        # The tokenizer of tiny_cpu.py:pretrain and tiny_rm.py (sentencepiece trained on tinyshakespeare).
        data=DataConfig(format="prompt", tokenizer_train_files=(os.path.join(DATA, "tinyshakespeare.txt"),),
                        vocab_size=1024, max_prompt_len=24),
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=0, decay="constant", b1=0.9, b2=0.999, eps=1e-5,
                          weight_decay=0.0, grad_clip=1.0),
        train=TrainConfig(steps=40, global_batch_size=32, seq_len=48, init_from=os.path.join(RUNS, "tiny-sft-prefs")),
        checkpoint=CheckpointConfig(every_steps=20, keep=2),
        logging=LoggingConfig(log_every=5),
        ppo=PPOConfig(synthetic_prompts=512, response_len=16, temperature=1.0, kl_coef=0.05, epochs=4, minibatches=2,
                      clip_ratio=0.2, value_clip=0.2, gamma=1.0, lam=0.95, log_samples=2, **reward),
    )
