"""The InstructGPT recipe on image + text prompts, on 8 emulated CPU devices (issue 29; docs/MULTIMODAL.md).

Run:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m instruct_jax pipeline --experiment experiments/tiny_multimodal_cpu.py --workdir runs/mm
  ... --seeds 0,1,2          one pipeline per seed and every seed's report

The built-in image task (instructgpt/image_task.py): 16 x 16 scenes of coloured shapes and scikit-learn's 8 x 8
digits, questions about them, a gold judge. A tower trained from scratch (4 x 4 patches: 16 image tokens per image,
2 blocks of width 64, LLaVA's MLP projector) in front of the text pipeline's decoder. Stages
(instructgpt/image_pipeline.py): task -> captioning from scratch (the base model) -> SFT -> labels -> reward model
-> PPO -> evaluation with the image ablation.

arg: "pipeline" (default) or "ci" (every stage, a fraction of the work, for the test suite).
"""

from instruct_jax.config import (CheckpointConfig, Config, LoggingConfig, OptimConfig, PipelineConfig, PPOConfig,
                                 StageConfig)
from instruct_jax.data.config import DataConfig
from instruct_jax.model.config import ModelConfig, VisionConfig
from instruct_jax.parallel.mesh import MeshConfig

ARGS = ("pipeline", "ci")  # the args get_config accepts (tests build each)
VOCAB = 512  # the task's sentencepiece vocabulary; the model's rows go one further: the image token
KINDS = ("count", "colour", "position", "largest", "digit")


def get_config(arg=None) -> Config:
    phase = arg or "pipeline"
    if phase not in ARGS:
        raise ValueError(f"tiny_multimodal_cpu.py: arg must be one of {ARGS}, got {arg!r}")
    stage = StageConfig
    if phase == "ci":
        pipeline = PipelineConfig(
            task="images", kinds=KINDS, caption_demos=256, sft_demos=128, eval_prompts=48, label_prompts=128,
            ppo_prompts=96, responses_per_prompt=4, max_new_tokens=16,
            pretrain=stage(steps=30, global_batch_size=16, seq_len=64, learning_rate=3e-3),
            sft=stage(steps=20, global_batch_size=16, seq_len=48, learning_rate=1e-3, eval_every=0),
            rm=stage(steps=8, global_batch_size=16, seq_len=48, learning_rate=1e-3),
            ppo=stage(steps=3, global_batch_size=32, seq_len=80, learning_rate=1e-4, warmup_steps=0))
    else:
        pipeline = PipelineConfig(
            task="images", kinds=KINDS, caption_demos=4000, sft_demos=1000, demo_chatty=0.3, demo_slip=0.1,
            label_prompts=2000, ppo_prompts=2000, responses_per_prompt=4, max_new_tokens=16,
            pretrain=stage(steps=500, global_batch_size=32, seq_len=64, learning_rate=2e-3),
            sft=stage(steps=400, global_batch_size=32, seq_len=48, learning_rate=1e-3, eval_every=50,
                      early_stop_patience=2),
            rm=stage(steps=400, global_batch_size=16, seq_len=48, learning_rate=3e-4),
            ppo=stage(steps=40, global_batch_size=64, seq_len=80, learning_rate=1e-4, warmup_steps=0))
    vision = VisionConfig(image_size=16, patch_size=4, d_model=64, num_layers=2, num_heads=4, mlp_dim=128,
                          projector="mlp", max_images=1, image_token_id=VOCAB)
    return Config(
        name="tiny-multimodal" + ("-ci" if phase == "ci" else ""),
        model=ModelConfig(vocab_size=VOCAB + 1, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                          mlp_dim=384, max_seq_len=128, vision=vision),
        mesh=MeshConfig(data=8, fsdp=1),  # pure data parallel: the model is tiny
        data=DataConfig(vocab_size=VOCAB),  # the pipeline writes the task's files and trains this tokenizer
        optim=OptimConfig(weight_decay=0.0, decay="cosine", b2=0.99),
        checkpoint=CheckpointConfig(every_steps=100, keep=2),
        logging=LoggingConfig(log_every=20),
        ppo=PPOConfig(response_len=16, temperature=1.0, kl_coef=0.2, epochs=4, minibatches=2, clip_ratio=0.2,
                      value_clip=0.2, gamma=1.0, lam=0.95, log_samples=2),
        pipeline=pipeline,
    )
