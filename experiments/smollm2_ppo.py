"""PPO of SmolLM2-135M-Instruct against the SmolLM2 HH reward model, on HH-RLHF prompts (InstructGPT step 3).

Run, one GPU (defaults), after experiments/smollm2_sft.py and experiments/smollm2_rm.py:
  python -m instruct_jax ppo --experiment experiments/smollm2_ppo.py --workdir runs/smollm2-ppo
  python -m instruct_jax interop export --experiment experiments/smollm2_ppo.py --workdir runs/smollm2-ppo \
      --out runs/smollm2-ppo-hf

CPU smoke (one CPU device, ~2 minutes on 2 cores for 2 iterations; policy and reference from the import,
the reward and value models from the CPU reward-model smoke; docs/INTEROP.md records a run):
  python -m instruct_jax rm --experiment experiments/smollm2_rm.py:cpu --workdir runs/smollm2-rm-cpu
  python -m instruct_jax ppo --experiment experiments/smollm2_ppo.py:cpu --workdir runs/smollm2-ppo-cpu

Four trees of one model (docs/PPO.md): the policy and the frozen reference start from `train.init_from`
(gpu: the SFT run, $SMOLLM2_SFT, default runs/smollm2-sft; cpu: the import, $SMOLLM2_IMPORT, default
runs/smollm2-import, which is already instruction-tuned), the reward model and the value model from the
reward-model run (`ppo.reward_model`: gpu $SMOLLM2_RM, default runs/smollm2-rm; cpu runs/smollm2-rm-cpu).
Prompts are HH-RLHF helpful-base dialogues up to their last Human turn (`transcript="hh"` on the "chosen"
field), rendered with the model's own ChatML template and left-padded to `data.max_prompt_len` tokens
(longer dialogues lose their front, keeping the start token). The CPU smoke holds out the same 20% of
prompts (seed 0) as the CPU reward model, so it samples only prompts the reward model trained on and
leaves its held-out prompts untouched. The files need not exist to build the config; the ppo command
reads them.

arg: "gpu" (default, one GPU) or "cpu" (smoke).
"""

import importlib.util
import os

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, PPOConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.parallel.mesh import MeshConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
DATA = os.environ.get("INSTRUCT_JAX_DATA", os.path.join(ROOT, "data"))
HH_TEST = os.path.join(DATA, "hh_helpful_base_test.jsonl.gz")
IMPORT = os.environ.get("SMOLLM2_IMPORT", os.path.join(ROOT, "runs", "smollm2-import"))
SFT = os.environ.get("SMOLLM2_SFT", os.path.join(ROOT, "runs", "smollm2-sft"))
RM = os.environ.get("SMOLLM2_RM", os.path.join(ROOT, "runs", "smollm2-rm"))
RM_CPU = os.path.join(ROOT, "runs", "smollm2-rm-cpu")

ARGS = ("gpu", "cpu")  # the args get_config accepts (tests build each); no arg = "gpu"


def _sft_experiment():
    """experiments/smollm2_sft.py, loaded by path (experiment files are not a package): one ModelConfig."""
    spec = importlib.util.spec_from_file_location("instruct_jax_experiment_smollm2_sft",
                                                  os.path.join(HERE, "smollm2_sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None) -> Config:
    if arg not in (None, "gpu", "cpu"):
        raise ValueError(f"smollm2_ppo.py: arg must be 'gpu' (default) or 'cpu', got {arg!r}")
    smollm2_135m = _sft_experiment().smollm2_135m
    prompts = dict(format="prompt", transcript="hh", prompt_field="chosen", tokenizer=os.path.join(IMPORT, "tokenizer"),
                   chat_template="model", on_overlength="truncate")
    # Adam as in the other phases (b2 0.95), with lm-human-preferences' eps 1e-5; a constant learning rate.
    optim = dict(warmup_steps=0, decay="constant", b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0, grad_clip=1.0)
    if arg == "cpu":
        # T = 80 prompt tokens + N = 32 response tokens + 1 <= 128, the length the CPU reward model trained at.
        # 32 tokens rarely finish a SmolLM2 answer, so most scores are ppo.missing_eos_score (-1); `raw_score`
        # is the reward model's own reading. 2 iterations of 8 prompts: it proves the pipeline, nothing more.
        return Config(
            name="smollm2-ppo-cpu",
            model=smollm2_135m(max_seq_len=128),
            mesh=MeshConfig(data=1, fsdp=-1),
            data=DataConfig(source=HH_TEST, eval_fraction=0.2, max_prompt_len=80, **prompts),
            optim=OptimConfig(learning_rate=2e-6, **optim),
            train=TrainConfig(steps=2, global_batch_size=8, seq_len=128, init_from=IMPORT),
            checkpoint=CheckpointConfig(every_steps=0, keep=1, async_save=False),
            logging=LoggingConfig(log_every=1, tensorboard=False),
            ppo=PPOConfig(reward="model", reward_model=RM_CPU, response_len=32, temperature=0.7, kl_coef=0.05,
                          epochs=2, minibatches=1, value_learning_rate=1e-5, log_samples=4),
        )
    # One GPU: 64 prompts a rollout, 4 epochs x 4 minibatches of 16 (lm-human-preferences' shape, scaled down),
    # 300 iterations = 19,200 episodes. T = 256 + N = 255 + 1 = 512 tokens: the reward model's training length;
    # answers still unfinished after 255 tokens score ppo.missing_eos_score. The four 135M trees with two Adam
    # states take ~4.5 GB, the rollout's KV cache (64 x 512 slots x 30 layers x 3 kv heads x 64 x 2) under 1 GB.
    return Config(
        name="smollm2-ppo",
        model=smollm2_135m(max_seq_len=512, dtype="bfloat16"),
        mesh=MeshConfig(data=1, fsdp=-1),
        data=DataConfig(source="Anthropic/hh-rlhf", hub_data_dir="helpful-base", split="train", max_prompt_len=256,
                        **prompts),
        optim=OptimConfig(learning_rate=2e-6, **optim),
        train=TrainConfig(steps=300, global_batch_size=64, seq_len=512, init_from=SFT),
        checkpoint=CheckpointConfig(every_steps=25, keep=2),
        logging=LoggingConfig(log_every=1),
        ppo=PPOConfig(reward="model", reward_model=RM, response_len=255, temperature=0.7, kl_coef=0.05,
                      adaptive_kl=True, kl_target=6.0, kl_horizon=10000, gamma=1.0, lam=0.95, epochs=4, minibatches=4,
                      clip_ratio=0.2, value_clip=0.2, value_learning_rate=1e-5, missing_eos="replace",
                      missing_eos_score=-1.0, log_samples=4),
    )
