"""Continuous batching: many requests share one jitted decode step over a fixed number of slots.

    engine = Engine(model, params, tokenizer, slots=16, max_context=512)   # a thread decodes
    request = engine.submit(prompt_ids, Settings(max_tokens=64, temperature=0.0, stop=("\\n\\n",)))
    for event in request.events():   # TextEvent(text, tokens) ... then Finish(reason, ...)
        ...

The engine decodes through the codebase's one decoding loop, `sampling.prefill` and
`sampling.decode_step`; no second sampler. Its state is one KV cache of `slots` rows and
`max_context` cache slots each (per layer, as the sampler holds it). A loop on its own thread:

  1. **admit**: while a slot is free and a request waits, prefill the request's prompt into a fresh
     one-row cache (prompt right-padded to a length bucket) and copy that row into the slot; the
     prefill's logits give the request's first token. Other rows are untouched: they go on decoding
     at the next step.
  2. **step**: one `decode_step` over all slots (free slots feed padding as segment 0, invisible),
     then each row's next token from its own settings and random stream (`sampling.sample_rows`).
  3. **deliver**: per live row, the token goes through the request's `TextStream` (never splits a
     character, honours stop strings across token boundaries), then to its consumer; a row that
     emitted a stop token, hit a stop string or its max_tokens, ran out of cache, or whose consumer
     went away (`request.cancel()`) frees its slot.

Shapes are fixed: one compile of the step, one of the prefill per prompt-length bucket (at most four;
`buckets`), one of the scorer per bucket (`score`: log-probs of given tokens, for echo). `compiles()`
counts them; it stays flat once every bucket has been seen.

Random streams: request r draws its n-th token (n = 0, 1, ...) with fold_in(key_r, n), key_r =
PRNGKey(seed) when the request is seeded; `sample_rows` draws each row alone, so a seeded request gives the
same text whatever else is in the batch, and a greedy one the same tokens as when served alone (the
step's shapes do not depend on the traffic).

Token log-probs reported with each token are the model's own (log_softmax of the raw logits), with
the top `TOP_LOGPROBS` alternatives, as OpenAI-style APIs report them.

Weights: `reload(params)` swaps them between two steps (same shapes and shardings, so no recompile);
`version` counts the loads.

Images (a model with a vision tower, model.vision): a request may carry images [n, H, W, C] float32
(`submit(..., images=)`, n <= model.vision.max_images); its prompt holds tokens_per_image image tokens per image
(the chat template's `with_images`). The admission's prefill passes them as ModelInput.images [P, M, H, W, C]
(the layout's slots, zero-filled past the request's own), so the tower encodes them once, into the KV cache;
decode steps need no images. The prefill always gets the slots on such a model (zeros for a text request), so
its compiled shapes do not depend on the traffic. Multi-process: process 0 broadcasts a request's slots right
after its INSERT op (a second fixed-size broadcast, only for a request with images), so every process prefills
the same pixels.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from instruct_jax.data.images import ImageLayout
from instruct_jax.inference.sampling import decode_step, prefill, sample_rows, top_logprobs
from instruct_jax.model.kv_cache import LAYER_KV_AXES, SLOT_AXES, KVCache
from instruct_jax.model.transformer import ModelInput, Transformer, compute_dtype_weights, split_layers
from instruct_jax.parallel.context import in_mesh_context
from instruct_jax.parallel.mesh import MeshConfig, make_mesh
from instruct_jax.parallel.sharding import logical_to_spec, replicated

TOP_LOGPROBS = 5  # alternatives reported per token (OpenAI's completions API allows up to 5)
NOOP, INSERT, STEP, SCORE, RELOAD, STOP = range(6)  # what process 0 tells every process to run
HEARTBEAT_S = 1.0  # an idle multi-process engine sends a NOOP this often


def _host(x) -> np.ndarray:
    """A replicated output as numpy (on any process: its local copy)."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


class Channel:
    """Process 0's ops to every process of a multi-process engine: one fixed-size int32 broadcast per op
    ([op, payload length, payload ...]) through the devices (`multihost_utils.broadcast_one_to_all`)."""

    def __init__(self, size: int):
        self.size = size

    def send(self, op: int, payload: np.ndarray) -> None:
        if payload.size > self.size - 2:
            raise ValueError(f"engine op payload of {payload.size} values exceeds the channel ({self.size - 2})")
        buffer = np.zeros(self.size, np.int32)
        buffer[0], buffer[1] = op, payload.size
        buffer[2:2 + payload.size] = payload
        self._broadcast(buffer)

    def receive(self) -> tuple[int, np.ndarray]:
        buffer = self._broadcast(np.zeros(self.size, np.int32))
        return int(buffer[0]), buffer[2:2 + int(buffer[1])].copy()

    @staticmethod
    def _broadcast(buffer: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(buffer))


# ----------------------------------------------------------------------------- requests
@dataclasses.dataclass(frozen=True)
class Settings:
    """How one request decodes."""

    max_tokens: Optional[int] = None  # None: until the context is full
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None  # None: a fresh random stream
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one (not included)
    stop_tokens: Optional[tuple[int, ...]] = None  # None: the tokenizer's EOS and end-of-turn

    def check(self) -> None:
        """ValueError naming the field."""
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {list(self.stop)!r}")


@dataclasses.dataclass
class TokenInfo:
    token: int
    logprob: float  # the model's log-probability of the token
    top: list[tuple[int, float]]  # the TOP_LOGPROBS most likely tokens at that step


@dataclasses.dataclass
class TextEvent:
    text: str  # new text, never a partial character, never part of a stop string
    tokens: list[TokenInfo]  # the tokens behind it (a character split over tokens arrives with its last one)


@dataclasses.dataclass
class Finish:
    reason: str  # "stop" (stop token or string), "length" (max_tokens or the context), "cancelled", "error"
    completion_tokens: int
    prompt_tokens: int
    error: str = ""
    stop_token: Optional[TokenInfo] = None  # the stop token that ended it (not part of the text)


class TextStream:
    """Token ids in, text out: holds back a trailing partial UTF-8 character and any tail that could
    still become a stop string; cuts the text before the first stop string.

    The text is decode(all ids so far), so a tokenizer's context-dependent spacing is respected.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that became safe to show."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a character split over tokens: wait for the rest
            return ""
        if self._stop_in(text):
            return self._out(text, self._cut)
        hold = max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        return self._out(text, len(text) - hold)

    def flush(self) -> str:
        """At the end: whatever was held back (a partial character decodes as U+FFFD), cut before a stop string
        that the held-back text completes."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        return self._out(text, self._cut if self._stop_in(text) else None)

    def _stop_in(self, text: str) -> bool:
        hits = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._cut = True, min(hits)
        return bool(hits)

    def _out(self, text: str, end: Optional[int]) -> str:
        end = len(text) if end is None else max(end, self.sent)
        out, self.sent = text[self.sent:end], end
        return out


class Request:
    """One generation in the engine. Its consumer reads `events()` (or passes `on_event`) and may `cancel()`."""

    _ids = itertools.count()

    def __init__(self, prompt: Sequence[int], settings: Settings, decode: Callable,
                 on_event: Optional[Callable] = None, images: Optional[np.ndarray] = None):
        self.id = next(Request._ids)
        self.prompt = list(prompt)
        self.images = images  # [n, H, W, C] float32 or None: prefilled with the prompt (model.vision)
        self.settings = settings
        self.stream = TextStream(decode, settings.stop)
        self.key = jax.random.key_data(jax.random.PRNGKey(
            settings.seed if settings.seed is not None else int.from_bytes(os.urandom(4), "little")))
        self.generated = 0
        self.version = 0  # the engine's weight version when it was admitted (its text comes from those weights)
        self.pending: list[TokenInfo] = []  # tokens whose text is held back
        self.cancelled = threading.Event()
        self.finished: Optional[Finish] = None
        self._queue: "queue.Queue" = queue.Queue()
        self._on_event = on_event or self._queue.put

    def cancel(self) -> None:
        """Stop generating (a disconnected client): the slot is freed at the next step."""
        self.cancelled.set()

    def emit(self, event) -> None:
        if isinstance(event, Finish):
            self.finished = event
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - a consumer that went away (its event loop closed) must not stop the engine
            self.cancel()

    def events(self, timeout: Optional[float] = None) -> Iterator:
        """TextEvents then one Finish (for consumers without `on_event`)."""
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if isinstance(event, Finish):
                return

    def result(self, timeout: Optional[float] = None) -> tuple[str, list[TokenInfo], Finish]:
        """(text, tokens, finish), waiting for the end."""
        text, tokens = [], []
        for event in self.events(timeout):
            if isinstance(event, Finish):
                return "".join(text), tokens, event
            text.append(event.text)
            tokens.extend(event.tokens)
        raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- buckets
def prompt_buckets(max_context: int, count: int = 4, multiple: int = 16) -> tuple[int, ...]:
    """At most `count` prompt lengths, doubling up to max_context - 1 (room for one new token), each a
    multiple of `multiple` where it fits. A prompt is padded to the smallest bucket that holds it."""
    top = max_context - 1
    sizes = {top}
    size = top
    for _ in range(count - 1):
        size = max(multiple, (size // 2) // multiple * multiple)
        sizes.add(min(size, top))
    return tuple(sorted(sizes))


# ----------------------------------------------------------------------------- the engine
class Engine:
    """Continuous batching over `slots` rows of one KV cache (see the module docstring)."""

    def __init__(self, model: Transformer, params, tokenizer, *, slots: int = 8, max_context: int = 512,
                 buckets: Optional[Sequence[int]] = None, mesh=None, rules=None, name: str = "model",
                 max_queue: int = 256, prefill_rows: int = 1, loader: Optional[Callable] = None):
        if max_context > model.cfg.max_seq_len:
            raise ValueError(f"max_context {max_context} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {max_context}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.slots, self.max_context = slots, max_context
        self.buckets = tuple(buckets) if buckets else prompt_buckets(max_context)
        if max(self.buckets) > max_context - 1:
            raise ValueError(f"prompt buckets {self.buckets} must leave room for a token in {max_context} slots")
        if mesh is None:  # one device; a mesh all the same, so every program's output sharding is explicit
            mesh_cfg = MeshConfig(data=1, fsdp=1)
            mesh, rules = make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.logical_rules()
        self.mesh, self.rules = mesh, rules
        self.prefill_rows = prefill_rows
        if slots % prefill_rows:
            raise ValueError(f"slots ({slots}) must be a multiple of the mesh's batch shards ({prefill_rows})")
        self.default_stops = tuple(sorted({tokenizer.eos_id, tokenizer.eot_id}))
        self.max_queue = max_queue
        self.layout = ImageLayout.of(model.cfg.vision)  # None: a text-only model
        self._jit()
        self._lock = threading.Lock()  # guards params swaps against a running step
        self.version = 0
        self.params = None
        self.reload(params)
        self.cache = self._init_cache()
        # Host-side row state, one entry per slot.
        self.rows: list[Optional[Request]] = [None] * slots
        self._tokens = np.full(slots, tokenizer.pad_id, np.int32)  # the token each row feeds next
        self._positions = np.zeros(slots, np.int32)
        self._write = np.full(slots, max_context - 1, np.int32)
        self._keys = np.zeros((slots, 2), np.uint32)
        self._temperature = np.zeros(slots, np.float32)
        self._top_p = np.ones(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._waiting: "queue.Queue[Request]" = queue.Queue()
        self._jobs: "queue.Queue" = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.stats = dict(requests=0, finished=0, cancelled=0, generated_tokens=0, prompt_tokens=0, steps=0,
                          prefills=0)
        self.loader = loader
        self.failed = ""  # why the loop stopped ("closed" after close()); empty while it runs
        self.multi_process = jax.process_count() > 1
        self._channel = Channel(2 + max(9 + self.buckets[-1], 11 * slots, 4096))
        self._thread = None
        if jax.process_index() == 0:  # the others run `follow()`
            self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ jitted pieces
    def _jit(self) -> None:
        model, k = self.model, TOP_LOGPROBS
        max_context, pad = self.max_context, self.tokenizer.pad_id

        def prepare(params):  # once per load: per-layer weights in the compute dtype (what sample() does per call)
            return compute_dtype_weights(model.cfg, split_layers(params))

        def init_cache():
            return KVCache.init(model.cfg, self.slots, max_context, per_layer=True)

        rows = self.prefill_rows

        prefix_lm = model.cfg.vision.enabled and model.cfg.vision.prefix_lm

        def one_prompt(tokens, length, images=None):
            """tokens [T] (the first `length` real) as rows [P, T]: row 0 the prompt, the others empty
            (P = the batch shards, so the rows divide over the mesh's batch axes). images [M, H, W, C]: row 0's
            image slots (the other rows get zeros); None for a text-only model. A prefix-LM model
            (vision.prefix_lm) sees the whole prompt as its bidirectional prefix, as the data path builds it."""
            t = tokens.shape[0]
            idx = jnp.arange(t, dtype=jnp.int32)
            real = (idx < length)[None] & (jnp.arange(rows)[:, None] == 0)  # [P, T]
            if images is not None:
                images = jnp.zeros((rows,) + images.shape, jnp.float32).at[0].set(images)
            return ModelInput(jnp.where(real, tokens[None], pad), jnp.where(real, idx[None], 0),
                              real.astype(jnp.int32), images, real.astype(jnp.int32) if prefix_lm else None)

        def insert(params, cache, slot, tokens, length, key, temperature, top_p, top_k, images):
            """Prefill tokens [T] (the first `length` real) and its image slots (None: text-only model) into a
            fresh row, copy it into `slot`."""
            fresh = KVCache.init(model.cfg, rows, max_context, per_layer=True)
            logits, fresh = prefill(params, model, one_prompt(tokens, length, images), fresh)  # [P, V]
            logits = logits[:1]

            def put(full, new):
                return jax.lax.dynamic_update_slice_in_dim(full, new[:1].astype(full.dtype), slot, axis=0)

            cache = KVCache(tuple(map(put, cache.k, fresh.k)), tuple(map(put, cache.v, fresh.v)),
                            put(cache.positions, fresh.positions), put(cache.segment_ids, fresh.segment_ids))
            token = sample_rows(logits, jax.random.fold_in(jax.random.wrap_key_data(key), 0)[None],
                                temperature[None], top_p[None], top_k[None])
            chosen, top_ids, top_lps = top_logprobs(logits, token, k)
            return cache.constrain(), token[0], chosen[0], top_ids[0], top_lps[0]

        def step(params, cache, tokens, positions, write_index, segments, keys, counts, temperature, top_p, top_k):
            logits, cache = decode_step(params, model, tokens, positions, cache, write_index, segments)
            row_keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), counts)
            token = sample_rows(logits, row_keys, temperature, top_p, top_k)
            chosen, top_ids, top_lps = top_logprobs(logits, token, k)
            return cache, token, chosen, top_ids, top_lps

        def score(params, tokens, length):
            """Log-probs of tokens [T] (first `length` real): entry i is log p(tokens[i + 1] | tokens[:i + 1])."""
            t = tokens.shape[0]
            cache = KVCache.init(model.cfg, rows, t, per_layer=True)
            out = model.apply({"params": params}, one_prompt(tokens, length), cache=cache, write_index=0,
                              logits_at=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, t)))
            logits = out.logits[0, :-1]  # [T - 1, V]: position i predicts token i + 1
            chosen, top_ids, top_lps = top_logprobs(logits, tokens[1:], k)
            return chosen, top_ids, top_lps, logits.argmax(-1)

        # One sharding for the cache whichever program wrote it, so no program is traced twice.
        def named(*logical):
            return NamedSharding(self.mesh, logical_to_spec(logical, self.rules))

        layer, slot_axes = named(*LAYER_KV_AXES), named(*SLOT_AXES)
        layers = (layer,) * model.cfg.num_layers
        cache_out, rest = KVCache(layers, layers, slot_axes, slot_axes), replicated(self.mesh)
        jitted = dict(prepare=jax.jit(prepare),
                      init_cache=jax.jit(init_cache, out_shardings=cache_out),
                      insert=jax.jit(insert, donate_argnums=(1,), out_shardings=(cache_out,) + (rest,) * 4),
                      step=jax.jit(step, donate_argnums=(1,), out_shardings=(cache_out,) + (rest,) * 4),
                      score=jax.jit(score, out_shardings=(rest,) * 4))
        self._jitted = list(jitted.values())
        jitted = {n: in_mesh_context(f, self.mesh, self.rules) for n, f in jitted.items()}
        self._prepare, self._init_cache, self._insert, self._step, self._score = jitted.values()

    def compiles(self) -> int:
        """Programs compiled so far by this engine (prepare, cache, step, and one prefill / scorer per bucket)."""
        return sum(fn._cache_size() for fn in self._jitted)

    # ------------------------------------------------------------------ public
    def reload(self, params) -> int:
        """Serve new weights (same model) from the next step on; returns the new version. One process only:
        a multi-process engine reloads with `reload_path`, which every process runs."""
        prepared = self._prepare(params)
        jax.block_until_ready(prepared)
        with self._lock:
            self.params = prepared
            self.version += 1
            return self.version

    def reload_path(self, path: str) -> int:
        """Load and serve the weights at `path` (through the `loader` given at construction), on every process."""
        if self.loader is None:
            raise ValueError("this engine has no loader: pass params to reload()")
        return self.run_on_engine(lambda: self._do(RELOAD, np.frombuffer(path.encode(), np.uint8).astype(np.int32)))

    def bucket(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f"prompt of {length} tokens exceeds the longest prompt this engine takes "
                         f"({self.buckets[-1]} tokens; max_context {self.max_context})")

    def check(self, prompt: Sequence[int], settings: Settings, images: Optional[np.ndarray] = None) -> None:
        """ValueError when the request cannot be served as asked (names the problem)."""
        settings.check()
        self.check_images(prompt, images)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + (settings.max_tokens or 1) > self.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({settings.max_tokens}) exceeds the "
                             f"context of {self.max_context} tokens")
        self.bucket(len(prompt))
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def check_images(self, prompt: Sequence[int], images: Optional[np.ndarray]) -> None:
        """ValueError unless the images fit the model's slots and the prompt holds exactly tokens_per_image image
        tokens per image (a text request on a vision model: none)."""
        n = 0 if images is None else len(images)
        layout = self.layout
        if layout is None:
            if n:
                raise ValueError(f"model {self.name!r} has no vision tower: it takes no images")
            return
        if n > layout.max_images:
            raise ValueError(f"{n} images, more than this model takes (model.vision.max_images={layout.max_images})")
        if n and tuple(np.shape(images)[1:]) != layout.slot_shape[1:]:
            raise ValueError(f"images must be [n, {layout.size}, {layout.size}, {layout.channels}], got "
                             f"{list(np.shape(images))}")
        tokens = sum(int(t) == layout.token_id for t in prompt)
        if tokens != n * layout.tokens_per_image:
            raise ValueError(f"the prompt holds {tokens} image tokens (id {layout.token_id}) but {n} image(s) need "
                             f"{n * layout.tokens_per_image} ({layout.tokens_per_image} per image)")

    def submit(self, prompt: Sequence[int], settings: Settings, on_event: Optional[Callable] = None,
               images: Optional[np.ndarray] = None) -> Request:
        """Queue a generation; raises ValueError for a request that cannot be served, OverflowError when
        the queue is full. images: [n, H, W, C] float32 (data/images.load_image), for a model with a vision
        tower; the prompt holds their image tokens."""
        if images is not None:
            images = np.asarray(images, np.float32)
            if images.ndim == 3:
                images = images[None]
        self.check(prompt, settings, images)
        self._check_alive()
        if self._waiting.qsize() >= self.max_queue:
            raise OverflowError(f"{self.max_queue} requests already waiting")
        request = Request(prompt, settings, self.tokenizer.decode, on_event,
                          images if images is not None and len(images) else None)
        self.stats["requests"] += 1
        self._waiting.put(request)
        self._wake.set()
        return request

    def score(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The model's log-probs of a token sequence, run on the engine thread between steps:
        (logprob [n - 1] of tokens 1.., top ids [n - 1, k], top log-probs [n - 1, k], argmax [n - 1])."""
        tokens = list(tokens)
        if len(tokens) > self.buckets[-1]:
            raise ValueError(f"{len(tokens)} tokens exceed the longest sequence this engine scores "
                             f"({self.buckets[-1]})")
        bucket = self.bucket(len(tokens))
        payload = np.full(2 + bucket, self.tokenizer.pad_id, np.int32)
        payload[:2] = len(tokens), bucket
        payload[2:2 + len(tokens)] = tokens
        out = self.run_on_engine(lambda: self._do(SCORE, payload))
        return tuple(x[:len(tokens) - 1] for x in out)

    def run_on_engine(self, fn: Callable):
        """Run fn() on the engine thread between two steps; returns its result (or raises its error)."""
        done, box = threading.Event(), {}
        self._check_alive()
        self._jobs.put((fn, box, done))
        self._wake.set()
        while not done.wait(timeout=1.0):
            self._check_alive()  # the loop fails its queued jobs when it stops; this is the backstop
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _run_jobs(self, fail: str = "") -> None:
        while True:
            try:
                fn, box, done = self._jobs.get_nowait()
            except queue.Empty:
                return
            try:
                if fail:
                    raise RuntimeError(f"engine {self.name} stopped: {fail}")
                box["value"] = fn()
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                box["error"] = e
            finally:
                done.set()

    def _check_alive(self) -> None:
        if self.failed:
            raise RuntimeError(f"engine {self.name} stopped: {self.failed}")
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"engine {self.name} is not running")

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def queued(self) -> int:
        return self._waiting.qsize()

    def close(self) -> None:
        """Stop the loop (and, on process 0 of a multi-process engine, every follower's)."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)
        self._thread = None

    # ------------------------------------------------------------------ ops: what every process runs
    def _do(self, op: int, payload: Optional[np.ndarray] = None, images: Optional[np.ndarray] = None):
        """Process 0: hand `op` to every process (multi-process) and run it here; returns its host outputs.
        images: an INSERT's image slots [M, H, W, C], broadcast after the op when its payload flags them."""
        payload = np.zeros(0, np.int32) if payload is None else np.asarray(payload, np.int32)
        if self.multi_process:
            self._channel.send(op, payload)
            if op == INSERT and payload[8]:
                images = self._broadcast_images(images)
        return self._run(op, payload, images)

    def _broadcast_images(self, images: Optional[np.ndarray]) -> np.ndarray:
        """Process 0's image slots to every process (one fixed-shape float32 broadcast)."""
        from jax.experimental import multihost_utils

        buffer = images if images is not None else np.zeros(self.layout.slot_shape, np.float32)
        return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(buffer, np.float32)))

    def follow(self) -> None:
        """Processes other than 0: run the ops process 0 decides, in its order, until it stops. An op that
        fails here raises (the process exits): its state would no longer match process 0's."""
        while True:
            op, payload = self._channel.receive()
            if op == STOP:
                return
            images = self._broadcast_images(None) if op == INSERT and payload[8] else None
            self._run(op, payload, images)

    def _run(self, op: int, p: np.ndarray, images: Optional[np.ndarray] = None):
        if op == NOOP:
            return None
        if op == INSERT:
            slot, length, bucket, top_k = (int(x) for x in p[:4])
            key = p[4:6].view(np.uint32)
            temperature, top_p = (float(x) for x in p[6:8].view(np.float32))
            with self._lock:
                params = self.params
            slots = None
            if self.layout is not None:  # always the slots (zeros for a text request): one prefill shape
                slots = np.zeros(self.layout.slot_shape, np.float32) if images is None else images
            out = self._insert(params, self.cache, np.int32(slot), p[9:9 + bucket], np.int32(length), key,
                               np.float32(temperature), np.float32(top_p), np.int32(top_k), slots)
            self.cache = out[0]
            return [_host(x) for x in out[1:]]
        if op == STEP:
            b = self.slots
            tokens, positions, write, live, counts, top_k = (p[i * b:(i + 1) * b] for i in range(6))
            keys = p[6 * b:8 * b].view(np.uint32).reshape(b, 2)
            temperature, top_p = (p[(8 + i) * b:(9 + i) * b].view(np.float32) for i in range(2))
            with self._lock:
                params = self.params
            out = self._step(params, self.cache, tokens, positions, write, live, keys, counts, temperature, top_p,
                             top_k)
            self.cache = out[0]
            return [_host(x) for x in out[1:]]
        if op == SCORE:
            length, bucket = int(p[0]), int(p[1])
            return [_host(x) for x in self._score(self.params, p[2:2 + bucket], np.int32(length))]
        if op == RELOAD:
            return self.reload(self.loader(p.astype(np.uint8).tobytes().decode()))
        raise ValueError(f"unknown engine op {op}")

    # ------------------------------------------------------------------ the loop (process 0)
    def _loop(self) -> None:
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    busy = self._iteration()
                except Exception as e:  # noqa: BLE001 - fail the live requests, keep serving
                    message = f"{type(e).__name__}: {e}"
                    for slot, request in enumerate(self.rows):
                        if request is not None:
                            self._finish(slot, "error", message)
                    if self.multi_process:
                        # The other processes may hold a cache or weights that no longer match process 0's:
                        # stop serving rather than compute on diverged state.
                        self.failed = message
                        return
                    self.cache = self._init_cache()
                    busy = False
                if busy:
                    idle_since = time.monotonic()
                elif self.multi_process and time.monotonic() - idle_since > HEARTBEAT_S:
                    self._do(NOOP)  # followers wait in a collective: keep it from timing out
                    idle_since = time.monotonic()
            if self.multi_process:
                self._channel.send(STOP, np.zeros(0, np.int32))
        except Exception as e:  # noqa: BLE001 - recorded; everyone waiting is told below
            self.failed = f"{type(e).__name__}: {e}"
        finally:
            self.failed = self.failed or "closed"
            reason = "error" if self.failed != "closed" else "cancelled"
            for slot, request in enumerate(self.rows):
                if request is not None:
                    self._finish(slot, reason, self.failed)
            while True:
                try:
                    request = self._waiting.get_nowait()
                except queue.Empty:
                    break
                request.emit(Finish(reason, 0, len(request.prompt), self.failed))
            self._run_jobs(fail=self.failed)

    def _iteration(self) -> bool:
        """Jobs, admissions, one decode step; False when there was nothing to do (after a short wait)."""
        self._run_jobs()
        self._admit()
        for slot, request in enumerate(self.rows):  # disconnected consumers free their slots
            if request is not None and request.cancelled.is_set():
                self._finish(slot, "cancelled")
        if self.active == 0:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return False
        live = np.array([r is not None for r in self.rows], np.int32)
        counts = np.array([r.generated if r is not None else 0 for r in self.rows], np.int32)
        payload = np.concatenate([self._tokens, self._positions, self._write, live, counts, self._top_k,
                                  self._keys.reshape(-1).view(np.int32), self._temperature.view(np.int32),
                                  self._top_p.view(np.int32)])
        tokens, chosen, top_ids, top_lps = self._do(STEP, payload)
        self.stats["steps"] += 1
        for slot in np.flatnonzero(live):
            self._positions[slot] += 1
            self._write[slot] += 1
            self._deliver(int(slot), int(tokens[slot]), float(chosen[slot]), top_ids[slot], top_lps[slot])
        return True

    def _purge_cancelled(self) -> None:
        """Waiting requests whose consumer went away leave the queue now, not when a slot frees."""
        with self._waiting.mutex:
            gone = [r for r in self._waiting.queue if r.cancelled.is_set()]
            for r in gone:
                self._waiting.queue.remove(r)
        for r in gone:
            self.stats["cancelled"] += 1
            r.emit(Finish("cancelled", 0, len(r.prompt)))

    def _admit(self) -> None:
        self._purge_cancelled()
        for slot in range(self.slots):
            if self.rows[slot] is not None:
                continue
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                return
            s = request.settings
            n = len(request.prompt)
            bucket = self.bucket(n)
            payload = np.full(9 + bucket, self.tokenizer.pad_id, np.int32)
            payload[:4] = slot, n, bucket, s.top_k
            payload[4:6] = request.key.view(np.int32)
            payload[6:8] = np.array([s.temperature, s.top_p], np.float32).view(np.int32)
            payload[8] = request.images is not None  # its image slots follow the op (multi-process)
            payload[9:9 + n] = request.prompt
            images = None if request.images is None else self.layout.slots(request.images)[0]
            self.rows[slot] = request  # from here on the loop's error handling finishes it
            request.version = self.version
            token, chosen, top_ids, top_lps = self._do(INSERT, payload, images)
            self.stats["prefills"] += 1
            self.stats["prompt_tokens"] += n
            self._positions[slot] = n
            self._write[slot] = n
            self._keys[slot] = request.key
            self._temperature[slot], self._top_p[slot], self._top_k[slot] = s.temperature, s.top_p, s.top_k
            self._deliver(slot, int(token), float(chosen), top_ids, top_lps)

    def _deliver(self, slot: int, token: int, logprob: float, top_ids, top_lps) -> None:
        request = self.rows[slot]
        s = request.settings
        request.generated += 1
        self.stats["generated_tokens"] += 1
        stops = self.default_stops if s.stop_tokens is None else s.stop_tokens
        info = TokenInfo(token, logprob, [(int(i), float(v)) for i, v in zip(top_ids, top_lps)])
        if token in stops:
            return self._finish(slot, "stop", stop_token=info)
        request.pending.append(info)
        text = request.stream.push(token)
        if text or request.stream.stopped:
            if text:
                request.emit(TextEvent(text, request.pending))
                request.pending = []
            if request.stream.stopped:
                return self._finish(slot, "stop")
        # prompt + reply <= max_context (the last token needs no cache slot: it is never fed back)
        if request.generated >= (s.max_tokens or self.max_context - len(request.prompt)):
            return self._finish(slot, "length")
        self._tokens[slot] = token

    def _finish(self, slot: int, reason: str, error: str = "", stop_token: Optional[TokenInfo] = None) -> None:
        request = self.rows[slot]
        self.rows[slot] = None
        self._tokens[slot] = self.tokenizer.pad_id
        self._write[slot] = self.max_context - 1  # a free row writes invisible padding into its last slot
        self._positions[slot] = 0
        try:
            if reason in ("length", "stop") and not request.stream.stopped:
                rest = request.stream.flush()
                if rest or request.pending:
                    request.emit(TextEvent(rest, request.pending))
        finally:
            request.pending = []
            self.stats["finished"] += 1
            self.stats["cancelled"] += reason == "cancelled"
            # The stop token is generated, not shown; completion_tokens counts what the client sees + the stop.
            request.emit(Finish(reason, request.generated, len(request.prompt), error, stop_token))


def wait_idle(engine: Engine, timeout: float = 60.0) -> None:
    """Block until the engine has no live or waiting request (tests, benchmarks)."""
    deadline = time.monotonic() + timeout
    while engine.active or engine.queued:
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine {engine.name} still busy after {timeout} s")
        time.sleep(0.01)
