"""Images through the chat server (serve/app.py `chat_images`, the engine's image slots): OpenAI `image_url`
content parts with data URLs, for a tiny random model with a vision tower.

The exactness check compares the served greedy tokens with the independent batch sampler
(`make_sampler(...).sample`) on the same prompt tokens and pixels: the engine's one-row prefill with the image
slots must equal the reference prefill + decode loop."""

from __future__ import annotations

import base64
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve_fixtures import tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

MAX_NEW = 10


def png_url(seed: int, size: int = 12, fmt: str = "PNG", flat: bool = False) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    if flat:  # one colour: a huge image in a small body
        pixels[:] = pixels[0, 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(text: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(a text-only tiny model, the same trunk with a vision tower whose image token is past the tokenizer's
    vocabulary)."""
    from instruct_jax.data.tokenizer import load_tokenizer
    from instruct_jax.model.config import VisionConfig

    root = tmp_path_factory.mktemp("tiny_text")
    text = tiny_model_dir(root)
    vocab = load_tokenizer(f"{text}/tokenizer").vocab_size
    vroot = tmp_path_factory.mktemp("tiny_vision")
    import shutil

    shutil.copytree(f"{text}/tokenizer", vroot / "tokenizer")
    vision = VisionConfig(image_size=8, patch_size=4, d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
                          max_images=1, image_token_id=vocab)
    return text, tiny_model_dir(vroot, vocab_size=vocab + 8, vision=vision)


@pytest.fixture(scope="module")
def served(dirs):
    from instruct_jax.inference.policy import load_policy
    from instruct_jax.serve.app import ServeOptions, create_app

    text_dir, vision_dir = dirs
    policies = {"vis": load_policy(vision_dir, slots=2, max_context=64, name="vis"),
                "txt": load_policy(text_dir, slots=2, max_context=64, name="txt")}
    client = TestClient(create_app(policies, ServeOptions()), base_url="http://127.0.0.1")
    yield client, policies
    for p in policies.values():
        p.close()


def chat(client, messages, model="vis", **kw):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, "temperature": 0,
                                                     "max_tokens": MAX_NEW, **kw})


def reference(policy, ids, pixels):
    """Greedy tokens of the independent sampler (prefill + while_loop) on prompt ids and images [n, H, W, C]
    (None: text only), from freshly initialised weights (the fixture's seed 0), not the served ones."""
    import flax.linen as nn

    from instruct_jax.inference.sampling import SamplingConfig, make_sampler
    from instruct_jax.model.transformer import ModelInput, Transformer, init_params_boxed

    model = Transformer(policy.cfg)
    params = nn.unbox(init_params_boxed(model, jax.random.PRNGKey(0)))
    tok = policy.tokenizer
    cfg = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0, stop_tokens=tuple(sorted({tok.eos_id, tok.eot_id})),
                         pad_id=tok.pad_id)
    prompt = ModelInput.left_padded(jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)]))
    if pixels is not None:
        slots, _ = policy.layout.slots(pixels)
        prompt = ModelInput(prompt.tokens, prompt.positions, prompt.segment_ids, jnp.asarray(slots[None]))
    out = make_sampler(model, cfg).sample(params, prompt, jax.random.PRNGKey(0))
    return [int(t) for t in np.asarray(out.tokens[0, :int(out.lengths[0])])]


def served_tokens(policy, ids, pixels):
    from instruct_jax.inference.engine import Settings

    _, tokens, finish = policy.submit(ids, Settings(max_tokens=MAX_NEW, temperature=0.0), images=pixels).result(60)
    return [t.token for t in tokens] + ([finish.stop_token.token] if finish.stop_token else []), tokens


def test_image_request_equals_the_reference_sampler(served):
    from instruct_jax.data.images import IMAGE_MARKER, load_image

    client, policies = served
    policy = policies["vis"]
    assert policy.template.image_tokens == (policy.cfg.vision.image_token_id, policy.cfg.vision.tokens_per_image)
    url = png_url(1)
    r = chat(client, image_message("What is in the picture? ", url), logprobs=True)
    assert r.status_code == 200, r.text
    ids = policy.chat_ids([{"role": "user", "content": "What is in the picture? " + IMAGE_MARKER}])
    assert ids.count(policy.cfg.vision.image_token_id) == policy.cfg.vision.tokens_per_image
    pixels = load_image(url, 8, 3)[None]
    want = reference(policy, ids, pixels)
    got, _ = served_tokens(policy, ids, pixels)
    assert got == want
    tok = policy.tokenizer
    assert r.json()["choices"][0]["message"]["content"] == tok.decode([t for t in want if t not in
                                                                       (tok.eos_id, tok.eot_id)])
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    # The image matters: without it (zero slots, no image tokens) the same text decodes differently or not.
    assert reference(policy, ids, np.zeros_like(pixels)) != want or len(want) < 2


def test_two_images_give_different_first_token_logprobs(served):
    client, _ = served
    firsts = []
    for seed in (2, 3):
        r = chat(client, image_message("Look: ", png_url(seed)), logprobs=True, top_logprobs=5, max_tokens=1)
        assert r.status_code == 200, r.text
        firsts.append([t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]])
    assert not np.allclose(firsts[0], firsts[1])


def test_text_request_to_the_vision_model_equals_the_text_reference_and_shapes_stay_fixed(served):
    client, policies = served
    policy = policies["vis"]
    messages = [{"role": "user", "content": "Hello there, good friend"}]
    assert chat(client, image_message("Warm up ", png_url(4))).status_code == 200
    assert chat(client, messages).status_code == 200
    compiles = policy.engine.compiles()
    r = chat(client, messages)
    assert r.status_code == 200, r.text
    ids = policy.chat_ids(messages)
    got, _ = served_tokens(policy, ids, None)
    assert got == reference(policy, ids, None)
    assert chat(client, image_message("Another ", png_url(5))).status_code == 200
    assert policy.engine.compiles() == compiles  # zeros for a text request: one prefill shape either way


@pytest.mark.parametrize("messages, model, needle", [
    (image_message("x", "https://example.com/cat.png"), "vis", "only data URLs"),
    (image_message("x", "data:image/png;base64,@@@notbase64"), "vis", "not valid base64"),
    (image_message("x", "data:image/png;base64," + base64.b64encode(b"not an image").decode()), "vis",
     "cannot decode the image"),
    (image_message("x", "data:text/plain;base64,aGVsbG8="), "vis", "base64 image data URL"),
    (image_message("x", png_url(6)) + [{"role": "assistant", "content": "ok"}]
     + image_message("y", png_url(7)), "vis", "max_images=1"),
    ([{"role": "user", "content": "what is <image> here"}], "vis", "image marker"),
    ([{"role": "user", "content": [{"type": "text", "text": "a <image> b"}]}], "vis", "image marker"),
    (image_message("x", png_url(8)), "txt", "no vision tower"),
])
def test_bad_image_input_is_a_4xx_naming_the_problem_and_the_server_goes_on(served, messages, model, needle):
    client, _ = served
    r = chat(client, messages, model=model)
    assert 400 <= r.status_code < 500, r.text
    assert needle in r.json()["error"]["message"], r.json()
    good = chat(client, image_message("fine ", png_url(9)), max_tokens=2)
    assert good.status_code == 200, good.text


def test_oversized_image_and_unknown_part_type(served):
    client, _ = served
    big = png_url(10, size=4200, flat=True)  # 4200 x 4200: over the pixel bound, a small body all the same
    r = chat(client, image_message("x", big))
    assert r.status_code == 400 and "pixels" in r.json()["error"]["message"], r.text
    r = chat(client, [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    assert r.status_code == 422, r.text


def test_text_only_model_keeps_working_and_takes_the_marker_as_text(served):
    client, _ = served
    r = chat(client, [{"role": "user", "content": "a literal <image> is just text here"}], model="txt")
    assert r.status_code == 200, r.text


def test_the_image_body_limit_applies_to_chat_only(served):
    client, _ = served
    pad = "x" * (2 << 20)  # over the 1 MiB default, under the image route's 16 MiB
    r = client.post("/v1/chat/completions", content=json.dumps(
        {"model": "vis", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "user": pad}),
        headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:200]
    r = client.post("/v1/completions", content=json.dumps({"model": "vis", "prompt": "hi", "user": pad}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_policy_chat_with_an_image(served):
    _, policies = served
    policy = policies["vis"]
    reply = policy.chat("Say something <image>", images=[png_url(1)], max_tokens=4)
    assert isinstance(reply, str)
    with pytest.raises(ValueError, match="image tokens"):
        policy.chat("no marker here", images=[png_url(1)], max_tokens=4)
