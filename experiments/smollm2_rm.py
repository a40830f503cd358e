"""Reward model on Anthropic HH-RLHF helpful-base pairs, trunk from SmolLM2-135M-Instruct (InstructGPT step 2).

Run, one GPU (defaults): the Hub's helpful-base train split (`Anthropic/hh-rlhf`, data_dir helpful-base,
~43k pairs) for one epoch, evaluated on its test split (the shared file below); the trunk starts from the
SmolLM2 SFT run (experiments/smollm2_sft.py), as InstructGPT starts its reward model from the SFT model:
  python -m instruct_jax rm --experiment experiments/smollm2_rm.py --workdir runs/smollm2-rm
  python benchmarks/rm_hh_baselines.py --experiment experiments/smollm2_rm.py --rm-workdir runs/smollm2-rm \
      --out runs/smollm2-rm/baselines.json
  python -m instruct_jax interop export --experiment experiments/smollm2_rm.py --workdir runs/smollm2-rm \
      --out runs/smollm2-rm-hf          # LlamaForSequenceClassification

CPU smoke (one CPU device; 12.5 CPU-minutes, 22 minutes wall on a shared 2-core machine): the 2,339
usable pairs of the shared test file split by prompt with seed 0, 20% of prompts held out (1,890 training
and 449 held-out pairs, the split docs/REWARD_MODEL.md reports baselines on), the trunk from the import,
nothing frozen; docs/INTEROP.md records the run:
  python -m instruct_jax rm --experiment experiments/smollm2_rm.py:cpu --workdir runs/smollm2-rm-cpu
  python benchmarks/rm_hh_baselines.py --experiment experiments/smollm2_rm.py:cpu \
      --out runs/smollm2-rm-cpu/baselines.json

The tokenizer and the ChatML chat template are the model's own (from the import folder, $SMOLLM2_IMPORT,
default runs/smollm2-import; see experiments/smollm2_sft.py for `interop import`): each HH dialogue's
turns up to the last "Assistant:" become the chat prompt, each side's final answer the assistant turn,
and the reward is read at its <|im_end|>. `train.init_from` ($SMOLLM2_SFT for gpu, default
runs/smollm2-sft; the import for cpu) may be any SmolLM2 LM export: its lm_head is dropped, the scalar
head starts fresh. The files need not exist to build the config; the rm command reads them.

arg: "gpu" (default, one GPU) or "cpu" (smoke).
"""

import importlib.util
import os

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, RewardConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.parallel.mesh import MeshConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
DATA = os.environ.get("INSTRUCT_JAX_DATA", os.path.join(ROOT, "data"))
HH_TEST = os.path.join(DATA, "hh_helpful_base_test.jsonl.gz")
IMPORT = os.environ.get("SMOLLM2_IMPORT", os.path.join(ROOT, "runs", "smollm2-import"))
SFT = os.environ.get("SMOLLM2_SFT", os.path.join(ROOT, "runs", "smollm2-sft"))

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
        raise ValueError(f"smollm2_rm.py: arg must be 'gpu' (default) or 'cpu', got {arg!r}")
    smollm2_135m = _sft_experiment().smollm2_135m
    model_data = dict(format="pairwise", transcript="hh", tokenizer=os.path.join(IMPORT, "tokenizer"),
                      chat_template="model", on_overlength="truncate")
    if arg == "cpu":
        # Sized for a 2-core CPU in about 15 minutes (12.5 CPU-minutes measured): 16 steps of 8 pairs (128 of
        # the 1,890 training pairs) at 128 tokens (the front of 74% of the pairs' longer side is cut, never the
        # answer's end), one evaluation of all 449 held-out pairs at the end (longer than the training).
        # One CPU device: 8 emulated ones run the same steps 1.5-2x slower on 2 cores.
        return Config(
            name="smollm2-rm-cpu",
            model=smollm2_135m(max_seq_len=128),
            mesh=MeshConfig(data=1, fsdp=-1),
            data=DataConfig(source=HH_TEST, eval_fraction=0.2, **model_data),
            optim=OptimConfig(learning_rate=3e-5, warmup_steps=2, decay="cosine", min_lr_ratio=0.1,
                              weight_decay=0.0),
            train=TrainConfig(steps=16, global_batch_size=8, seq_len=128, eval_every=0, init_from=IMPORT),
            checkpoint=CheckpointConfig(every_steps=0, keep=1, async_save=False),
            logging=LoggingConfig(log_every=1, tensorboard=False),
            reward=RewardConfig(reference_max_examples=64),
        )
    # One GPU: one epoch of the ~43k helpful-base training pairs at 64 pairs a step (InstructGPT trains its
    # reward model for one epoch: more overfits). 512 tokens cut the front of 5% of the test file's pairs.
    return Config(
        name="smollm2-rm",
        model=smollm2_135m(max_seq_len=512, dtype="bfloat16", remat="dots_no_batch"),
        mesh=MeshConfig(data=1, fsdp=-1),
        data=DataConfig(source="Anthropic/hh-rlhf", hub_data_dir="helpful-base", split="train", eval_source=HH_TEST,
                        **model_data),
        optim=OptimConfig(learning_rate=1e-5, warmup_steps=30, decay="cosine", min_lr_ratio=0.1, weight_decay=0.0),
        train=TrainConfig(steps=670, global_batch_size=64, microbatches=2, seq_len=512, eval_every=100,
                          init_from=SFT),
        checkpoint=CheckpointConfig(every_steps=100, keep=2),
        logging=LoggingConfig(log_every=10),
        reward=RewardConfig(reference_max_examples=2048),
    )
