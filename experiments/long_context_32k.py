"""Extending SmolLM2-135M (8,192-token context) to GPT-4's 32,768 tokens.

Continued next-token training at seq_len 32768 on packed text, with YaRN RoPE scaling
(factor 4 = 32768 / 8192, Peng et al. 2023) so that the pretrained rotary frequencies are
interpolated rather than extrapolated, and the sequence split over a `sequence` mesh axis
(ring attention; docs/LONG_CONTEXT.md).

Run (TPU v5p-16 slice, 8 chips: the sequence split 8 ways, 4,096 tokens per chip):
  python -m instruct_jax pretrain --experiment experiments/long_context_32k.py --workdir runs/lc32k
One GPU (no sequence axis: blockwise / cuDNN attention and full rematerialisation instead):
  python -m instruct_jax pretrain --experiment experiments/long_context_32k.py:gpu --workdir runs/lc32k-gpu
Attention choice: --set model.attention=ring|blockwise|splash|cudnn (default auto: ring when
the length axis is split, else Splash on TPU / cuDNN on GPU / blockwise on CPU).

The starting params are the `interop import` folder of experiments/smollm2_sft.py
($SMOLLM2_IMPORT, default runs/smollm2-import); train.init_from points at it.

arg: "tpu" (default) or "gpu".
"""

import os

from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, TrainConfig
from instruct_jax.data.config import DataConfig
from instruct_jax.parallel.mesh import MeshConfig

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("INSTRUCT_JAX_DATA", os.path.join(HERE, "..", "data"))
IMPORT = os.environ.get("SMOLLM2_IMPORT", os.path.join(HERE, "..", "runs", "smollm2-import"))
SEQ_LEN = 32768
PRETRAINED_LEN = 8192  # SmolLM2-135M's context (its GGUF's context_length)

ARGS = ("tpu", "gpu")  # the args get_config accepts (tests build each); no arg = "tpu"


def _smollm2_135m(**overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location("smollm2_sft", os.path.join(HERE, "smollm2_sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.smollm2_135m(**overrides)


def get_config(arg=None) -> Config:
    if arg not in (None, "tpu", "gpu"):
        raise ValueError(f"long_context_32k.py: arg must be 'tpu' (default) or 'gpu', got {arg!r}")
    tpu = arg != "gpu"
    model = _smollm2_135m(
        max_seq_len=SEQ_LEN, dtype="bfloat16", remat="save_attention_out" if tpu else "full",
        rope_type="yarn", rope_factor=SEQ_LEN / PRETRAINED_LEN, rope_original_max_len=PRETRAINED_LEN,
        attention="auto", attention_block_q=512, attention_block_kv=512,
        loss_chunk=64)  # 32k positions x 49k vocabulary: never hold the full logits
    mesh = (MeshConfig(data=1, fsdp=1, sequence=8, num_devices=8, topology="v5p:2x2x2") if tpu
            else MeshConfig(data=1, fsdp=-1, num_devices=1))
    return Config(
        name="long-context-32k" + ("" if tpu else "-gpu"),
        model=model,
        mesh=mesh,
        data=DataConfig(source=os.path.join(DATA, "tinyshakespeare.txt"), format="text", text_unit="paragraph",
                        tokenizer=os.path.join(IMPORT, "tokenizer"), eval_fraction=0.05, packing=True),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=10, decay="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=200, global_batch_size=1, seq_len=SEQ_LEN, eval_every=50, eval_batches=1,
                          init_from=IMPORT),
        checkpoint=CheckpointConfig(every_steps=50, keep=2),
        logging=LoggingConfig(log_every=5),
    )
