"""The server (serve/app.py) through the real `openai` client and raw HTTP: every endpoint, bad input of each
kind, the safety checks, disconnects, weight reloads, compile counts and the ranking round trip into the
reward model's data loader."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from serve_fixtures import running_server, tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
HELLO = [{"role": "user", "content": "Hello there, good friend"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def other_weights(model_dir, tmp_path_factory):
    """The same model with other weights (a newer checkpoint), sharing the tokenizer."""
    import shutil

    root = tmp_path_factory.mktemp("tiny_v2")
    shutil.copytree(f"{model_dir}/tokenizer", root / "tokenizer")
    return tiny_model_dir(root, seed=1)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    labels = tmp_path_factory.mktemp("labels") / "labels.jsonl"
    with running_server({"tiny": model_dir}, labels=labels, slots=4, max_context=128) as url:
        yield url, labels


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def greedy(client, messages=HELLO, **kw):
    r = client.chat.completions.create(model="tiny", messages=messages, **{"max_tokens": 16, "temperature": 0, **kw})
    return r.choices[0].message.content, r


def metrics(server):
    return httpx.get(server[0] + "/metrics").json()["models"]["tiny"]


# ----------------------------------------------------------------------------- chat
def test_models(client):
    (model,) = client.models.list().data
    assert model.id == "tiny" and model.version >= 1


def test_chat_stream_equals_non_stream(client):
    text, r = greedy(client)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1  # streamed piece by piece
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_n_and_seed(client):
    def ask(seed):
        r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=1.0, max_tokens=12, n=3,
                                           seed=seed)
        return [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]

    first = ask(5)
    assert len(first) == 3 and len(set(first)) > 1  # n different samples
    assert ask(5) == first  # a seeded request is reproducible
    assert ask(6) != first


def test_stop_string_across_tokens(client, server):
    text, _ = greedy(client, max_tokens=20)
    # A stop string that starts inside one token and ends inside a later one.
    tokens = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=0)
    pieces = tokens.choices[0].logprobs.tokens
    split = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 1 and len(pieces[i + 1]) >= 1
                 and len(pieces[i - 1]) >= 1)
    start = sum(len(p) for p in pieces[:split]) - 1
    stop = text[start:start + len(pieces[split]) + 2]
    cut, r = greedy(client, max_tokens=20, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and cut == text[:text.find(stop)]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 for c in content)
    for c in content:  # greedy: the chosen token is the most likely one
        assert c.logprob == pytest.approx(max(t.logprob for t in c.top_logprobs), abs=1e-6)


# ----------------------------------------------------------------------------- completions
def independent_logprobs(model_dir, ids):
    """log p(token i | tokens < i) from a plain full forward pass of the exported params (no cache, no engine)."""
    from instruct_jax.checkpoint import load_params
    from instruct_jax.inference.policy import resolve_policy
    from instruct_jax.model.transformer import ModelInput, Transformer, init_params_boxed
    from instruct_jax.parallel.sharding import unbox

    source = resolve_policy(model_dir)
    model = Transformer(source.model)
    abstract = jax.eval_shape(lambda: unbox(init_params_boxed(model, jax.random.PRNGKey(0))))
    params = load_params(source.params_dir, abstract)
    logits = model.apply({"params": params}, ModelInput.unpacked(jnp.asarray([ids], jnp.int32))).logits[0]
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    return logp[np.arange(len(ids) - 1), ids[1:]]


def test_completions_echo_logprobs_equal_a_forward_pass(client, server, model_dir):
    prompt = "To be, or not to be: that is the question"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = httpx.post(server[0] + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert len(lp.token_logprobs) == len(ids) and "".join(lp.tokens) == prompt
    np.testing.assert_allclose(lp.token_logprobs[1:], independent_logprobs(model_dir, ids), atol=1e-4)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    # echo + one generated token (what lm-eval's loglikelihood sends): prompt entries + 1
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(r.choices[0].logprobs.token_logprobs) == len(ids) + 1
    assert r.choices[0].text.startswith(prompt)


def test_completions_batch_of_prompts_and_token_prompts(client, server):
    r = client.completions.create(model="tiny", prompt=["Once upon", "a time"], max_tokens=5, temperature=0, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1]  # greedy twice
    ids = httpx.post(server[0] + "/tokenize", json={"prompt": "Once upon"}).json()["tokens"]
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert r2.choices[0].text == by_index[0]
    stream = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == by_index[0]


# ----------------------------------------------------------------------------- bad input
BAD = [
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 422, "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, 422, "content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "temperature": 5}, 422, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "top_p": 0}, 422, "top_p"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "max_tokens": -1}, 422, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "max_tokens": 100000}, 400, "context"),
    ("/v1/chat/completions", {"model": "nope", "messages": HELLO}, 404, "nope"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "n": 100}, 400, "n must be"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "stop": ["ab"] * 17}, 400, "at most 16"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "stop": ["a" * 300]}, 400, "characters"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HELLO, "presence_penalty": 1}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HELLO + [{"role": "assistant", "content": "hi"}]}, 400,
     "last message"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]}, 400,
     "exceeds"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "echo"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "empty"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999], "max_tokens": 1}, 400, "token ids"),
    ("/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, 422, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 9}, 422, "logprobs"),
    ("/v1/rankings", {"id": "nope", "labeler": "x", "ranks": {"a0": 1}}, 404, "nope"),
    ("/v1/models/nope/reload", {}, 404, "nope"),
    ("/v1/models/tiny/reload", {"path": "/does/not/exist"}, 400, "path"),
    ("/detokenize", {"tokens": [-1]}, 400, "token ids"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_a_json_4xx_naming_the_problem(server, path, body, status, words):
    r = httpx.post(server[0] + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"] + str(r.json()["error"]["param"])


def test_malformed_and_oversized_bodies_and_the_server_keeps_serving(server, client):
    url = server[0] + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(url, content=iter([b"x" * (1 << 19)] * 4), headers={"content-type": "application/json"})
    assert r.status_code == 413  # chunked, no Content-Length
    assert metrics(server)["active"] == 0 and greedy(client)[0]


# ----------------------------------------------------------------------------- safety
def test_host_and_origin_checks(server):
    url = server[0] + "/v1/models"
    assert httpx.get(url, headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
    assert httpx.get(url, headers={"origin": "http://evil.example"}).status_code == 403
    assert httpx.get(url, headers={"origin": "null"}).status_code == 403
    assert httpx.get(url, headers={"origin": server[0]}).status_code == 200  # its own page


def test_api_key(model_dir):
    with running_server({"tiny": model_dir}, slots=1, max_context=64, api_key="s3cret") as url:
        assert httpx.get(url + "/v1/models", timeout=60).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/").status_code == 200  # the page loads; its requests carry the key
        c = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3).choices


def test_too_many_requests_is_429(model_dir):
    with running_server({"tiny": model_dir}, slots=1, max_context=64, max_concurrent=2) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "n": 3, "max_tokens": 2}, timeout=60)
        assert r.status_code == 429 and "too many" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "n": 2, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200


def test_a_client_that_disconnects_stops_its_generation(server):
    before = metrics(server)["cancelled"]
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 100, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # one token seen: hang up
    deadline = time.monotonic() + 20
    while metrics(server)["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    m = metrics(server)
    assert m["cancelled"] == before + 1 and m["active"] == 0


def test_compile_count_flat_after_warm_up(server, client):
    # Prompts of 1..49 words: each length step is smaller than a bucket, so every bucket up to the longest
    # prompt below (~100 tokens, of buckets 16, 48, 127) is seen, whatever the trained tokenizer makes of "ab ".
    for words in range(1, 50, 4):
        greedy(client, [{"role": "user", "content": "ab " * words}], max_tokens=3)
        client.completions.create(model="tiny", prompt="ab " * words, max_tokens=0, echo=True, logprobs=1)
    warm = metrics(server)["compiles"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: greedy(client, [{"role": "user", "content": "hi " * (1 + i % 25)}],
                                       max_tokens=1 + i % 9, temperature=0.5 * (i % 3), top_p=0.9), range(16)))
    client.completions.create(model="tiny", prompt="xy " * 7, max_tokens=0, echo=True, logprobs=1)
    assert metrics(server)["compiles"] == warm


def test_reload_changes_the_answers_without_a_restart(model_dir, other_weights):
    with running_server({"tiny": model_dir}, slots=2, max_context=64) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        before, _ = greedy(c, max_tokens=12)
        compiles = httpx.get(url + "/metrics").json()["models"]["tiny"]["compiles"]
        r = httpx.post(url + "/v1/models/tiny/reload", json={"path": other_weights}, timeout=60)
        assert r.status_code == 200 and r.json()["version"] == 2
        after, _ = greedy(c, max_tokens=12)
        assert after != before
        assert c.models.list().data[0].version == 2
        assert httpx.get(url + "/metrics").json()["models"]["tiny"]["compiles"] == compiles


# ----------------------------------------------------------------------------- ranking
def test_ranking_round_trip_into_the_reward_model_loader(server, model_dir):
    from instruct_jax.data.build import load_data
    from instruct_jax.data.chat import load_chat_template
    from instruct_jax.data.config import DataConfig
    from instruct_jax.data.tokenizer import load_tokenizer

    url, labels = server
    prompt = [{"role": "user", "content": "Tell me of the king"}]
    r = httpx.post(url + "/v1/rankings/sample", json={"messages": prompt, "model": "tiny", "k": 3, "max_tokens": 10},
                   timeout=60)
    assert r.status_code == 200, r.text
    sample = r.json()
    answers = sample["answers"]
    assert 2 <= len(answers) <= 3 and len({a["text"] for a in answers}) == len(answers)
    bad = httpx.post(url + "/v1/rankings", json={"id": sample["id"], "labeler": "ana",
                                                 "ranks": {a["id"]: 1 for a in answers}})
    assert bad.status_code == 400 and "tie" in bad.json()["error"]["message"]
    bad = httpx.post(url + "/v1/rankings", json={"id": sample["id"], "labeler": "ana", "ranks": {answers[0]["id"]: 1}})
    assert bad.status_code == 400 and "missing" in bad.json()["error"]["message"]
    ranks = {a["id"]: min(i + 1, 2) for i, a in enumerate(answers)}  # a tie at the bottom is allowed
    ok = httpx.post(url + "/v1/rankings", json={"id": sample["id"], "labeler": "ana", "ranks": ranks})
    assert ok.status_code == 200 and ok.json()["ok"]
    again = httpx.post(url + "/v1/rankings", json={"id": sample["id"], "labeler": "ana", "ranks": ranks})
    assert again.status_code == 404 and "already ranked" in again.json()["error"]["message"]  # one row only
    rows = [json.loads(line) for line in open(labels)]
    row = rows[ok.json()["row"] - 1]
    assert row["prompt"] == prompt and row["labeler"] == "ana" and row["models"] == [["tiny"]] * len(answers)
    assert dict(zip(row["responses"], row["ranks"])) == {a["text"]: ranks[a["id"]] for a in answers}
    assert row["sampling"]["temperature"] == 1.0 and row["time"]
    # `rm` reads the file as it is
    tokenizer = load_tokenizer(f"{model_dir}/tokenizer")
    data = load_data(DataConfig(format="ranking", source=str(labels), eval_fraction=0.0), tokenizer,
                     load_chat_template("builtin", tokenizer), seq_len=128, seed=0)
    assert len(data.train) == len(rows) and data.train[-1].k == len(answers)


def _append_rows(path, worker, count):
    from instruct_jax.serve.labels import LabelStore

    store = LabelStore(path)
    for i in range(count):
        store.append({"worker": worker, "i": i, "text": "x" * 5000})


def test_concurrent_appends_never_tear_a_row(tmp_path):
    path = str(tmp_path / "labels.jsonl")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_rows, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    rows = [json.loads(line) for line in open(path)]
    assert sorted((r["worker"], r["i"]) for r in rows) == [(w, i) for w in range(4) for i in range(25)]
