"""Decode and score prompts with language-model exports: what evaluation needs from a policy.

    runner = PolicyRunner(cfg, tokenizer, template)         one mesh, one model config
    params = runner.load("runs/pipeline/sft")               a params export or a phase's workdir
    gen = runner.generate(params, prompts, temperature=0.0, max_new_tokens=24, seed=0)
    gen.texts[i], gen.tokens [P, N], gen.lengths [P], gen.logprob [P]  (sum over the response)
    runner.logprob(other_params, gen)                       [P] the same responses under another model

Decoding is `instruct_jax.inference.sampling` (the codebase's one decoding loop) with its jitted, sharded
sampler; prompts are rendered with the chat template and left-padded to `prompt_len` tokens,
batched `batch_size` rows at a time (padded with copies of the last prompt, dropped after). A
response is the tokens up to and including the first stop token (end-of-turn / EOS); its text
leaves the stop token out. A model with a vision tower takes `images` [P, M, H, W, C] (each prompt's image
slots, `data.images.ImageLayout.slots`) beside the prompts: encoded in the prefill, kept with the generation
so that `logprob` re-scores with the same images (none given: blank slots). `logprob` re-scores a generation under any params at a temperature:
sum over response tokens of log softmax(logits / temperature)[token] — at temperature 1 the
difference of two models' sums on the first model's samples is the k1 estimate of their KL.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from instruct_jax.checkpoint import load_params, resolve_params_dir
from instruct_jax.config import Config
from instruct_jax.data.chat import ChatTemplate
from instruct_jax.data.examples import encode_prompt
from instruct_jax.data.images import ImageLayout, count_markers
from instruct_jax.data.stats import DataStats
from instruct_jax.data.tokenizer import Tokenizer, check_tokenizer_fits
from instruct_jax.inference.logprobs import policy_outputs
from instruct_jax.inference.sampling import SamplingConfig, make_sampler, prompt_and_response
from instruct_jax.model.transformer import ModelInput, Transformer, init_params_boxed
from instruct_jax.parallel.context import in_mesh_context
from instruct_jax.parallel.mesh import batch_shards, make_mesh
from instruct_jax.parallel.sharding import logical_to_spec, param_shardings_for


@dataclasses.dataclass
class Generation:
    """Responses to P prompts (row i answers prompt i)."""

    prompt_tokens: np.ndarray  # [P, T] int32, left-padded
    prompt_lengths: np.ndarray  # [P] int32
    tokens: np.ndarray  # [P, N] int32 response, pad after the stop token
    lengths: np.ndarray  # [P] int32 response tokens including the stop token
    done: np.ndarray  # [P] bool: ended with a stop token (else cut at N)
    logprob: np.ndarray  # [P] float32: sum of the sampler's log-probs (0 when greedy)
    texts: list[str]  # decoded responses, stop token left out
    images: np.ndarray | None = None  # [P, M, H, W, C] float32 image slots of the prompts (model.vision)


class PolicyRunner:
    """Sampling and log-probs for any number of LM param trees of one model config, on one mesh."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, template: ChatTemplate, prompt_len: int,
                 batch_size: int = 64, devices: Sequence | None = None):
        check_tokenizer_fits(tokenizer, cfg.model)
        self.cfg, self.tokenizer, self.template, self.prompt_len = cfg, tokenizer, template, prompt_len
        self.mesh = make_mesh(cfg.mesh, list(devices if devices is not None else jax.devices()))
        self.rules = cfg.mesh.logical_rules()
        self.model = Transformer(cfg.model)
        self.abstract_params, self.param_shardings = param_shardings_for(
            functools.partial(init_params_boxed, self.model), self.mesh, self.rules)
        shards = batch_shards(self.mesh.shape, self.rules)
        self.batch_size = -(-batch_size // shards) * shards  # rows per call, a multiple of the batch shards
        self.rows = NamedSharding(self.mesh, logical_to_spec(("batch", None), self.rules))
        self.stop_tokens = tuple(sorted({tokenizer.eos_id, tokenizer.eot_id}))
        self._samplers: dict = {}
        self._logprob_fns: dict = {}
        self.stats = DataStats(name="eval prompts")  # prompt truncations are counted here
        self.layout = ImageLayout.of(cfg.model.vision)
        if self.layout is not None and template.image_tokens is None:
            template.with_images(self.layout.token_id, self.layout.tokens_per_image)

    # ------------------------------------------------------------------ params
    def load(self, path: str):
        """Params from an LM export (or a pretrain / sft / ppo workdir's params/), in this mesh's shardings."""
        return load_params(resolve_params_dir(path), self.abstract_params)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompts: Sequence[Sequence[dict]]) -> tuple[np.ndarray, np.ndarray]:
        """Chat-rendered prompts, left-padded: tokens [P, T] and lengths [P] (over-long prompts keep their end)."""
        tokens = np.full((len(prompts), self.prompt_len), self.tokenizer.pad_id, np.int32)
        lengths = np.zeros(len(prompts), np.int32)
        for i, messages in enumerate(prompts):
            shown = [None] * count_markers(messages) if self.layout else None  # what intactness counts
            example = encode_prompt(messages, self.template, self.prompt_len, "truncate", self.stats, f"prompt {i}",
                                    shown)
            if example is None:  # dropped: keeping its end would cut an image's tokens
                raise ValueError(f"prompt {i}: {len(self.template.render_prompt(list(messages)))} tokens with "
                                 f"images do not fit prompt_len={self.prompt_len}")
            ids = example.ids
            tokens[i, self.prompt_len - len(ids):] = ids
            lengths[i] = len(ids)
        return tokens, lengths

    def truncated(self, prompts: Sequence[Sequence[dict]]) -> np.ndarray:
        """[P] bool: which chat-rendered prompts exceed prompt_len, so that `encode` keeps only their end."""
        return np.array([len(self.template.render_prompt(list(m))) > self.prompt_len for m in prompts], bool)

    def _batches(self, n: int):
        """(start, stop) row ranges of at most batch_size rows."""
        return [(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]

    def _pad(self, x: np.ndarray) -> np.ndarray:
        """Fill a partial batch up to batch_size rows with copies of its last row."""
        missing = self.batch_size - x.shape[0]
        return np.concatenate([x, np.repeat(x[-1:], missing, axis=0)]) if missing else x

    # ------------------------------------------------------------------ decoding
    def sampler(self, temperature: float, max_new_tokens: int):
        key = (float(temperature), int(max_new_tokens))
        if key not in self._samplers:
            scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  stop_tokens=self.stop_tokens, pad_id=self.tokenizer.pad_id)
            self._samplers[key] = make_sampler(self.model, scfg, self.mesh, self.rules, self.param_shardings)
        return self._samplers[key]

    def _prompt_input(self, tokens: np.ndarray, lengths: np.ndarray, images: np.ndarray | None, a: int,
                      b: int) -> ModelInput:
        """Rows a..b of left-padded prompts (padded to batch_size) with their image slots and, with
        vision.prefix_lm, the whole prompt as the prefix."""
        inputs = ModelInput.left_padded(jnp.asarray(self._pad(tokens[a:b])), jnp.asarray(self._pad(lengths[a:b])))
        if self.layout is not None:
            inputs = inputs.replace(images=jnp.asarray(self._pad(images[a:b])))
            if self.layout.prefix_lm:
                inputs = inputs.replace(prefix=inputs.segment_ids)
        return inputs

    def image_slots(self, images: np.ndarray | None, n: int) -> np.ndarray | None:
        """[n, M, H, W, C] image slots for n prompts: `images` as given, blank without; None for a text model."""
        if self.layout is None:
            if images is not None:
                raise ValueError("images given to a runner whose model has no vision tower (model.vision)")
            return None
        if images is None:
            return np.zeros((n,) + self.layout.slot_shape, np.float32)
        if images.shape != (n,) + self.layout.slot_shape:
            raise ValueError(f"images must be [P, M, H, W, C] = {(n,) + self.layout.slot_shape}, got {images.shape}")
        return np.asarray(images, np.float32)

    def generate(self, params, prompts: Sequence[Sequence[dict]], *, temperature: float, max_new_tokens: int,
                 seed: int = 0, images: np.ndarray | None = None) -> Generation:
        """One response per prompt. Batch j samples with fold_in(PRNGKey(seed), j): reproducible for a seed.
        images: [P, M, H, W, C] image slots of the prompts (a model with a vision tower)."""
        prompt_tokens, prompt_lengths = self.encode(prompts)
        images = self.image_slots(images, len(prompts))
        sample = self.sampler(temperature, max_new_tokens).sample
        outs = []
        for j, (a, b) in enumerate(self._batches(len(prompts))):
            inputs = self._prompt_input(prompt_tokens, prompt_lengths, images, a, b)
            inputs = jax.device_put(inputs, self.rows)
            out = sample(params, inputs, jax.random.fold_in(jax.random.PRNGKey(seed), j))
            outs.append(jax.tree.map(lambda x, n=b - a: np.asarray(jax.device_get(x))[:n], out))
        tokens = np.concatenate([o.tokens for o in outs])
        lengths = np.concatenate([o.lengths for o in outs]).astype(np.int32)
        done = np.concatenate([o.done for o in outs])
        logprob = np.concatenate([o.logprobs.sum(axis=1) for o in outs]).astype(np.float32)
        texts = [self.tokenizer.decode(row[:n]) for row, n in zip(tokens, lengths)]
        return Generation(prompt_tokens, prompt_lengths, tokens, lengths, done, logprob, texts, images)

    # ------------------------------------------------------------------ scoring
    def _logprob_fn(self, temperature: float):
        if temperature not in self._logprob_fns:
            t = self.prompt_len

            def fn(params, inputs: ModelInput, response, mask):
                logprobs, _ = policy_outputs(self.model, params, inputs, response, t, temperature)
                return jnp.sum(logprobs * mask, axis=1)

            jitted = jax.jit(fn, in_shardings=(self.param_shardings, self.rows, self.rows, self.rows))
            self._logprob_fns[temperature] = in_mesh_context(jitted, self.mesh, self.rules)
        return self._logprob_fns[temperature]

    def logprob(self, params, gen: Generation, temperature: float = 1.0) -> np.ndarray:
        """[P] sum of log-probs of each generated response (stop token included) under `params`."""
        fn = self._logprob_fn(float(temperature))
        n = gen.tokens.shape[1]
        mask = (np.arange(n)[None, :] < gen.lengths[:, None]).astype(np.float32)
        out = []
        for a, b in self._batches(len(gen.texts)):
            prompt = self._prompt_input(gen.prompt_tokens, gen.prompt_lengths,
                                        self.image_slots(gen.images, len(gen.texts)), a, b)
            sample = _SampleLike(jnp.asarray(self._pad(gen.tokens[a:b])), jnp.asarray(self._pad(gen.lengths[a:b])))
            inputs = prompt_and_response(prompt, sample)
            out.append(np.asarray(fn(params, inputs, sample.tokens, jnp.asarray(self._pad(mask[a:b]))))[:b - a])
        return np.concatenate(out).astype(np.float32)

    def logprob_texts(self, params, prompts: Sequence[Sequence[dict]], texts: Sequence[str], max_new_tokens: int,
                      temperature: float = 1.0, images: np.ndarray | None = None) -> np.ndarray:
        """[P] sum of log-probs of given responses under `params`: each text tokenized and followed by the
        end-of-turn token (the sampler's stop), cut at `max_new_tokens` tokens, as the answer to prompt i."""
        if len(prompts) != len(texts):
            raise ValueError(f"{len(prompts)} prompts but {len(texts)} texts")
        prompt_tokens, prompt_lengths = self.encode(prompts)
        tokens = np.full((len(texts), max_new_tokens), self.tokenizer.pad_id, np.int32)
        lengths, done = np.zeros(len(texts), np.int32), np.zeros(len(texts), bool)
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text) + [self.tokenizer.eot_id]
            done[i] = len(ids) <= max_new_tokens
            ids = ids[:max_new_tokens]
            tokens[i, :len(ids)], lengths[i] = ids, len(ids)
        gen = Generation(prompt_tokens, prompt_lengths, tokens, lengths, done, np.zeros(len(texts), np.float32),
                         list(texts), self.image_slots(images, len(texts)))
        return self.logprob(params, gen, temperature)


@dataclasses.dataclass
class _SampleLike:
    """The two fields of sampling.SampleOutput that `prompt_and_response` reads."""

    tokens: jax.Array
    lengths: jax.Array

