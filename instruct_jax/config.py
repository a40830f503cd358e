"""Typed configuration: dataclasses, experiment-file loading, dotted overrides, validation.

An experiment is a Python file with `get_config(arg=None) -> Config`. The CLI loads it by
path (`experiments/tiny_cpu.py:sft`), applies `--set section.field=value` overrides, and
validates the result before anything is compiled. Every field is documented once, here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from instruct_jax import files
from instruct_jax.data.config import DataConfig, DataConfigError, validate_data_config
from instruct_jax.errors import ConfigError
from instruct_jax.model.config import ATTENTION_IMPLS, REMAT_POLICIES, ROPE_TYPES, ModelConfig
from instruct_jax.model.lora import LORA_TARGETS
from instruct_jax.model.vision import validate_vision
from instruct_jax.parallel.distributed import DistributedConfig
from instruct_jax.parallel.mesh import MeshConfig, batch_axes, batch_shards, resolve_mesh_shape
from instruct_jax.parallel.sharding import check_rules


# ----------------------------------------------------------------------------- optimizer
@dataclass
class OptimConfig:
    learning_rate: float = 3e-4  # peak learning rate
    warmup_steps: int = 10  # linear warmup from 0 to the peak
    decay: str = "cosine"  # after warmup: cosine | linear | constant
    min_lr_ratio: float = 0.1  # final lr = peak * min_lr_ratio (cosine / linear)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    no_decay: tuple = ("norm", "bias", "embedding")  # params whose path contains these skip decay
    grad_clip: float = 1.0  # clip by global norm; 0 disables
    mu_dtype: str = "float32"  # dtype of Adam's first moment: float32 | bfloat16


# ----------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    global_batch_size: int = 8  # sequences per optimizer step, over all hosts
    microbatches: int = 1  # gradient accumulation: the step scans over this many slices
    seq_len: int = 128  # tokens per sequence (packed or padded)
    eval_every: int = 50  # run evaluation every N steps (0 = only at the end)
    eval_batches: int = 4  # global batches per evaluation
    init_from: str = ""  # params-only checkpoint dir (or workdir of an earlier phase) to start from
    # Numerical guards (train/guards.py): a step whose loss or gradient norm is non-finite is skipped
    # (params and optimizer state unchanged, the batch consumed); this many in a row stop the run
    # after a checkpoint of the last good state.
    max_nonfinite_in_a_row: int = 10
    loss_spike_factor: float = 0.0  # > 1: also skip a step whose loss > factor * running mean; 0 = off
    loss_spike_window: int = 50  # running-mean horizon, and finite steps seen before spikes are tested
    # Early stopping (pretrain / sft): stop once eval_loss has not improved on its best by more than
    # early_stop_min_delta for this many evaluations in a row; the params at the stop are exported.
    # 0 = off (train all `steps`). Needs eval_every > 0.
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0


@dataclass
class CheckpointConfig:
    every_steps: int = 50  # save every N steps (and always at the end); 0 = only at the end
    keep: int = 3  # keep the last K checkpoints
    keep_every: int = 0  # additionally keep every M-th step forever; 0 = off
    async_save: bool = True  # write in the background while training continues
    # Multi-process runs: every process agrees whether any got SIGTERM (a collective) at logging and checkpoint
    # steps and every this many steps; a preemption is noticed at most this many steps late. One process: every
    # step (a flag read, no device work).
    preemption_check_every: int = 10


@dataclass
class LoggingConfig:
    log_every: int = 10  # write metrics every N steps
    tensorboard: bool = True  # also write TensorBoard event files (tensorboardX)
    progress_bar: bool = True  # tqdm bar on process 0
    peak_flops_per_device: float = 0.0  # for MFU; 0 = measure a matmul peak on this backend
    profile_start: int = -1  # first step of a jax.profiler trace; -1 = no profiling
    profile_steps: int = 3  # how many steps the trace covers


# ----------------------------------------------------------------------------- reward model
def _default_reward_reference() -> DataConfig:
    return DataConfig(format="sft")


@dataclass
class RewardConfig:
    """The reward model (`python -m instruct_jax rm`); docs/REWARD_MODEL.md. Data comes from `data`."""

    margin: float = 0.0  # loss per pair = -log sigmoid(r_better - r_worse - margin); 0 = InstructGPT
    # Normalization after training: raw -> gain * raw + bias, with bias such that the reference
    # demonstrations score mean 0 (InstructGPT) and, if normalize_std, gain such that their std is 1.
    normalize_std: bool = False
    # Reference demonstrations, read with this DataConfig's source, format (sft: the final
    # assistant turn is the response; pairwise / ranking: the best-ranked responses) and field
    # mapping; the tokenizer and chat template are the reward model's. source "" = the
    # best-ranked responses of the reward model's own training comparisons.
    reference: DataConfig = field(default_factory=_default_reward_reference)
    reference_max_examples: int = 512  # score at most this many reference sequences (seeded sample; 0 = all)
    margin_buckets: int = 4  # evaluation: accuracy per quantile bucket of |r_better - r_worse|
    synthetic: int = 0  # > 0: train on this many generated rankings (data/synthetic_prefs.py), not data.source
    score_batch_size: int = 0  # sequences per scoring forward (normalization, `score`); 0 = 2 * global batch


# ----------------------------------------------------------------------------- DPO
DPO_LOSSES = ("sigmoid", "ipo", "plackett_luce")


@dataclass
class DPOConfig:
    """Direct preference optimisation (`python -m instruct_jax dpo`); docs/ALGORITHMS.md. Rankings come from `data`
    (pairwise / ranking) or `reward.synthetic`; the policy and its frozen reference start from `train.init_from`."""

    beta: float = 0.1  # implicit reward = beta * (log pi(y|x) - log pi_ref(y|x)); larger = closer to the reference
    # sigmoid: DPO, -log sigmoid(r_better - r_worse) per pair | ipo: (h - 1 / (2 beta))^2, h the log-ratio gap |
    # plackett_luce: the K-wise ranking's likelihood as successive choices (train/dpo/losses.py)
    loss: str = "sigmoid"


# ----------------------------------------------------------------------------- PPO
def _default_ptx_data() -> DataConfig:
    return DataConfig(format="text")


# Fields that no longer exist: setting one (an experiment file, --set) fails naming it and what to use
# instead, rather than being silently ignored or reported as a mere unknown key.
REMOVED_FIELDS = {
    "ppo.vf_coef": "removed: the policy and the value model have separate Adam optimizers, so a coefficient on "
                   "the value loss only rescales the value gradients, which Adam normalizes away (up to its "
                   "epsilon and gradient clipping); set ppo.value_learning_rate (the value model's own peak "
                   "learning rate) instead",
}


def removed_field(key: str) -> ConfigError:
    """The error for setting a field listed in REMOVED_FIELDS."""
    return ConfigError(key, REMOVED_FIELDS[key])


@dataclass
class PPOConfig:
    """PPO against the reward model (`python -m instruct_jax ppo`); docs/PPO.md has the algorithm.

    Prompts come from `data` (format "prompt", left-padded to data.max_prompt_len = T tokens) or
    from `synthetic_prompts`; train.steps counts PPO iterations (one rollout batch each),
    train.global_batch_size is the prompts per rollout, train.init_from the SFT export that is
    both the initial policy and the frozen reference, and `optim` the policy's optimizer.
    """

    # ---- algorithm (docs/ALGORITHMS.md): ppo = advantages by GAE on a learned value model | rloo, grpo = critic-free:
    # no value model; group_size samples per prompt, each response's sequence reward compared with its group's
    # (rloo: the mean of the k - 1 others; grpo: the group mean, over the group's std when group_std_normalize)
    algorithm: str = "ppo"
    group_size: int = 1  # k samples per prompt; train.global_batch_size counts sampled rows, so B / k prompts
    group_std_normalize: bool = True  # grpo: divide by the group's std (False: Dr. GRPO, no difficulty bias)
    # how the clipped surrogate averages its tokens: token = over every response token of the minibatch |
    # sequence = per response, then over responses (GRPO's paper: short answers weigh more per token) |
    # constant = their sum over (rows x response_len) (Dr. GRPO: no length bias)
    loss_aggregation: str = "token"
    kl_in: str = "reward"  # reward: -kl_coef * KL in the reward (ppo per token; rloo/grpo in the sequence reward) |
    #                         loss: + kl_coef * the k3 KL to the reference as a loss term (GRPO), kl_coef fixed
    # ---- reward
    # model: the reward model at reward_model | dpo: a DPO policy's implicit reward | count: toy score = occurrences
    # of count_token | host: a Python function passed to run_ppo scores each rollout on the host (the pipeline's
    # oracle run: the gold judge)
    reward: str = "model"
    # model: the reward model's workdir or export ({"params", "norm"}), the value model starts from it | dpo: the DPO
    # policy's workdir or export, scored by its implicit reward dpo.beta * (log pi - log pi_ref)
    reward_model: str = ""
    implicit_reference: str = ""  # reward=dpo: the DPO run's reference policy ("" = train.init_from)
    count_token: int = -1  # reward=count: the token id counted in each response (-1 = the single token of count_text)
    count_text: str = " good"  # reward=count with count_token=-1: text that the tokenizer encodes as one token
    missing_eos: str = "replace"  # response with no stop token: replace (score := missing_eos_score) | subtract | none
    missing_eos_score: float = -1.0  # missing_eos=replace: the score, in the reward model's normalized units
    missing_eos_penalty: float = 1.0  # missing_eos=subtract: subtracted from the score
    # ---- rollout
    synthetic_prompts: int = 0  # > 0: that many numbered prompts (data/synthetic_prefs.py) instead of data.source
    response_len: int = 32  # N: response tokens sampled per prompt (rows stop early at EOS / end-of-turn)
    temperature: float = 1.0  # tau: samples from softmax(logits / tau); every recomputed log-prob uses it too
    # gathered: the policy's weights are gathered over the batch mesh axes once per rollout (an inference
    # layout: bf16 weights / tensor per chip) so no decode step re-gathers a weight | sharded: the training
    # layout, every token re-gathers every weight (for a model whose gathered weights do not fit HBM)
    rollout_weights: str = "gathered"
    # ---- KL penalty: per-token reward -kl_coef * k_t (Ziegler et al. 2019)
    kl_estimator: str = "k1"  # k1 = logp - logp_ref | k3 = exp(logp_ref - logp) - 1 - (logp_ref - logp) (biased here)
    kl_coef: float = 0.15  # beta (initial value when adaptive_kl)
    adaptive_kl: bool = False  # beta <- beta * (1 + clip(KL / kl_target - 1, +-0.2) * batch / kl_horizon)
    kl_target: float = 6.0  # adaptive_kl: target per-sequence KL (nats)
    kl_horizon: int = 10000  # adaptive_kl: sequences over which beta moves by the clipped error
    # ---- advantages
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_rewards: bool = False  # whiten per-token rewards (masked, mean kept) before GAE
    # ---- update
    epochs: int = 4  # passes over each rollout batch
    minibatches: int = 1  # optimizer steps per epoch; the rollout batch is reshuffled every epoch
    clip_ratio: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2  # value prediction clip around the rollout's values
    entropy_coef: float = 0.0  # entropy bonus coefficient (0 = off)
    value_learning_rate: float = 0.0  # value model's peak lr (0 = optim.learning_rate); same schedule otherwise
    tf_adam_eps: bool = False  # Adam eps added to sqrt(v) before bias correction (TF / lm-human-preferences)
    ema_decay: float = 0.0  # EMA of the policy's params per optimizer step, for evaluation (0 = off; InstructGPT 0.992)
    # ---- PPO-ptx (InstructGPT eq. 2): + ptx_coef * pretraining NLL, policy only
    ptx_coef: float = 0.0  # gamma of InstructGPT's PPO-ptx; 0 = off
    ptx_batch_size: int = 8  # pretraining / SFT sequences (of train.seq_len tokens) per optimizer step
    ptx: DataConfig = field(default_factory=_default_ptx_data)  # the pretraining / SFT data (format text or sft)
    # ---- logging
    log_samples: int = 2  # decoded (prompt, response, score) rows written to samples.jsonl per logged iteration
    export_every: int = 0  # also export the policy to <workdir>/snapshots/<iteration> every N iterations (0 = off)
    # Removed (REMOVED_FIELDS): accepted by the constructor only to fail with the reason and the replacement.
    vf_coef: dataclasses.InitVar[Optional[float]] = None

    def __post_init__(self, vf_coef: Optional[float]) -> None:
        if vf_coef is not None:
            raise removed_field("ppo.vf_coef")


# ----------------------------------------------------------------------------- pipeline
@dataclass
class StageConfig:
    """One training stage of `python -m instruct_jax pipeline`: what differs from the experiment's
    train / optim sections (everything else — model, mesh, optimizer shape, logging — is shared)."""

    steps: int = 100  # optimizer steps (PPO: iterations)
    global_batch_size: int = 16  # sequences per step (rm: rankings; ppo: prompts per rollout)
    seq_len: int = 128  # tokens per sequence
    learning_rate: float = 1e-3  # peak learning rate
    warmup_steps: int = 10  # linear warmup
    eval_every: int = 0  # evaluate every N steps (0 = only at the end)
    early_stop_patience: int = 0  # pretrain / sft: stop after this many evaluations without improvement (0 = off)


def _stage(**kw) -> Callable[[], StageConfig]:
    return lambda: StageConfig(**kw)


@dataclass
class PipelineConfig:
    """The whole InstructGPT recipe on the built-in task (`python -m instruct_jax pipeline`, docs/PIPELINE.md).

    Every random choice — task instances, demonstrators, initialisation, sampling, labeler noise —
    derives from the top-level `seed`; the stages' model, mesh and optimizer come from the experiment.
    """

    # ---- built-in task (instructgpt/task.py; "images": instructgpt/image_task.py and image_pipeline.py, whose
    # pretrain stage is captioning from scratch and whose kinds are the image task's)
    task: str = "text"  # text | images
    caption_demos: int = 2000  # images: "<image> Describe the picture." conversations of the captioning stage
    pretrain_paragraphs: int = 2000  # plain-text paragraphs of the pretraining corpus
    sft_demos: int = 400  # demonstrations written by the simulated demonstrators
    demo_chatty: float = 0.6  # fraction of demonstrations wrapped in chat ("Sure! 59. I hope this helps…")
    demo_slip: float = 0.15  # fraction of demonstrations with a typical slip (near miss)
    demo_phrase: str = "before"  # the chat phrase "before" the answer ("Sure! 59.") or "after" it ("59. I think so.")
    eval_prompts: int = 240  # held-out evaluation prompts (>= 200 for the report's claims)
    held_out_fraction: float = 0.4  # of eval prompts worded with paraphrase templates never trained on
    # Fraction of prompts (every split; never the `constrained` kind) followed by a format instruction checkable on
    # the response's surface (task.py FORMATS: "Give only the answer.", "End your reply with the word done.", ...);
    # at most 0.5, so that at least half of the eval prompts are the kinds' plain requests
    format_fraction: float = 0.0
    demo_follow: float = 0.5  # probability that a demonstrator follows a format instruction (independent of slips)
    # The instruction kinds the task mixes (instructgpt/task.py KINDS; default: the original seven)
    kinds: tuple = ("reverse", "sort", "add", "count", "spell", "list", "constrained")
    # ---- comparisons (InstructGPT step 2)
    label_prompts: int = 600  # training prompts whose SFT samples the labeler ranks
    responses_per_prompt: int = 4  # K, 4..9 in InstructGPT
    # Design (a) of issue 25, de-confounded comparisons: each ranking also holds this many "twins" of its first
    # sample (task.phrase_twins, in order: its chat phrase stripped or added, the reference in its phrasing, a
    # near miss in its phrasing), ranked with the K samples; 0..3, K + twins <= 9. Each costs one gold call.
    twins: int = 0
    # Temperature of the SFT samples the labeler ranks; best-of-n and the reward-model accuracy pairs
    # sample at the same temperature, so the reward model is judged on the distribution it learned from.
    sample_temperature: float = 1.0
    labeler_temperature: float = 0.02  # Plackett-Luce temperature on gold totals (instructgpt/gold.py Labeler)
    labeler_flip_rate: float = 0.3  # probability of swapping each adjacent pair of the sampled order
    max_comparisons: int = 0  # budget of pairwise comparisons, C(K, 2) per ranking (0 = unlimited)
    # ---- PPO (InstructGPT step 3); the ppo section configures the algorithm
    ppo_prompts: int = 2000  # training prompts PPO samples from
    kl_budget: float = 0.0  # max allowed KL(PPO || SFT) per response on held-out prompts (nats); 0 = no check
    snapshots: int = 4  # policy exports during PPO for the gold-vs-proxy picture (0 = none)
    # The upper reference: a second PPO run whose reward is the gold judge itself (standardized on the SFT
    # samples the labeler ranked), evaluated beside the reward-model run; never the headline
    oracle: bool = False
    oracle_algorithm: str = "ppo"  # the oracle run's algorithm: ppo (pipeline.ppo's budget) | rloo | grpo (theirs)
    # ---- methods compared (docs/ALGORITHMS.md): each trains from the same SFT policy on the same rankings
    # (ppo, rloo and grpo through the reward model, dpo on the rankings directly) and is evaluated beside the
    # others; the main job runs ppo alone, --set pipeline.algorithms=ppo,dpo,rloo,grpo adds the comparison
    algorithms: tuple = ("ppo",)
    group_size: int = 4  # rloo / grpo stages: samples per prompt (their stage's global_batch_size counts samples)
    # rft stage (rejection-sampling fine-tuning): each round samples rft_samples responses per prompt for the first
    # rft_prompts PPO prompts from the current policy (at rft_temperature), keeps the reward model's best of each and
    # fine-tunes the current policy on them with pipeline.rft's steps / batch / learning rate
    rft_samples: int = 4
    rft_prompts: int = 1024
    rft_rounds: int = 1
    # the candidates' sampling temperature: below 1 keeps them near the greedy answer, whose quality best-of-n at
    # temperature 1 may not reach (then fine-tuning on the best lowers the greedy policy: docs/ALGORITHMS.md)
    rft_temperature: float = 1.0
    # ---- evaluation
    decode_temperature: float = 0.0  # how every policy is decoded for scoring (0 = greedy)
    max_new_tokens: int = 24  # response buffer for evaluation decoding
    best_of: tuple = (4, 16)  # best-of-n against the reward model, sampled from SFT at temperature 1
    kl_samples: int = 2  # samples per held-out prompt for KL(PPO || SFT)
    # Temperature-1 samples per held-out prompt of SFT and PPO (the regime PPO trains in): tau = 1 win rate
    # and gold gain, PPO against best-of-n at the same decoding; 0 = off, else >= 4 (SFT reuses its first
    # best-of-n samples when those are at temperature 1)
    tau1_samples: int = 4
    # ---- stages
    pretrain: StageConfig = field(default_factory=_stage(steps=300, global_batch_size=32, seq_len=128,
                                                         learning_rate=3e-3))
    sft: StageConfig = field(default_factory=_stage(steps=200, global_batch_size=32, seq_len=64,
                                                    learning_rate=1e-3, eval_every=25))
    rm: StageConfig = field(default_factory=_stage(steps=200, global_batch_size=16, seq_len=64,
                                                   learning_rate=1e-3))
    ppo: StageConfig = field(default_factory=_stage(steps=60, global_batch_size=64, seq_len=64,
                                                    learning_rate=3e-4, warmup_steps=0))
    # DPO from the SFT policy on the label stage's rankings (the reward model's training split); its seq_len
    # should equal rm's, so both read the same rankings whole
    dpo: StageConfig = field(default_factory=_stage(steps=100, global_batch_size=16, seq_len=64,
                                                    learning_rate=1e-4))
    # critic-free online RL from the SFT policy against the same reward model, with the ppo section's settings
    # (ppo.algorithm and ppo.group_size set by the stage); global_batch_size = rows = prompts x group_size
    rloo: StageConfig = field(default_factory=_stage(steps=60, global_batch_size=64, seq_len=64,
                                                     learning_rate=3e-4, warmup_steps=0))
    grpo: StageConfig = field(default_factory=_stage(steps=60, global_batch_size=64, seq_len=64,
                                                     learning_rate=3e-4, warmup_steps=0))
    # RLOO rewarded by the dpo stage's implicit reward instead of the reward model (pipeline.algorithms with dpo)
    rloo_dpo: StageConfig = field(default_factory=_stage(steps=60, global_batch_size=64, seq_len=64,
                                                         learning_rate=3e-4, warmup_steps=0))
    # rejection-sampling fine-tuning: each round's supervised fine-tuning on the reward model's best samples
    rft: StageConfig = field(default_factory=_stage(steps=40, global_batch_size=32, seq_len=64,
                                                    learning_rate=3e-4))


@dataclass
class Config:
    name: str = "experiment"  # free-form run name (logs, reports)
    seed: int = 0  # every random choice (init, data order, sampling) derives from it
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    compilation_cache: bool = True  # persistent XLA cache: $JAX_CACHE_DIR, else ~/.cache/instruct_jax/jax_cache
    reward: RewardConfig = field(default_factory=RewardConfig)  # the reward model phase (`rm`, `score`)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # multi-host runs
    ppo: PPOConfig = field(default_factory=PPOConfig)  # the PPO phase (`ppo`)
    dpo: DPOConfig = field(default_factory=DPOConfig)  # direct preference optimisation (`dpo`)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # the end-to-end run (`pipeline`)


# ----------------------------------------------------------------------------- loading
def load_experiment(spec: str) -> Config:
    """Load `path/to/experiment.py[:arg]` and call its `get_config(arg)`; or a run's saved `config.json`
    (every phase writes one into its workdir): the exact config of that run, to repeat or vary with --set."""
    scheme, _, rest = spec.rpartition("://")  # a saved config may be in a bucket: gs://bucket/run/config.json
    path, _, arg = rest.partition(":")
    path = f"{scheme}://{path}" if scheme else path
    if not files.isfile(path):
        raise ConfigError("experiment", f"no experiment file at {path!r}")
    if path.endswith(".json"):
        try:
            return section_from_dict(Config, json.loads(files.read_text(path)), "config")
        except (ValueError, TypeError) as e:
            raise ConfigError("experiment", f"{path} is not a saved config: {e}") from e
    module_name = "instruct_jax_experiment_" + os.path.splitext(os.path.basename(path))[0]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    try:  # a broken experiment file is a configuration error that names it, not a traceback
        loader_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError("experiment", f"{path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError("experiment", f"{path} defines no get_config(arg=None)")
    try:
        cfg = module.get_config(arg or None)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError("experiment", f"{spec}: get_config({arg or None!r}) raised {type(e).__name__}: {e}") from e
    if not isinstance(cfg, Config):
        raise ConfigError("experiment", f"{path}: get_config must return instruct_jax.config.Config, got {type(cfg).__name__}")
    return cfg


def _parse_value(key: str, raw: str, hint: Any) -> Any:
    """Parse an override string into the declared type of the field (named errors)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(key, raw, inner[0])
    if origin is Literal:
        if raw not in args:
            raise ConfigError(key, f"expected one of {list(args)}, got {raw!r}")
        return raw
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"expected a boolean (true/false), got {raw!r}")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {raw!r}") from None
    if hint is float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {raw!r}")
        return value
    if hint is str:
        return raw
    if hint is tuple or origin is tuple:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = [s for s in raw.split(",") if s]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list (JSON or comma-separated), got {raw!r}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    raise ConfigError(key, f"cannot override a field of type {hint}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` strings in order, in place; returns cfg."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(key, "override must look like section.field=value")
        if key in REMOVED_FIELDS:
            raise removed_field(key)
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            hints = typing.get_type_hints(type(node))
            if part not in hints:
                where = ".".join(parts[:i]) or "config"
                raise ConfigError(key, f"unknown key; {where} has fields {sorted(hints)}")
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(hints[part]):
                    raise ConfigError(key, "is a section; set one of its fields instead")
                setattr(node, part, _parse_value(key, raw, hints[part]))
            else:
                node = getattr(node, part)
                if not dataclasses.is_dataclass(node):
                    raise ConfigError(key, f"'{part}' is not a section")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def section_from_dict(cls, data: dict, where: str = "config"):
    """A config section (a dataclass) from its `to_dict` form, e.g. a run's config.json: nested sections
    rebuilt, lists turned back into tuples where the field is a tuple; an unknown key is a ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown field in a saved {cls.__name__}")

    def tuples(x):
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = section_from_dict(hint, value, f"{where}.{name}")
        elif hint is tuple or typing.get_origin(hint) is tuple:
            value = tuples(value)
        kwargs[name] = value
    return cls(**kwargs)


def save_config(cfg: Config, workdir: str) -> None:
    """Create the run's workdir and record the resolved config there (process 0 writes)."""
    import jax  # local: config loading and validation stay importable without touching devices

    files.makedirs(workdir)
    if jax.process_index() == 0:
        files.write_text(files.join(workdir, "config.json"), json.dumps(to_dict(cfg), indent=2, default=str))


# ----------------------------------------------------------------------------- validation
def _check_types(node: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(node))  # once per section: it re-evaluates every annotation
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(key, f"expected a {hint.__name__} section, got {type(value).__name__}")
            _check_types(value, key + ".")
            continue
        expected = {int: int, float: (int, float), str: str, bool: bool, tuple: (tuple, list)}.get(hint)
        if expected is None:
            continue
        if hint is int and isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(key, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
        if hint is float and not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")


def _check_rule_entries(rules: Any) -> None:
    """mesh.rules entries are (logical name, None | mesh axis | tuple of mesh axes) pairs."""
    for i, entry in enumerate(rules):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ConfigError("mesh.rules", f"entry {i} must be a (logical_name, mesh_axes) pair, got {entry!r}")
        target = entry[1]
        axes = target if isinstance(target, (tuple, list)) else (target,)
        if target is not None and not all(isinstance(a, str) for a in axes):
            raise ConfigError("mesh.rules", f"entry {i} ({entry[0]!r}) must map to None, a mesh axis name or a "
                              f"tuple of them, got {target!r}")


def _positive(prefix: str, node: Any, *names: str) -> None:
    for n in names:
        if getattr(node, n) <= 0:
            raise ConfigError(f"{prefix}.{n}", f"must be > 0, got {getattr(node, n)}")


def validate(cfg: Config, num_devices: Optional[int] = None) -> None:
    """Raise ConfigError naming the first bad field. With num_devices, also check the mesh fits."""
    _check_types(cfg, "")
    m = cfg.model
    _positive("model", m, "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "mlp_dim", "max_seq_len", "rope_theta", "norm_eps", "attention_block_q",
              "attention_block_kv")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError("model.num_kv_heads", f"must divide num_heads={m.num_heads}, got {m.num_kv_heads}")
    if m.head_dim % 2:
        raise ConfigError("model.head_dim", f"must be even for rotary embeddings, got {m.head_dim}")
    for key, value, allowed in (("model.rope_type", m.rope_type, ROPE_TYPES),
                                ("model.remat", m.remat, REMAT_POLICIES),
                                ("model.attention", m.attention, ATTENTION_IMPLS),
                                ("model.dtype", m.dtype, ("float32", "bfloat16")),
                                ("optim.decay", cfg.optim.decay, ("cosine", "linear", "constant")),
                                ("optim.mu_dtype", cfg.optim.mu_dtype, ("float32", "bfloat16"))):
        if value not in allowed:
            raise ConfigError(key, f"expected one of {list(allowed)}, got {value!r}")
    if m.attention == "cudnn" and m.dtype != "bfloat16":
        raise ConfigError("model.attention", f"'cudnn' flash attention is 16-bit only: needs model.dtype "
                          f"'bfloat16', got {m.dtype!r}")
    if m.rope_type != "default" and m.rope_factor < 1.0:
        raise ConfigError("model.rope_factor", f"must be >= 1 for rope_type={m.rope_type!r}, got {m.rope_factor}")
    if m.loss_chunk < 0:
        raise ConfigError("model.loss_chunk", f"must be >= 0 (0 = full logits), got {m.loss_chunk}")
    validate_vision(m)
    if m.lora_rank:
        if not 0 < m.lora_rank <= m.d_model // 8:
            raise ConfigError("model.lora_rank", f"must be in 1..d_model / 8 = {m.d_model // 8} (0 = off), got "
                              f"{m.lora_rank}")
        m.lora_targets = tuple(m.lora_targets) if isinstance(m.lora_targets, (list, tuple)) else m.lora_targets
        if (not isinstance(m.lora_targets, tuple) or not m.lora_targets or len(set(m.lora_targets)) != len(m.lora_targets)
                or any(t not in LORA_TARGETS for t in m.lora_targets)):
            raise ConfigError("model.lora_targets", f"expected distinct projections from {list(LORA_TARGETS)}, got "
                              f"{m.lora_targets!r}")
        m.lora_train = tuple(m.lora_train) if isinstance(m.lora_train, (list, tuple)) else m.lora_train
        if not isinstance(m.lora_train, tuple) or any(not isinstance(n, str) or not n for n in m.lora_train):
            raise ConfigError("model.lora_train", f"expected a list of param names, got {m.lora_train!r}")
        if not m.lora_alpha > 0:
            raise ConfigError("model.lora_alpha", f"must be > 0, got {m.lora_alpha}")

    t = cfg.train
    _positive("train", t, "steps", "global_batch_size", "microbatches", "seq_len", "eval_batches",
              "max_nonfinite_in_a_row", "loss_spike_window")
    if t.loss_spike_factor != 0 and not t.loss_spike_factor > 1:
        raise ConfigError("train.loss_spike_factor", f"must be 0 (off) or > 1, got {t.loss_spike_factor}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError("train.seq_len", f"exceeds model.max_seq_len={m.max_seq_len}, got {t.seq_len}")
    for name in ("early_stop_patience", "early_stop_min_delta"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    if t.early_stop_patience and t.eval_every <= 0:
        raise ConfigError("train.early_stop_patience", f"needs train.eval_every > 0 (evaluations to compare), "
                          f"got eval_every={t.eval_every}")
    if t.global_batch_size % t.microbatches:
        raise ConfigError("train.microbatches",
                          f"must divide train.global_batch_size={t.global_batch_size}, got {t.microbatches}")
    _positive("optim", cfg.optim, "learning_rate")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", f"must be >= 0, got {cfg.optim.warmup_steps}")
    if cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    _positive("logging", cfg.logging, "log_every")
    try:
        validate_data_config(cfg.data)
    except DataConfigError as e:
        raise ConfigError(e.field, str(e).split(": ", 1)[1]) from None

    _check_rule_entries(cfg.mesh.rules)
    check_rules(cfg.mesh.logical_rules())
    if num_devices is not None:
        shape = resolve_mesh_shape(cfg.mesh, num_devices)
        axes, shards = batch_axes(cfg.mesh.logical_rules()), batch_shards(shape, cfg.mesh.logical_rules())
        micro = t.global_batch_size // t.microbatches
        if micro % shards:
            raise ConfigError(
                "train.global_batch_size",
                f"each microbatch ({t.global_batch_size} / train.microbatches={t.microbatches} = {micro} "
                f"sequences) must divide over the batch mesh axes {axes} of total size {shards}")
        if t.seq_len % shape["sequence"]:
            raise ConfigError("train.seq_len", f"must divide over mesh 'sequence' size {shape['sequence']}, got {t.seq_len}")
