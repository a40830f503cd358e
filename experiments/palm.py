"""PaLM 62B and 540B (parallel attention + MLP block, multi-query attention, 256k tied vocabulary) on TPU
v4 and v5p pods: SFT and four-model PPO. These runs are planned, not run: docs/PLANS.md holds what the
TPU compiler says about them (python -m instruct_jax plan; needs the `tpu` extra, no TPU).

  python -m instruct_jax plan --experiment experiments/palm.py:540b-v5p --topology v5p:16x16x24
  python -m instruct_jax plan --experiment experiments/palm.py:540b-v4 --topology v4:16x16x12 --slices 2
  python -m instruct_jax plan --experiment experiments/palm.py:540b-v5p-ppo --topology v5p:16x16x24 --phases ppo
  python -m instruct_jax plan --experiment experiments/palm.py:62b-v5p --topology v5p:8x8x8

arg "<size>-<pod>[-ppo]": size 540b | 62b, pod v5p | v4.

540B on 6,144 chips: one v5p:16x16x24 slice, or two 3,072-chip v4 pods (v4:16x16x12 x 2 slices, PaLM's
own hardware). 62B on 512 chips (v5p:8x8x8 or v4:8x8x8). Mesh: tensor parallelism x FSDP over the rest,
batch over (data, fsdp). Each mesh axis must be a product of physical torus axes: on v5p:16x16x24,
tensor 24 is the third torus axis and fsdp 256 = 16 x 16 (PaLM's 12-way model parallelism is not a
product of 16, 16 and 24). v4 topologies here expose both TensorCores of a chip as devices (16 GiB
each), so v4 meshes count 2 devices per chip: 540B's tensor 24 = 12 chips x 2 cores.

Multi-query attention has one key/value head, which cannot be split: kv heads replicate (1/48 of the
attention weights). The vocabulary is padded from 256,000 to 256,512 rows (a multiple of 24 x 128 and
of 512; the tokenizer never emits the extra ids) so the embedding table splits over tensor like every
other weight. Unpadded, the table would have to replicate over tensor (`vocab: None`): the TPU compiler
then runs out of HBM on v4 for the whole table and its f32 gradient on every device (37.7 GB).

SFT: PaLM's final batch, 2,048 sequences of 2,048 tokens (4M tokens; 512 for 62B), full remat (each
layer saves only its input). PPO: prompts of 1,024 tokens, 1,023-token responses, one epoch of 8
minibatches; a minibatch must cover every batch shard (540B: 4,096 prompts, 512 per minibatch).
"""

from instruct_jax.config import Config, LoggingConfig, OptimConfig, PPOConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.model.presets import preset
from instruct_jax.parallel.mesh import MeshConfig

ARGS = ("540b-v5p", "540b-v4", "540b-v5p-ppo", "540b-v4-ppo", "62b-v5p", "62b-v4", "62b-v5p-ppo")

# (size, pod) -> (mesh, SFT sequences per step, PPO prompts per rollout)
MESHES = {
    ("540b", "v5p"): (MeshConfig(fsdp=-1, tensor=24, num_devices=6144, topology="v5p:16x16x24"), 2048, 4096),
    ("540b", "v4"): (MeshConfig(fsdp=-1, tensor=24, dcn_data=2, num_devices=12288, num_slices=2,
                                topology="v4:16x16x12"), 2048, 4096),
    ("62b", "v5p"): (MeshConfig(fsdp=-1, tensor=8, num_devices=512, topology="v5p:8x8x8"), 512, 512),
    ("62b", "v4"): (MeshConfig(fsdp=-1, tensor=16, num_devices=1024, topology="v4:8x8x8"), 512, 512),
}
PEAK_PER_DEVICE = {"v5p": 459e12, "v4": 275e12 / 2}  # bf16 FLOP/s: a v5p chip, half a v4 chip
MQA_RULES = (("kv_heads", None), ("act_kv_heads", None), ("cache_kv_heads", None))
VOCAB = {"540b": 256512, "62b": 256000}  # rows of the embedding table (256,000 divides 8 and 16 already)
TOKENIZER = "gs://BUCKET/palm/tokenizer.model"


def get_config(arg=None) -> Config:
    arg = arg or "540b-v5p"
    size, _, rest = arg.partition("-")
    pod, _, phase = rest.partition("-")
    if (size, pod) not in MESHES or phase not in ("", "ppo"):
        raise ValueError(f"palm.py: arg must be one of {ARGS}, got {arg!r}")
    mesh, sft_batch, ppo_batch = MESHES[size, pod]
    cfg = Config(
        name=f"palm-{arg}",
        model=preset(f"palm-{size}", vocab_size=VOCAB[size], dtype="bfloat16", remat="full"),
        mesh=MeshConfig(**{**mesh.__dict__, "rules": MQA_RULES}),
        data=DataConfig(source="HuggingFaceH4/ultrachat_200k", split="train_sft", format="sft",
                        messages_field="messages", tokenizer=TOKENIZER),
        optim=OptimConfig(learning_rate=1e-5, warmup_steps=100, decay="cosine", b2=0.99, grad_clip=1.0),
        train=TrainConfig(steps=1000, global_batch_size=sft_batch, seq_len=2048),
        logging=LoggingConfig(peak_flops_per_device=PEAK_PER_DEVICE[pod]),
    )
    if phase == "ppo":
        cfg.data = DataConfig(source="Anthropic/hh-rlhf", hub_data_dir="helpful-base", split="train", format="prompt",
                              transcript="hh", prompt_field="chosen", tokenizer=TOKENIZER, max_prompt_len=1024,
                              on_overlength="truncate")
        cfg.train = TrainConfig(steps=100, global_batch_size=ppo_batch, seq_len=2048,
                                init_from=f"gs://BUCKET/palm-{size}-sft")
        cfg.ppo = PPOConfig(reward_model=f"gs://BUCKET/palm-{size}-rm", response_len=1023, kl_coef=0.02, epochs=1,
                            minibatches=8)
    return cfg
