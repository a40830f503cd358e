"""`load_policy(path)`: a trained or imported model, ready to generate and chat.

    import instruct_jax
    policy = instruct_jax.load_policy("runs/smollm2")          # an `interop import` folder, a workdir, a params export
    print(policy.chat("What is the capital of France?"))     # greedy by default
    for text in policy.stream_chat([{"role": "user", "content": "Hi"}], temperature=0.7):
        print(text, end="", flush=True)

What a path may be, and where the model, tokenizer and chat template come from:

* an `interop import` folder: `model.json` (the ModelConfig), `tokenizer/` (with the model's chat
  template), `params/`;
* a phase's workdir (`sft`, `ppo`, `pretrain`, a pipeline stage): `config.json` (model, mesh,
  data.tokenizer, data.chat_template), `params/`; a tokenizer trained by the run is read from its
  `tokenizer/` folder;
* a params export inside either (`.../params`, a PPO run's `.../ema_params`): the folder above it says
  what the model is.

Generation goes through `inference/engine.py` (continuous batching on the one decoding loop): one
`Policy` serves any number of concurrent callers, a server's included.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Iterator, Optional, Sequence, Union

import jax
import numpy as np

from instruct_jax.checkpoint import load_params, resolve_params_dir
from instruct_jax.config import section_from_dict
from instruct_jax.data.chat import ChatTemplate, load_chat_template
from instruct_jax.data.config import TRAIN_SENTENCEPIECE
from instruct_jax.data.images import ImageLayout, load_image
from instruct_jax.data.tokenizer import Tokenizer, check_tokenizer_fits, load_tokenizer
from instruct_jax.inference.engine import Engine, Finish, Request, Settings, TextEvent
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import Transformer, init_params_boxed
from instruct_jax.parallel.mesh import MeshConfig, batch_shards, make_mesh
from instruct_jax.parallel.sharding import param_shardings_for

Messages = Union[str, Sequence[dict]]


@dataclasses.dataclass
class PolicySource:
    """What a path holds: the model, how it shards, its tokenizer and chat template, and its weights."""

    model: ModelConfig
    mesh: MeshConfig
    tokenizer: str  # a tokenizer file or folder
    chat_template: str  # "model", "builtin" or a Jinja file
    params_dir: str
    root: str  # the folder that describes the model (import folder or workdir)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_policy(path: str) -> PolicySource:
    """Where the model config, tokenizer and params of `path` are (see the module docstring).
    FileNotFoundError naming what is missing."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such model folder: {path}")
    root = path
    for candidate in (path, os.path.dirname(path)):
        if any(os.path.isfile(os.path.join(candidate, f)) for f in ("model.json", "config.json")):
            root = candidate
            break
    else:
        raise FileNotFoundError(f"{path} is not a model: expected model.json (an `interop import` folder) or "
                                "config.json (a run's workdir) there or in the folder above")
    params_dir = resolve_params_dir(path)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"no params export in {path} (expected {os.path.join(path, 'params')})")
    if os.path.isfile(os.path.join(root, "model.json")):
        meta = _read_json(os.path.join(root, "model.json"))
        model = section_from_dict(ModelConfig, meta["model"], "model.json:model")
        tokenizer = os.path.join(root, "tokenizer")
        if not os.path.isdir(tokenizer):
            raise FileNotFoundError(f"{root} has no tokenizer/ folder (the import found no tokenizer.json)")
        template = "model" if load_tokenizer(tokenizer).chat_template else "builtin"
        return PolicySource(model, MeshConfig(), tokenizer, template, params_dir, root)
    cfg = _read_json(os.path.join(root, "config.json"))
    model = section_from_dict(ModelConfig, cfg["model"], "config.json:model")
    mesh = section_from_dict(MeshConfig, cfg.get("mesh", {}), "config.json:mesh")
    data = cfg.get("data", {})
    tokenizer = data.get("tokenizer", "")
    if tokenizer == TRAIN_SENTENCEPIECE:
        tokenizer = os.path.join(root, "tokenizer", f"spm_{data.get('vocab_size')}.model")
    if not tokenizer or not os.path.exists(os.path.expanduser(tokenizer)):
        raise FileNotFoundError(f"{root}/config.json names the tokenizer {tokenizer!r}, which is not there")
    return PolicySource(model, mesh, tokenizer, data.get("chat_template", "builtin"), params_dir, root)


class Policy:
    """A language model with its tokenizer and chat template, generating through a continuous-batching Engine."""

    def __init__(self, source: PolicySource, *, slots: int = 8, max_context: Optional[int] = None,
                 devices: Optional[Sequence] = None, name: str = "model"):
        self.source, self.name = source, name
        self.cfg = source.model
        self.tokenizer: Tokenizer = load_tokenizer(source.tokenizer)
        check_tokenizer_fits(self.tokenizer, self.cfg)
        self.template: ChatTemplate = load_chat_template(source.chat_template, self.tokenizer)
        if self.cfg.vision.enabled:  # each "<image>" marker in a message becomes the tower's image tokens
            self.template.with_images(self.cfg.vision.image_token_id, self.cfg.vision.tokens_per_image)
        self.mesh = make_mesh(source.mesh, list(devices if devices is not None else jax.devices()))
        self.rules = source.mesh.logical_rules()
        self.model = Transformer(self.cfg)
        self.abstract_params, self.param_shardings = param_shardings_for(
            functools.partial(init_params_boxed, self.model), self.mesh, self.rules)
        shards = batch_shards(self.mesh.shape, self.rules)
        slots = -(-slots // shards) * shards
        self.engine = Engine(self.model, self._load(source.params_dir), self.tokenizer, slots=slots,
                             max_context=min(max_context or self.cfg.max_seq_len, self.cfg.max_seq_len),
                             mesh=self.mesh, rules=self.rules, name=name, prefill_rows=shards, loader=self._load)

    def _load(self, params_dir: str):
        return load_params(params_dir, self.abstract_params)

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def reload(self, path: Optional[str] = None) -> int:
        """Load newer weights of the same model (the same path by default) without stopping; new version."""
        params_dir = resolve_params_dir(path) if path else self.source.params_dir
        if not os.path.isdir(params_dir):
            raise FileNotFoundError(f"no params export at {params_dir}")
        return self.engine.reload_path(params_dir)  # every process of a multi-process engine loads it

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def messages(conversation: Messages, system: Optional[str] = None) -> list[dict]:
        """A string is one user turn; `system` (if given) is put first unless the conversation has one."""
        messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else [
            dict(m) for m in conversation]
        if system and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def chat_ids(self, conversation: Messages, system: Optional[str] = None) -> list[int]:
        """The conversation rendered by the chat template, ending with the assistant's header."""
        return self.template.render_prompt(self.messages(conversation, system))

    def text_ids(self, text: str) -> list[int]:
        """A plain-text prompt, tokenized as it is (no BOS added: what OpenAI-style completion clients such as
        lm-eval expect, since they count the prompt's tokens themselves)."""
        return self.tokenizer.encode(text)

    # ------------------------------------------------------------------ generation
    @property
    def layout(self) -> Optional[ImageLayout]:
        """The model's image slots (model.vision), or None for a text-only model."""
        return self.engine.layout

    def load_images(self, sources: Sequence) -> Optional[np.ndarray]:
        """[n, H, W, C] float32 at the tower's size from anything `load_image` reads (paths, data URLs, bytes,
        arrays, PIL images); None for no images. ValueError for a text-only model or an unreadable image."""
        if not sources:
            return None
        if self.layout is None:
            raise ValueError(f"model {self.name!r} has no vision tower: it takes no images")
        return np.stack([load_image(s, self.layout.size, self.layout.channels) for s in sources])

    def submit(self, ids: Sequence[int], settings: Settings, on_event=None,
               images: Optional[np.ndarray] = None) -> Request:
        """Queue a generation of `ids` (with its images [n, H, W, C] for a vision model: the prompt holds their
        image tokens, one "<image>" marker per image in the messages)."""
        return self.engine.submit(ids, settings, on_event, images)

    def generate(self, prompt: str, *, max_tokens: Optional[int] = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: Optional[int] = None, stop: Sequence[str] = ()) -> str:
        """Continue a plain-text prompt (no chat template)."""
        settings = Settings(max_tokens, temperature, top_p, top_k, seed, tuple(stop))
        return self.submit(self.text_ids(prompt), settings).result()[0]

    def chat(self, conversation: Messages, *, system: Optional[str] = None, max_tokens: Optional[int] = None,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
             stop: Sequence[str] = (), images: Sequence = ()) -> str:
        """The assistant's reply to a conversation (a string is one user turn). Greedy by default. images: one
        per "<image>" marker in the messages, in order (a vision model; anything `load_image` reads)."""
        return "".join(self.stream_chat(conversation, system=system, max_tokens=max_tokens, temperature=temperature,
                                        top_p=top_p, top_k=top_k, seed=seed, stop=stop, images=images))

    def stream_chat(self, conversation: Messages, *, system: Optional[str] = None, max_tokens: Optional[int] = None,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                    stop: Sequence[str] = (), images: Sequence = ()) -> Iterator[str]:
        """The reply as it is generated, piece by piece (each piece whole characters)."""
        settings = Settings(max_tokens, temperature, top_p, top_k, seed, tuple(stop))
        request = self.submit(self.chat_ids(conversation, system), settings, images=self.load_images(images))
        try:
            for event in request.events():
                if isinstance(event, TextEvent) and event.text:
                    yield event.text
                elif isinstance(event, Finish) and event.reason == "error":
                    raise RuntimeError(f"generation failed: {event.error}")
        finally:
            request.cancel()  # a consumer that stops reading frees the slot

    def close(self) -> None:
        self.engine.close()


def load_policy(path: str, *, slots: int = 8, max_context: Optional[int] = None,
                devices: Optional[Sequence] = None, name: Optional[str] = None) -> Policy:
    """Load a policy from an `interop import` folder, a run's workdir or a params export (module docstring).

    slots: requests decoded together (rounded up to the mesh's batch shards); max_context: cache slots per
    request, prompt + reply (default: the model's max_seq_len)."""
    source = resolve_policy(path)
    return Policy(source, slots=slots, max_context=max_context, devices=devices,
                  name=name or os.path.basename(source.root.rstrip("/")) or "model")
