"""Chat templates: a conversation -> token ids plus an exact mask of the assistant's tokens.

Two templates share one interface:

    template = load_chat_template("builtin", tokenizer)   # or "model", or "path/to/template.jinja"
    ids, mask = template.render(messages)                 # mask[i] = 1 where ids[i] is the assistant's
    prompt_ids = template.render_prompt(messages)         # ends with the assistant header (generation prompt)

The mask covers each assistant answer *and* the end-of-turn token closing it, so SFT teaches the
model to stop. In a token batch the mask moves one place left (loss_mask[t] = mask[t + 1], since
position t predicts token t + 1); see packing.py.

When a conversation ends with an assistant turn, `render` stops right after that turn's
end-of-turn token (a template's trailing newline would be a target that teaches nothing), so a
reward model can read its score at the last token.

Images (model.vision): `template.with_images(token_id, count)` makes every `<image>` marker in a message's
text (data/images.py IMAGE_MARKER) expand to `count` copies of the image token, where the model places one
image's embeddings. Image tokens are never targets: their mask is 0 even inside an answer. Without it the
marker is ordinary text.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Sequence

from instruct_jax.data.images import IMAGE_MARKER
from instruct_jax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def _check_messages(messages: Sequence[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {list(ROLES)}, 'content': str}}, got {m!r}")


class ChatTemplate:
    """Interface: `render(messages) -> (ids, assistant_mask)` and `render_prompt(messages) -> ids`."""

    tokenizer: Tokenizer
    image_tokens: tuple[int, int] | None = None  # (image token id, tokens per image) once `with_images` is called

    def with_images(self, token_id: int, count: int) -> "ChatTemplate":
        """Expand each image marker to `count` copies of `token_id` from now on; returns self."""
        self.image_tokens = (int(token_id), int(count))
        return self

    def expand_images(self, text: str, encode) -> list[int]:
        """encode(text) with each image marker replaced by the image tokens (when `with_images` was called)."""
        if self.image_tokens is None or IMAGE_MARKER not in text:
            return encode(text)
        token_id, count = self.image_tokens
        ids = []
        for i, piece in enumerate(text.split(IMAGE_MARKER)):
            if i:
                ids += [token_id] * count
            if piece:
                ids += encode(piece)
        return ids

    def mask_images(self, ids: list[int], mask: list[int]) -> list[int]:
        """mask with 0 at every image token: no loss on image tokens."""
        if self.image_tokens is None:
            return mask
        return [0 if i == self.image_tokens[0] else m for i, m in zip(ids, mask)]

    def render(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        raise NotImplementedError


class BuiltinChatTemplate(ChatTemplate):
    """The template of models trained here: role markers and end-of-turn are single control tokens.

        [BOS] <|system|> system text <|end|> <|user|> question <|end|> <|assistant|> answer <|end|> ...

    Worked example, with a tokenizer where BOS = 1, <|user|> = 5, <|assistant|> = 6, <|end|> = 7,
    encode("Hi") = [40] and encode("Hello!") = [41, 42]:

        render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
        ids  = [1, 5, 40, 7, 6, 41, 42, 7]
        mask = [0, 0,  0, 0, 0,  1,  1, 1]      # "Hello!" and the <|end|> that closes it
        render_prompt([{"role": "user", "content": "Hi"}]) = [1, 5, 40, 7, 6]

    Content is encoded with `tokenizer.encode`, so a user typing "<|end|>" gets characters, not the
    control token. A tokenizer without the role markers (an imported one) gets them spelled as text.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.headers = {role: self._marker(f"<|{role}|>") for role in ROLES}

    def _marker(self, text: str) -> list[int]:
        token_id = self.tokenizer.special_tokens.get(text)
        return [token_id] if token_id is not None else self.tokenizer.encode(text)

    def _start(self) -> list[int]:
        return [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]

    def render(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        _check_messages(messages)
        ids = self._start()
        mask = [0] * len(ids)
        for m in messages:
            body = self.expand_images(m["content"], self.tokenizer.encode) + [self.tokenizer.eot_id]
            header = self.headers[m["role"]]
            ids += header + body
            mask += [0] * len(header) + [int(m["role"] == "assistant")] * len(body)
        return ids, self.mask_images(ids, mask)

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        return self.render(messages)[0] + self.headers["assistant"]


class JinjaChatTemplate(ChatTemplate):
    """A model's own Hugging Face-style Jinja template (variables `messages`, `add_generation_prompt`,
    `bos_token`, `eos_token`; `raise_exception`, `tojson`).

    Finding the assistant's characters: for assistant turn i, the template renders
    messages[:i] with the generation prompt (A) and messages[:i+1] (B). B must extend A; the answer
    is B[len(A):] up to and including the end-of-turn token's text. ChatML example:

        A = "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"
        B = A + "Hello!<|im_end|>\\n"
        answer span = "Hello!<|im_end|>"                 (the "\\n" after it is formatting)

    Tokenization is done piece by piece — text outside answers, each answer — with special token
    strings mapped to their ids, so the mask is exact by construction; it also matches inference,
    where the prompt is tokenized first and the answer is generated after it.
    """

    def __init__(self, tokenizer: Tokenizer, source: str):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols, _generation_tags()])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)  # Llama 3.x templates
        self.tokenizer = tokenizer
        self.template = env.from_string(source)
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)  # longest first: "<|im_end|>" before "<|im"
        self._special = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._eot_text = tokenizer.token_text(tokenizer.eot_id)
        self._bos_text = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
        self._eos_text = tokenizer.token_text(tokenizer.eos_id) or ""

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                    bos_token=self._bos_text or "", eos_token=self._eos_text)

    def encode_text(self, text: str) -> list[int]:
        """Ids of rendered template text: special token strings become their ids, image markers the image
        tokens (`with_images`), the rest is encoded."""
        return self.expand_images(text, self._encode_specials)

    def _encode_specials(self, text: str) -> list[int]:
        if self._special is None:
            return self.tokenizer.encode(text)
        ids, pos = [], 0
        for match in self._special.finditer(text):
            if match.start() > pos:
                ids += self.tokenizer.encode(text[pos:match.start()])
            ids.append(self.tokenizer.special_tokens[match.group()])
            pos = match.end()
        if pos < len(text):
            ids += self.tokenizer.encode(text[pos:])
        return ids

    def assistant_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character span of each assistant answer."""
        text = self.render_text(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render_text(messages[:i], add_generation_prompt=True)
            after = self.render_text(messages[:i + 1], add_generation_prompt=False)
            if not after.startswith(before) or not text.startswith(after):
                raise ValueError(f"chat template can't mark assistant turn {i}: rendering a conversation's first "
                                 "turns must give a prefix of rendering all of it")
            start, end = len(before), len(after)
            content = m["content"].strip()
            found = after.find(content, start, end) if content else -1
            search_from = found + len(content) if found >= 0 else start
            eot = after.find(self._eot_text, search_from, end) if self._eot_text else -1
            end = eot + len(self._eot_text) if eot >= 0 else start + len(after[start:end].rstrip())
            spans.append((start, end))
        return text, spans

    def render(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        _check_messages(messages)
        text, spans = self.assistant_spans(messages)
        if spans and messages[-1]["role"] == "assistant":
            text = text[:spans[-1][1]]  # stop at the final end-of-turn (see module docstring)
        ids, mask, pos = [], [], 0
        for start, end in spans:
            for piece, is_answer in ((text[pos:start], 0), (text[start:end], 1)):
                piece_ids = self.encode_text(piece)
                ids += piece_ids
                mask += [is_answer] * len(piece_ids)
            pos = end
        tail = self.encode_text(text[pos:])
        return ids + tail, self.mask_images(ids + tail, mask + [0] * len(tail))

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        _check_messages(messages)
        return self.encode_text(self.render_text(messages, add_generation_prompt=True))


def _generation_tags():
    """A Jinja extension that renders `{% generation %}...{% endgeneration %}` blocks as plain text.

    Some templates mark assistant text with these tags for Hugging Face's mask; the prefix
    rendering above finds the same spans without them, so the tags only need to parse.
    """
    from jinja2.ext import Extension

    class GenerationTags(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)  # the "generation" name
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationTags


def load_chat_template(spec: str, tokenizer: Tokenizer) -> ChatTemplate:
    """"builtin", "model" (the tokenizer's own template), or a path to a Jinja file."""
    if spec == "builtin":
        return BuiltinChatTemplate(tokenizer)
    if spec == "model":
        if not tokenizer.chat_template:
            raise ValueError("data.chat_template='model' but the tokenizer ships no chat template")
        return JinjaChatTemplate(tokenizer, tokenizer.chat_template)
    with open(spec, encoding="utf-8") as f:
        return JinjaChatTemplate(tokenizer, f.read())
