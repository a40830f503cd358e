"""The one decoding loop of the codebase: prefill, decode_step and a lax.while_loop sampler.

PPO rollouts and the chat server both decode through this file. Three pieces:

* `prefill(params, model, prompt, cache)`: run the prompt through the model, filling the
  KV cache; returns the logits that predict the first response token.
* `decode_step(params, model, tokens, positions, cache, write_index)`: feed one token per
  row, write its keys/values at each row's write index; returns the next logits.
* `sample(params, model, prompt, rng, cfg)`: prefill, then a `lax.while_loop` over a small
  `SamplingState` (gemma's sampler loop) that samples a token, records it, and feeds it
  back, until every row has stopped or the response buffer is full.

Letters: B batch, T prompt length, N max new tokens, S cache length (T + N), V vocab.

Shapes are fixed (prompts left-padded to T, responses padded to N), so each function
compiles once per (B, T, N). Masks come from positions and segment ids, never from
matching the pad id: padding is segment 0, real prompt tokens carry the prompt's segment
(1 from `ModelInput.left_padded`), and decoded tokens join that segment.

Stopping, per row: a row is done after its first token in `cfg.stop_tokens` ({EOS,
end-of-turn}). That stop token is part of the response (it counts in `lengths` and has a
log-prob: PPO must learn to emit it); every later slot holds `cfg.pad_id` with log-prob 0,
and is fed to the model as segment 0 so the cache, too, marks it as padding. Rows that
never stop fill all N slots and end with done=False (the caller decides whether a
truncated response gets a penalty).

Log-probs: the log-probability of each chosen token under the distribution it was drawn
from. For PPO sampling (temperature > 0, no top-k/top-p) that is exactly
log_softmax(logits / temperature)[token]; with top-k/top-p it is the renormalised
truncated distribution; greedy (temperature 0) gives 0, the limit of a point mass.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from instruct_jax.model.kv_cache import KVCache
from instruct_jax.model.transformer import ModelInput, Transformer, compute_dtype_weights, split_layers
from instruct_jax.parallel.context import in_mesh_context, logical_constraint
from instruct_jax.parallel.mesh import batch_axes
from instruct_jax.parallel.sharding import logical_to_shardings, logical_to_spec, replicated


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to decode. Frozen and hashable: it is static for jit (one compile per config)."""

    max_new_tokens: int = 64  # N: response buffer length; rows without a stop token end here
    temperature: float = 1.0  # sample from softmax(logits / temperature); 0 = greedy (argmax)
    top_k: int = 0  # keep only the k most likely tokens; 0 = off (chat / eval only, not PPO)
    top_p: float = 1.0  # keep the smallest set of tokens with probability >= top_p; 1 = off (chat / eval only)
    stop_tokens: tuple[int, ...] = ()  # ids that end a response (EOS, end-of-turn); empty = run to N
    pad_id: int = 0  # written after a row's stop token; must not be a stop token

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.pad_id in self.stop_tokens:
            raise ValueError(f"pad_id {self.pad_id} is also a stop token: padding and a real stop must differ")

    @property
    def is_exact(self) -> bool:
        """True when tokens are drawn from exactly softmax(logits / temperature), which PPO's
        importance ratios and KL penalty assume; greedy, top-k and top-p break that."""
        return self.temperature > 0 and self.top_k == 0 and self.top_p == 1.0

    def require_exact(self, who: str = "PPO rollouts") -> None:
        if not self.is_exact:
            raise ValueError(f"{who} need samples from exactly softmax(logits / temperature): got "
                             f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p} "
                             "(need temperature > 0, top_k=0, top_p=1)")


# ----------------------------------------------------------------------------- one token
def filtered_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits [B, V] / temperature, with -inf outside the top-k / top-p set (temperature > 0)."""
    scaled = logits.astype(jnp.float32) / cfg.temperature  # [B, V]
    if cfg.top_k:
        kth = jax.lax.top_k(scaled, min(cfg.top_k, scaled.shape[-1]))[0][:, -1:]  # [B, 1]
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)  # ties at the k-th value are all kept
    if cfg.top_p < 1.0:
        sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep a token while the mass strictly before it is < top_p: the smallest prefix
        # reaching top_p, and always the most likely token.
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
        kept = jnp.where(mass_before < cfg.top_p, sorted_desc, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)  # [B, 1]: smallest kept logit
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    return scaled


def sample_token(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """(token [B] int32, log-prob [B] float32) from next-token logits [B, V]; see module docstring."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[:1], jnp.float32)
    scaled = filtered_logits(logits, cfg)  # [B, V]
    token = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)  # [B]
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logprob


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
                top_k: jax.Array) -> jax.Array:
    """One token per row [B] int32 from logits [B, V], each row with its own settings and random key.

    The server's token choice (requests of one batch differ): keys [B] (typed PRNG keys or [B, 2]
    uint32), temperature [B] (0 = greedy: argmax), top_p [B] (1 = off), top_k [B] (0 = off). Row b
    draws exactly what `sample_token` draws for that row alone with the static settings
    SamplingConfig(temperature[b], top_k[b], top_p[b]) and key keys[b], so a request's text does not
    depend on what else is in the batch. The sort that top-k / top-p need runs only when some row
    asks for it (a `lax.cond` over the batch).
    """
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]  # [B, V]

    def truncate(scaled):
        sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
        v = scaled.shape[-1]
        kth = jnp.take_along_axis(sorted_desc, (jnp.clip(top_k, 1, v) - 1)[:, None], axis=-1)  # [B, 1]
        scaled = jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)
        # top-p over what top-k kept, as filtered_logits does: renormalise, keep while the mass before < p
        sorted_desc = jnp.where((top_k[:, None] > 0) & (sorted_desc < kth), -jnp.inf, sorted_desc)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p[:, None], sorted_desc, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        return jnp.where((top_p[:, None] < 1.0) & (scaled < threshold), -jnp.inf, scaled)

    needs_sort = jnp.any(~greedy & ((top_k > 0) | (top_p < 1.0)))
    scaled = jax.lax.cond(needs_sort, truncate, lambda x: x, scaled)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys, scaled)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


def top_logprobs(logits: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's own log-probabilities (log_softmax of the raw logits: no temperature, no truncation),
    as an OpenAI-style API reports them: (logprob of tokens [...], top-k ids [..., k], their log-probs [..., k]).
    logits [..., V], tokens [...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(logp, k)
    return chosen, top_ids.astype(jnp.int32), top_values


# ----------------------------------------------------------------------------- model calls
def prompt_tail(prompt: ModelInput) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row of a one-segment-per-row prompt [B, T]: (index of the last real token, position
    of the first response token, the row's segment id), each [B] int32.

    Worked example: tokens [[p, p, 7, 8, 9]], positions [[0, 0, 0, 1, 2]], segment_ids
    [[0, 0, 1, 1, 1]] -> last index 4, next position 3, segment 1. A row with no real
    token gets (0, 0, 0): segment 0, so whatever it decodes stays invisible.
    """
    real = prompt.segment_ids > 0  # [B, T]
    idx = jnp.arange(prompt.tokens.shape[1], dtype=jnp.int32)
    last = jnp.max(jnp.where(real, idx, 0), axis=1)
    next_position = jnp.max(jnp.where(real, prompt.positions, -1), axis=1) + 1
    segment = jnp.take_along_axis(prompt.segment_ids, last[:, None], axis=1)[:, 0]
    return last, next_position, segment


def prefill(params, model: Transformer, prompt: ModelInput, cache: KVCache,
            write_index=0) -> tuple[jax.Array, KVCache]:
    """Run prompt [B, T] into cache slots write_index .. write_index + T - 1.

    Returns (logits [B, V] float32 at each row's last real token, cache). The last real
    token is the last slot with a non-zero segment (index T - 1 under left padding).
    """
    last, _, _ = prompt_tail(prompt)
    out = model.apply({"params": params}, prompt, cache=cache, write_index=write_index, logits_at=last)
    return out.logits[:, 0], out.cache


def decode_step(params, model: Transformer, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                write_index, segment_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Feed one token per row: tokens, positions [B] (segment_ids [B], default 1) at slot write_index.

    write_index is [B] (each row its own slot; a server's rows differ) or a scalar.
    Returns (logits [B, V] float32 predicting each row's next token, cache).
    """
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    step = ModelInput(tokens[:, None], positions[:, None], segment_ids[:, None])  # [B, 1] each
    out = model.apply({"params": params}, step, cache=cache, write_index=write_index)
    return out.logits[:, 0], out.cache


# ----------------------------------------------------------------------------- the loop
@flax.struct.dataclass
class SamplingState:
    """The while_loop carry. Buffers are fixed-size; `step` says how much of them is filled."""

    step: jax.Array  # int32 scalar: tokens sampled so far per row (n)
    logits: jax.Array  # [B, V] float32: logits predicting token n
    positions: jax.Array  # [B] int32: position token n takes when fed back
    segment_ids: jax.Array  # [B] int32: each row's prompt segment, which its tokens join
    tokens: jax.Array  # [B, N] int32: sampled tokens, pad_id after the stop token
    logprobs: jax.Array  # [B, N] float32: sampler log-probs, 0 after the stop token
    lengths: jax.Array  # [B] int32: response tokens up to and including the first stop token
    done: jax.Array  # [B] bool: the row has emitted a stop token
    cache: KVCache
    rng: jax.Array  # base key; step n samples with fold_in(rng, n)


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [B, N] int32
    logprobs: jax.Array  # [B, N] float32
    lengths: jax.Array  # [B] int32
    done: jax.Array  # [B] bool: True iff the response ended with a stop token


def _constrain_rows(tree):
    """Pin [B, ...] arrays to batch sharding: rows of one sequence stay on one device."""
    return jax.tree.map(lambda x: logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1)), tree)


def sample(params, model: Transformer, prompt: ModelInput, rng: jax.Array, cfg: SamplingConfig,
           weight_shardings=None) -> SampleOutput:
    """Sample up to cfg.max_new_tokens tokens after each prompt row (prompt [B, T], one segment a row).

    weight_shardings: the layout the weights take for the whole call (make_sampler's inference layout:
    gathered over the batch axes once, here, instead of by every decode step inside the loop)."""
    b, t = prompt.tokens.shape
    n = cfg.max_new_tokens
    # Once per call, outside the loop: weights cast to the compute dtype, moved to the inference
    # layout and split per layer, the cache held per layer, so every decode step reads each buffer in
    # place and writes only the new token's keys / values (Transformer.cached_layers; docs/BENCHMARKS.md).
    params = compute_dtype_weights(model.cfg, split_layers(params))
    if weight_shardings is not None:  # layer by layer: a gathered copy of the whole stack never exists
        params = jax.lax.with_sharding_constraint(params, _split_layer_shardings(weight_shardings,
                                                                                 model.cfg.num_layers))
    # S = T + N: the last loop step feeds token N-1 into slot T + N - 1 (its logits are unused,
    # but a fixed loop body is simpler than skipping it).
    cache = KVCache.init(model.cfg, b, t + n, per_layer=True)
    logits, cache = prefill(params, model, prompt, cache)
    _, next_pos, segment = prompt_tail(prompt)  # [B] each
    stop = jnp.asarray(cfg.stop_tokens, jnp.int32)  # [num stop tokens]

    def cond(state: SamplingState):
        return (state.step < n) & ~jnp.all(state.done)

    def body(state: SamplingState) -> SamplingState:
        token, logprob = sample_token(state.logits, jax.random.fold_in(state.rng, state.step), cfg)
        live = ~state.done  # rows still generating before this token
        token = jnp.where(live, token, cfg.pad_id)
        logprob = jnp.where(live, logprob, 0.0)
        # Rows that are done feed padding as segment 0, so their cache slots stay invisible.
        logits, cache = decode_step(params, model, token, state.positions, state.cache,
                                    t + state.step, jnp.where(live, state.segment_ids, 0))
        return state.replace(
            step=state.step + 1,
            logits=logits,
            positions=state.positions + 1,
            tokens=_constrain_rows(state.tokens.at[:, state.step].set(token)),
            logprobs=_constrain_rows(state.logprobs.at[:, state.step].set(logprob)),
            lengths=state.lengths + live.astype(jnp.int32),
            done=state.done | (live & jnp.isin(token, stop)),
            cache=cache)

    state = SamplingState(
        step=jnp.zeros((), jnp.int32), logits=logits, positions=next_pos, segment_ids=segment,
        tokens=_constrain_rows(jnp.full((b, n), cfg.pad_id, jnp.int32)),
        logprobs=_constrain_rows(jnp.zeros((b, n), jnp.float32)),
        lengths=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool), cache=cache, rng=rng)
    state = jax.lax.while_loop(cond, body, state)
    return SampleOutput(state.tokens, state.logprobs, state.lengths, state.done)


def prompt_and_response(prompt: ModelInput, out: SampleOutput) -> ModelInput:
    """Prompt [B, T] followed by response [B, N] as one ModelInput [B, T + N], for scoring.

    Response tokens continue the prompt's positions and segment; slots after a row's stop
    token are segment 0. The prompt's images (and prefix flags) come along, so a scoring forward places the
    same image embeddings the sampler's prefill did. Logits at index T - 1 + i of a forward pass over it predict
    response token i (the policy / reference / value recomputation in PPO).
    """
    _, first_pos, segment = prompt_tail(prompt)  # [B] each
    idx = jnp.arange(out.tokens.shape[1], dtype=jnp.int32)[None, :]  # [1, N]
    in_response = idx < out.lengths[:, None]  # [B, N]
    prefix = None if prompt.prefix is None else jnp.concatenate(
        [prompt.prefix, jnp.zeros_like(out.tokens, prompt.prefix.dtype)], axis=1)  # the response is never prefix
    return ModelInput(
        tokens=jnp.concatenate([prompt.tokens, out.tokens], axis=1),
        positions=jnp.concatenate([prompt.positions, jnp.where(in_response, first_pos[:, None] + idx, 0)], axis=1),
        segment_ids=jnp.concatenate([prompt.segment_ids, jnp.where(in_response, segment[:, None], 0)], axis=1),
        images=prompt.images, prefix=prefix)


# ----------------------------------------------------------------------------- jitted entry points
@dataclasses.dataclass(frozen=True)
class Sampler:
    """The decoding pieces jitted for one model, sampling config and (optional) mesh.

    prefill(params, prompt, cache) -> (logits [B, V], cache)            cache donated
    decode_step(params, tokens, positions, cache, write_index, segment_ids) -> (logits, cache)
    sample(params, prompt, rng) -> SampleOutput
    init_cache(batch, length) -> empty KVCache, created in its shardings
    """

    prefill: Callable
    decode_step: Callable
    sample: Callable
    init_cache: Callable


WEIGHT_LAYOUTS = ("gathered", "sharded")


def inference_shardings(param_shardings, rules):
    """The params' shardings without the batch mesh axes (data, fsdp): each device holds whole weights
    (split over tensor only), so a decode step, whose rows are split over the batch axes, needs no weight
    from another device. Costs weights / tensor bytes per device for the call's duration."""
    drop = set(batch_axes(rules))

    def strip(sh: NamedSharding) -> NamedSharding:
        spec = []
        for entry in sh.spec:
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            kept = tuple(a for a in axes if a not in drop)
            spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
        return NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*spec))

    return jax.tree.map(strip, param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def _split_layer_shardings(shardings, num_layers: int):
    """The shardings of split_layers(params) from those of params: each of the num_layers layers takes its
    stack's sharding without the leading layers dim."""
    stacked = shardings["layers"]
    if isinstance(stacked, (tuple, list)):
        return shardings
    one = jax.tree.map(lambda sh: NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*sh.spec[1:])), stacked,
                       is_leaf=lambda x: isinstance(x, NamedSharding))
    return {**shardings, "layers": (one,) * num_layers}


def make_sampler(model: Transformer, cfg: SamplingConfig, mesh=None, rules=None, param_shardings=None,
                 weights: str = "gathered") -> Sampler:
    """Jit prefill / decode_step / sample; with a mesh, with explicit shardings, traced in its context.

    With a mesh, rules (the logical rules table) and param_shardings (the params'
    NamedShardings, e.g. TrainState shardings .params) are required. Rows (batch) shard
    over the batch mesh axes, so B must divide over them. weights (ppo.rollout_weights): "gathered"
    moves the weights to `inference_shardings` once per `sample` call; "sharded" keeps the training
    layout, whose decode steps re-gather every weight sharded over the batch axes for every token.
    """
    if weights not in WEIGHT_LAYOUTS:
        raise ValueError(f"weights must be one of {WEIGHT_LAYOUTS}, got {weights!r}")
    layout = (inference_shardings(param_shardings, rules)
              if mesh is not None and weights == "gathered" and param_shardings is not None else None)
    fns = dict(
        prefill=lambda params, prompt, cache: prefill(params, model, prompt, cache),
        decode_step=lambda params, tokens, positions, cache, write_index, segment_ids:
            decode_step(params, model, tokens, positions, cache, write_index, segment_ids),
        sample=lambda params, prompt, rng: sample(params, model, prompt, rng, cfg, layout),
        init_cache=lambda batch, length: KVCache.init(model.cfg, batch, length))
    if mesh is None:
        return Sampler(prefill=jax.jit(fns["prefill"], donate_argnums=(2,)),
                       decode_step=jax.jit(fns["decode_step"], donate_argnums=(3,)),
                       sample=jax.jit(fns["sample"]),
                       init_cache=jax.jit(fns["init_cache"], static_argnums=(0, 1)))

    if rules is None or param_shardings is None:
        raise ValueError("make_sampler with a mesh needs rules and param_shardings")

    def spec(*logical):
        return NamedSharding(mesh, logical_to_spec(logical, rules))

    rows, rows_2d, logits = spec("batch"), spec("batch", None), spec("batch", "act_vocab")
    cache = logical_to_shardings(KVCache.logical_axes(), mesh, rules)
    params = param_shardings
    jitted = dict(
        prefill=jax.jit(fns["prefill"], in_shardings=(params, rows_2d, cache), out_shardings=(logits, cache),
                        donate_argnums=(2,)),
        decode_step=jax.jit(fns["decode_step"], in_shardings=(params, rows, rows, cache, replicated(mesh), rows),
                            out_shardings=(logits, cache), donate_argnums=(3,)),
        sample=jax.jit(fns["sample"], in_shardings=(params, rows_2d, replicated(mesh)),
                       out_shardings=SampleOutput(rows_2d, rows_2d, rows, rows)),
        init_cache=jax.jit(fns["init_cache"], static_argnums=(0, 1), out_shardings=cache))
    return Sampler(**{name: in_mesh_context(fn, mesh, rules) for name, fn in jitted.items()})
