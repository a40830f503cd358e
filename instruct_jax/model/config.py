"""The model's section of the config: architecture, numerics and kernels. Every field is documented once, here."""

from __future__ import annotations

from dataclasses import dataclass, field


# ----------------------------------------------------------------------------- model
ROPE_TYPES = ("default", "linear", "ntk", "yarn", "llama3")


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")


# auto: by backend, length and mesh (model/attention/dispatch.py: select_implementation); reference: einsum
# with [T, S] scores; blockwise: flash-style, linear memory; ring: sequence-parallel over the mesh
# axis of "length"; splash: TPU Pallas kernel; cudnn: GPU fused kernel (packed rows -> blockwise).
ATTENTION_IMPLS = ("auto", "reference", "blockwise", "ring", "splash", "cudnn")


@dataclass
class VisionConfig:
    """The vision tower (model/vision.py): off while image_size is 0. Sizes of a SigLIP-style encoder and its
    projector; images arrive resized to image_size x image_size x channels and normalised."""

    image_size: int = 0  # pixels per side; 0 = text only (no tower, no params)
    patch_size: int = 4  # pixels per patch side: (image_size / patch_size)^2 patches per image
    channels: int = 3
    d_model: int = 64  # the tower's width
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    norm_eps: float = 1e-6
    projector: str = "mlp"  # linear (PaliGemma) | mlp (LLaVA: linear, GELU, linear)
    max_images: int = 1  # image slots per row (unused slots are masked out by placement)
    image_token_id: int = -1  # the placeholder token the chat template writes tokens_per_image times per image
    freeze: bool = False  # stop gradients at the tower's output (the projector still trains)
    # Which tower output feeds the projector. 0: the native tower (PaliGemma), every layer then the final
    # LayerNorm. -k (1 <= k <= num_layers): Hugging Face LLaVA's `vision_feature_layer` -k, i.e. hidden_states[-k]
    # of the num_layers + 1 states (patch embeddings, then each block's output): the first num_layers + 1 - k
    # blocks run, with no final LayerNorm; later blocks never run and hold no params (`depth`).
    feature_layer: int = 0
    # Which of those tokens the projector gets (LLaVA's `vision_feature_select_strategy`): full = every patch;
    # default = all but the first (CLIP's class token; a SigLIP tower has none, so its first patch is dropped).
    feature_select: str = "full"
    # prefix-LM (PaliGemma): each example's prompt (its image tokens and prompt text, ModelInput.prefix) attends
    # bidirectionally; the answer stays causal. False: causal everywhere.
    prefix_lm: bool = False

    @property
    def enabled(self) -> bool:
        return self.image_size > 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def depth(self) -> int:
        """Tower blocks that run (and hold params): all of them, or those up to feature_layer."""
        return self.num_layers if self.feature_layer >= 0 else self.num_layers + 1 + self.feature_layer

    @property
    def tokens_per_image(self) -> int:
        """Image tokens the chat template writes per image (= the projector's outputs per image)."""
        return self.num_patches - (1 if self.feature_select == "default" else 0)


@dataclass
class ModelConfig:
    vocab_size: int = 256  # rows of the embedding table (tokenizer vocab, rounded up is fine)
    d_model: int = 64  # residual stream width
    num_layers: int = 2  # transformer blocks (stacked with nn.scan)
    num_heads: int = 4  # query heads
    num_kv_heads: int = 4  # key/value heads; < num_heads is grouped-query attention
    head_dim: int = 16  # per-head width (need not be d_model / num_heads)
    mlp_dim: int = 256  # SwiGLU hidden width
    max_seq_len: int = 2048  # longest position the model is used at (rotary tables, caches)
    rope_theta: float = 10000.0  # rotary base
    rope_type: str = "default"  # one of ROPE_TYPES: scaling for context extension
    rope_factor: float = 1.0  # context extension factor (linear / ntk / yarn / llama3)
    rope_original_max_len: int = 8192  # pre-extension context (llama3 / yarn)
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above orig_len/low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below orig_len/high are kept
    rope_beta_fast: float = 32.0  # yarn: rotations at which interpolation starts ramping
    rope_beta_slow: float = 1.0  # yarn: rotations at which interpolation is full
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # output projection = embedding table transposed
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2)
    parallel_block: bool = False  # PaLM block: x + attn(norm(x)) + mlp(norm(x)), one shared pre-norm
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params are always float32)
    remat: str = "none"  # one of REMAT_POLICIES: what each scanned block saves for backward
    attention: str = "auto"  # one of ATTENTION_IMPLS
    attention_block_q: int = 512  # blockwise / ring: query rows per tile (memory ~ block_q * block_kv per head)
    attention_block_kv: int = 512  # blockwise / ring: key rows per tile
    init_std: float = 0.02  # normal init std of every weight matrix
    # LoRA (model/lora.py): rank-r adapters on lora_targets, the base frozen; 0 = off (full fine-tuning)
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_targets: tuple = ("q", "v")  # among q, k, v, o, gate, up, down
    # params trained in full beside the adapters, by name (PEFT's modules_to_save): e.g. ("embedding", "lm_head")
    # when fine-tuning teaches tokens the base never saw (a chat template's markers), norms ("final_norm", ...)
    lora_train: tuple = ()
    # LM training loss: logits for this many positions at a time (fused, chunked cross-entropy that
    # never holds [B, T, V]); 0 = all at once. Chunking saves memory for large vocabularies and long
    # sequences (the 8B / PaLM presets and the long-context experiments use 64); where memory is not
    # the limit it changes nothing measurable (2-core CPU, SmolLM2-135M SFT step: 123 tokens/s with 0,
    # 125 with 64, docs/BENCHMARKS.md), and 0 is the plain loss.
    loss_chunk: int = 0
    vision: VisionConfig = field(default_factory=VisionConfig)  # image inputs (issue 29); off by default

    def __post_init__(self):
        if isinstance(self.vision, dict):  # ModelConfig(**dataclasses.asdict(cfg)), e.g. a model.json's "model"
            self.vision = VisionConfig(**self.vision)
