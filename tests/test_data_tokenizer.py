"""Tokenizers: sentencepiece trained on tinyshakespeare, tokenizer.json built here, one interface."""

import json

import pytest

from instruct_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

SAMPLES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "  two  spaces,\ttabs\tand trailing space ",
    "Unicode the corpus never saw: héllo wörld, 日本語, emoji 🙂",
    "Literal markers stay text: <|user|> <|end|> </s>",
    "",
]


@pytest.fixture(scope="module")
def sp_tok(data_dir, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return train_sentencepiece([str(data_dir / "tinyshakespeare.txt")], str(prefix), vocab_size=512)


def _byte_level_tokenizer_json(path, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
    """A small GPT-2-style byte-level BPE tokenizer.json, trained here (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50 + SAMPLES, trainer)
    tok.save(str(path))
    return path


def test_sentencepiece_trains_on_tinyshakespeare_and_round_trips(sp_tok, data_dir):
    text = (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
    ids = sp_tok.encode(text)
    assert sp_tok.decode(ids) == text
    assert len(ids) < 0.65 * len(text)  # it learned merges, not just characters (256 of 512 ids are bytes)
    for s in SAMPLES:
        assert sp_tok.decode(sp_tok.encode(s)) == s


def test_sentencepiece_specials_are_explicit_and_never_from_text(sp_tok):
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, 3)
    assert sp_tok.eot_id == sp_tok.special_tokens["<|end|>"]
    assert sp_tok.pad_id != sp_tok.eos_id and sp_tok.vocab_size == 512 and not sp_tok.pad_is_reserved
    specials = {sp_tok.bos_id, sp_tok.eos_id, sp_tok.eot_id, sp_tok.pad_id, *sp_tok.special_tokens.values()}
    assert not specials & set(sp_tok.encode("<s> </s> <pad> <|user|> <|end|>"))
    hello = sp_tok.encode("Hello")
    assert sp_tok.decode([sp_tok.bos_id, *hello, sp_tok.eot_id, sp_tok.eos_id, sp_tok.pad_id]) == "Hello"


def test_sentencepiece_loads_from_model_file_and_folder(sp_tok):
    for path in (sp_tok.path, str(sp_tok.path).rsplit("/", 1)[0]):
        tok = load_tokenizer(path)
        assert isinstance(tok, SentencePieceTokenizer)
        assert tok.encode(SAMPLES[0]) == sp_tok.encode(SAMPLES[0])


def test_tokenizer_json_round_trip(tmp_path):
    tok = load_tokenizer(str(_byte_level_tokenizer_json(tmp_path / "tokenizer.json")))
    assert isinstance(tok, HFTokenizer)
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    # special strings in text are encoded literally; their ids only come from templates
    assert tok.special_tokens["<|im_end|>"] not in tok.encode("a <|im_end|> b")
    assert tok.eos_id == tok.special_tokens["<|endoftext|>"]
    assert tok.eot_id == tok.special_tokens["<|im_end|>"]
    assert tok.bos_id is None


def test_pad_equal_to_eos_gets_a_reserved_id(tmp_path):
    _byte_level_tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": {"content": "<|im_end|>"},
         "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}))
    tok = load_tokenizer(str(tmp_path))  # the folder, as a model repo is laid out
    base = tok.base_vocab_size
    assert tok.eos_id == tok.special_tokens["<|im_end|>"]
    assert tok.pad_is_reserved and tok.pad_id == base and tok.vocab_size == base + 1
    assert tok.pad_id != tok.eos_id
    assert tok.decode(tok.encode("fox") + [tok.pad_id, tok.pad_id]) == "fox"
    assert tok.chat_template.startswith("{% for m")


def test_overrides_and_missing_tokens(tmp_path):
    path = str(_byte_level_tokenizer_json(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(path, pad="<|im_start|>")
    assert tok.pad_id == tok.special_tokens["<|im_start|>"] and not tok.pad_is_reserved
    with pytest.raises(ValueError, match="no eot token"):
        load_tokenizer(path, eot="<|nope|>")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))
