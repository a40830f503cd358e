"""Llama-3-8B with a SigLIP So400m vision tower (LLaVA's two-layer projector), image + text SFT on one TPU v5p-128
slice (64 chips): the multimodal plan of issue 29.

Plan (on a CPU-only machine with the `tpu` extra; docs/PLANS.md and docs/MULTIMODAL.md record the result):
  python -m instruct_jax plan --experiment experiments/llama3_8b_multimodal_v5p128.py --topology v5p:4x4x4 \
      --phases sft

The decoder is the 8B SFT experiment's (experiments/llama3_8b_sft_v5p128.py: 64-way FSDP, bf16 compute,
dots-saveable remat, chunked loss). The tower is SigLIP So400m/14 at 224 px (presets.VISION_PRESETS): 256
image tokens per image, 412M tower params + a 21.5M projector, trained with the decoder (PaliGemma's recipe;
`--set model.vision.freeze=true` is LLaVA's). Its weights carry the decoder's logical axes, so the same 64-way
FSDP splits them. Rows follow LLaVA-1.5's instruction tuning: 128 conversations of up to 2,048 tokens per step,
one image each (`vision.max_images`), its 256 image tokens written by the chat template at the image marker.

Only SFT takes images today: the reward-model and PPO builders do not yet, so `plan` plans this experiment's
SFT step alone (it marks rm / ppo as not planned). The SFT data path does not read images from conversation rows
yet either (docs/MULTIMODAL.md, "Not built yet"), so this experiment plans but does not train until it does.
"""

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.model.presets import LLAMA3_IMAGE_TOKEN, preset, vision_preset
from instruct_jax.parallel.mesh import MeshConfig


def get_config(arg=None) -> Config:
    vision = vision_preset("siglip-so400m-224", max_images=1, image_token_id=LLAMA3_IMAGE_TOKEN)
    return Config(
        name="llama3-8b-siglip-sft",
        model=preset("8b", dtype="bfloat16", remat="dots_no_batch", vision=vision),
        mesh=MeshConfig(data=1, fsdp=-1, num_devices=64, topology="v5p:4x4x4"),
        # LLaVA-1.5's visual instruction-tuning mixture as HuggingFaceH4/llava-instruct-mix-vsft ships it: chat
        # messages and a list of images per row (data.images_field).
        data=DataConfig(source="HuggingFaceH4/llava-instruct-mix-vsft", split="train", format="sft",
                        messages_field="messages", images_field="images",
                        tokenizer="/mnt/gcs/llama3-8b-params/tokenizer.json", chat_template="model"),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=100, decay="cosine", min_lr_ratio=0.1,
                          weight_decay=0.0, b2=0.95, grad_clip=1.0),
        train=TrainConfig(steps=5000, global_batch_size=128, microbatches=1, seq_len=2048, eval_every=500),
        checkpoint=CheckpointConfig(every_steps=500, keep=3),
        logging=LoggingConfig(log_every=10, peak_flops_per_device=459e12),  # v5p bf16 peak per chip
    )
