"""Chat templates: the loss mask covers exactly the assistant tokens (built-in and Jinja templates)."""

import pytest

from instruct_jax.data.chat import BuiltinChatTemplate, JinjaChatTemplate, load_chat_template
from instruct_jax.data.tokenizer import load_tokenizer, train_sentencepiece

from test_data_tokenizer import _byte_level_tokenizer_json

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Red, or perhaps green."},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]

# A ChatML template in the style models ship (Qwen2 / SmolLM2), including a default system turn.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def sp_tok(data_dir, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return train_sentencepiece([str(data_dir / "tinyshakespeare.txt")], str(prefix), vocab_size=512)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return load_tokenizer(str(_byte_level_tokenizer_json(tmp_path_factory.mktemp("hf") / "tokenizer.json")))


def _mask_runs(ids, mask):
    """Contiguous runs of masked ids."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_builtin_mask_is_exactly_the_assistant_tokens(sp_tok):
    template = BuiltinChatTemplate(sp_tok)
    ids, mask = template.render(CONVERSATION)
    s = sp_tok.special_tokens
    enc, end = sp_tok.encode, sp_tok.eot_id
    expected_ids = ([sp_tok.bos_id] + [s["<|system|>"]] + enc("You are terse.") + [end]
                    + [s["<|user|>"]] + enc("Name a colour.") + [end]
                    + [s["<|assistant|>"]] + enc("Blue.") + [end]
                    + [s["<|user|>"]] + enc("Another?") + [end]
                    + [s["<|assistant|>"]] + enc("Red, or perhaps green.") + [end])
    expected_mask = [0] * (len(expected_ids) - len(enc(ANSWERS[1])) - 1) + [1] * (len(enc(ANSWERS[1])) + 1)
    first = expected_ids.index(s["<|assistant|>"]) + 1
    expected_mask[first:first + len(enc(ANSWERS[0])) + 1] = [1] * (len(enc(ANSWERS[0])) + 1)
    assert ids == expected_ids
    assert mask == expected_mask
    assert [sp_tok.decode(run) for run in _mask_runs(ids, mask)] == ANSWERS
    assert all(run[-1] == sp_tok.eot_id for run in _mask_runs(ids, mask))  # the model learns to stop


def test_builtin_prompt_ends_with_assistant_header_and_prefixes_the_render(sp_tok):
    template = BuiltinChatTemplate(sp_tok)
    prompt = template.render_prompt(CONVERSATION[:-1])
    assert prompt[-1] == sp_tok.special_tokens["<|assistant|>"]
    ids, _ = template.render(CONVERSATION)
    assert ids == prompt + sp_tok.encode(ANSWERS[-1]) + [sp_tok.eot_id]


def test_jinja_mask_is_exactly_the_assistant_tokens(hf_tok):
    template = JinjaChatTemplate(hf_tok, CHATML)
    ids, mask = template.render(CONVERSATION)
    runs = _mask_runs(ids, mask)
    im_end = hf_tok.special_tokens["<|im_end|>"]
    assert runs == [hf_tok.encode(a) + [im_end] for a in ANSWERS]
    # the unmasked rest is the template's text, tokenized with its control tokens by id
    text = template.render_text(CONVERSATION, add_generation_prompt=False)
    assert text.endswith("<|im_end|>\n") and ids[-1] == im_end  # the trailing newline is not rendered
    assert ids == template.encode_text(text[:-1])
    assert sum(mask) == sum(len(hf_tok.encode(a)) + 1 for a in ANSWERS)


def test_jinja_default_system_prompt_and_generation_prompt(hf_tok):
    template = JinjaChatTemplate(hf_tok, CHATML)
    conversation = CONVERSATION[1:3]  # no system turn: the template adds its own
    ids, mask = template.render(conversation)
    assert hf_tok.decode([i for i, m in zip(ids, mask) if not m]).startswith("system\nYou are helpful.")
    assert _mask_runs(ids, mask) == [hf_tok.encode("Blue.") + [hf_tok.eot_id]]
    prompt = template.render_prompt(conversation[:1])
    assert hf_tok.decode(prompt).endswith("assistant\n")
    assert ids == prompt + hf_tok.encode("Blue.") + [hf_tok.eot_id]


def test_jinja_file_with_sentencepiece_control_tokens(sp_tok, tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    jinja_ids, jinja_mask = load_chat_template(str(path), sp_tok).render(CONVERSATION)
    builtin_ids, builtin_mask = load_chat_template("builtin", sp_tok).render(CONVERSATION)
    assert (jinja_ids, jinja_mask) == (builtin_ids, builtin_mask)  # this file spells the built-in format


def test_model_template_and_bad_templates(hf_tok, sp_tok):
    with pytest.raises(ValueError, match="ships no chat template"):
        load_chat_template("model", sp_tok)
    hf_tok.chat_template = CHATML
    assert isinstance(load_chat_template("model", hf_tok), JinjaChatTemplate)
    unstable = "{% for m in messages %}{{ m.content }}{% endfor %}{% if not add_generation_prompt %}!{% endif %}"
    with pytest.raises(ValueError, match="prefix"):
        JinjaChatTemplate(hf_tok, unstable).render(CONVERSATION)
    with pytest.raises(ValueError, match="role"):
        BuiltinChatTemplate(hf_tok).render([{"role": "robot", "content": "hi"}])


def test_generation_tags_parse_and_do_not_change_the_mask(hf_tok):
    tagged = CHATML.replace("{{ message['content'] }}<|im_end|>\n",
                            "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
                            "<|im_end|>{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>{% endif %}"
                            "{{ '\\n' }}")
    plain = JinjaChatTemplate(hf_tok, CHATML).render(CONVERSATION)
    assert JinjaChatTemplate(hf_tok, tagged).render(CONVERSATION) == plain
