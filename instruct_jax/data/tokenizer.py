"""Tokenizers behind one interface: sentencepiece (trained here or loaded) and Hugging Face `tokenizers`.

    tok = load_tokenizer("path/to/tokenizer.json")      # or a .model, or a folder holding either
    tok.encode("Hello")          -> [15496]              # never adds BOS/EOS, never emits control tokens
    tok.decode([1, 15496, 2])    -> "Hello"              # skips every special token
    tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id, tok.vocab_size

Special tokens are explicit attributes. `eot_id` ends a chat turn (the token an assistant must
learn to emit to stop); it is EOS when the vocabulary has no dedicated one. `pad_id` is always
distinct from EOS: a tokenizer whose pad is missing or equals EOS gets a reserved id one past its
vocabulary (`vocab_size` grows by one), because a loss or a stop rule that can't tell padding from
a real EOS silently trains the model to never stop.

`encode` treats text literally: a user message containing "<|im_end|>" is encoded as characters,
not as the control token (chat templates insert control tokens by id, see chat.py).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Optional, Sequence

from instruct_jax import files
from instruct_jax.data.sources import read_bytes
from instruct_jax.errors import ConfigError

# Token strings tried, in order, when neither the caller nor tokenizer_config.json names a special.
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")
EOT_CANDIDATES = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end_of_turn|>", "<|eot|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")

# Control symbols every tokenizer trained here has: role markers and end-of-turn for the built-in
# chat template (chat.py), so a tiny model spends one token per marker.
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class Tokenizer:
    """The interface every phase uses. Subclasses implement `_encode` and `_decode` over their base vocab."""

    bos_id: Optional[int]  # None when the vocabulary has no BOS (e.g. Qwen2)
    eos_id: int
    eot_id: int  # end of turn; == eos_id when there is no dedicated token
    pad_id: int  # never == eos_id
    base_vocab_size: int  # ids the backend knows
    special_tokens: dict  # token string -> id, for templates that spell control tokens as text
    chat_template: Optional[str]  # the model's own Jinja chat template, if it ships one

    def _setup_specials(self, base_vocab_size: int, lookup: Callable[[str], Optional[int]],
                        native: dict, config: dict, overrides: dict, special_tokens: dict,
                        chat_template: Optional[str]) -> None:
        """Resolve each special: explicit override > tokenizer_config.json > backend's own > known names."""
        def pick(name: str, candidates: Sequence[str]) -> Optional[int]:
            for text in (overrides.get(name), _token_text(config.get(f"{name}_token"))):
                if text is not None:
                    if lookup(text) is None:
                        raise ValueError(f"tokenizer has no {name} token {text!r}")
                    return lookup(text)
            if native.get(name) is not None:
                return native[name]
            return next((lookup(c) for c in candidates if lookup(c) is not None), None)

        self.base_vocab_size = base_vocab_size
        self.bos_id = pick("bos", BOS_CANDIDATES)
        eos = pick("eos", EOS_CANDIDATES)
        if eos is None:
            raise ValueError("tokenizer has no EOS token; pass eos=... to load_tokenizer")
        self.eos_id = eos
        eot = pick("eot", EOT_CANDIDATES)
        self.eot_id = eos if eot is None else eot
        pad = pick("pad", PAD_CANDIDATES)
        self.pad_is_reserved = pad is None or pad == eos
        self.pad_id = base_vocab_size if self.pad_is_reserved else pad
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        # Ids decode() leaves out: every special, the reserved pad, and ids past the backend's vocab
        # (a model whose embedding table is rounded up may sample them).
        self._skip = set(self.special_tokens.values()) | {self.eos_id, self.eot_id, self.pad_id}
        if self.bos_id is not None:
            self._skip.add(self.bos_id)

    @property
    def vocab_size(self) -> int:
        """Rows the embedding table needs: the backend's vocabulary plus a reserved pad if there is one."""
        return self.base_vocab_size + (1 if self.pad_is_reserved else 0)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no specials added."""
        return self._encode(text)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping special tokens and padding."""
        keep = [int(i) for i in ids if int(i) not in self._skip and 0 <= int(i) < self.base_vocab_size]
        return self._decode(keep)

    def token_text(self, token_id: int) -> Optional[str]:
        """The string a template writes for a special token id (e.g. eot_id -> "<|im_end|>"), or None."""
        for text, i in self.special_tokens.items():
            if i == token_id:
                return text
        return None

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"eot={self.eot_id}, pad={self.pad_id}{' reserved' if self.pad_is_reserved else ''})")


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes a special either as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------- sentencepiece
class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str, config: Optional[dict] = None, **overrides):
        import sentencepiece as spm

        self.path = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        size = self.sp.get_piece_size()

        def lookup(piece: str) -> Optional[int]:
            i = self.sp.piece_to_id(piece)  # unknown pieces map to unk: check the round trip
            return i if self.sp.id_to_piece(i) == piece else None

        # Control symbols can only be produced by id, so templates need their spelling. User-defined
        # symbols in angle brackets (Gemma's <end_of_turn>) count too; the Python API can't name
        # them, but they are the only non-byte pieces spelled <...> with score 0.
        def is_special(i: int) -> bool:
            piece = self.sp.id_to_piece(i)
            return self.sp.is_control(i) or (piece.startswith("<") and piece.endswith(">") and len(piece) > 2
                                              and not self.sp.is_byte(i) and not self.sp.is_unknown(i)
                                              and self.sp.get_score(i) == 0.0)

        specials = {self.sp.id_to_piece(i): i for i in range(size) if is_special(i)}
        native = {k: (v if v >= 0 else None) for k, v in
                  (("bos", self.sp.bos_id()), ("eos", self.sp.eos_id()), ("pad", self.sp.pad_id()))}
        config = config or {}
        self._setup_specials(size, lookup, native, config, overrides, specials, _chat_template_of(config))

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def train_sentencepiece(text_files: Sequence[str], model_prefix: str, vocab_size: int, *,
                        model_type: str = "bpe", max_sentences: int = 2_000_000, seed: int = 0,
                        extra_symbols: Sequence[str] = ()) -> SentencePieceTokenizer:
    """Train a lossless sentencepiece model on text files (.gz/.bz2/.xz ok); writes `{model_prefix}.model`.

    Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>, then CHAT_MARKERS + extra_symbols as control
    symbols (so <|end|> is the end-of-turn token), then "\\n" as a piece of its own.
    Round trips are exact (decode(encode(s)) == s for any string): no normalization, no dummy
    prefix, whitespace kept, and byte fallback for characters the training text never showed.
    """
    import sentencepiece as spm

    def lines():  # sentencepiece reads one sentence per line; newlines come back via the "\n" piece
        for path in text_files:
            yield from read_bytes(path).decode("utf-8", errors="replace").splitlines()

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        control_symbols=list(CHAT_MARKERS) + list(extra_symbols), user_defined_symbols=["\n"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, allow_whitespace_only_pieces=True, split_digits=True, character_coverage=1.0,
        input_sentence_size=max_sentences, shuffle_input_sentence=True, num_threads=2, minloglevel=2)
    return SentencePieceTokenizer(model_prefix + ".model")


# ----------------------------------------------------------------------------- Hugging Face tokenizers
class HFTokenizer(Tokenizer):
    def __init__(self, tokenizer_json: str, config: Optional[dict] = None, **overrides):
        import tokenizers

        self.path = tokenizer_json
        self.tok = tokenizers.Tokenizer.from_file(tokenizer_json)
        # Literal special strings in user text stay text; templates insert control tokens by id.
        self.tok.encode_special_tokens = True
        added = self.tok.get_added_tokens_decoder()  # id -> AddedToken
        # Only special=True added tokens are control tokens; other added tokens are ordinary words.
        specials = {t.content: i for i, t in added.items() if t.special}
        size = max([self.tok.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in added])
        config = config or {}
        self._setup_specials(size, self.tok.token_to_id, {}, config, overrides, specials, _chat_template_of(config))

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _chat_template_of(config: dict) -> Optional[str]:
    """tokenizer_config.json holds the template as a string or as [{"name": ..., "template": ...}]."""
    t = config.get("chat_template")
    if isinstance(t, list):
        by_name = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = by_name.get("default")
    return t if isinstance(t, str) else None


# ----------------------------------------------------------------------------- loading
def load_tokenizer(path_or_spec: str, **overrides) -> Tokenizer:
    """Load a tokenizer from a `.model`, a `tokenizer.json`, or a folder holding either.

    A `tokenizer_config.json` beside it supplies bos/eos/pad names and the chat template (a
    `chat_template.jinja` file there overrides it). Keyword overrides name specials by their token
    string, e.g. `load_tokenizer(path, eot="<|im_end|>", pad="<|endoftext|>")`.
    """
    path = os.path.expanduser(_local_tokenizer(path_or_spec))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        if "tokenizer.json" in names:
            path = os.path.join(path, "tokenizer.json")
        elif "tokenizer.model" in names or any(n.endswith(".model") for n in names):
            path = os.path.join(path, "tokenizer.model" if "tokenizer.model" in names
                                else next(n for n in names if n.endswith(".model")))
        else:
            raise FileNotFoundError(f"no tokenizer.json or *.model in {path_or_spec!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer at {path_or_spec!r}")

    config = {}
    config_file = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            config["chat_template"] = f.read()

    if path.endswith(".json"):
        return HFTokenizer(path, config, **overrides)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, config, **overrides)
    raise ValueError(f"unknown tokenizer file {path!r}: expected a .model (sentencepiece) or tokenizer.json")


def _local_tokenizer(spec: str) -> str:
    """A local path for a tokenizer in a bucket: its folder, or its file with the two config files beside it
    (sentencepiece and tokenizers open local files only); a local spec as it is."""
    if not files.is_remote(spec):
        return spec
    if files.isdir(spec):
        return files.local_copy(spec)
    local = files.local_copy(spec)
    folder = spec.rstrip("/").rsplit("/", 1)[0]
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        beside = os.path.join(os.path.dirname(local), name)
        if not os.path.exists(beside) and files.isfile(files.join(folder, name)):
            files.copy_tree(files.join(folder, name), beside)
    return local


def check_tokenizer_fits(tokenizer, model_cfg) -> None:
    """Every token id must have an embedding row: ConfigError naming model.vocab_size otherwise."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError("model.vocab_size", f"must be >= the tokenizer's vocabulary {tokenizer.vocab_size}, "
                          f"got {model_cfg.vocab_size}")
