"""Continuous batching (inference/engine.py) against the batch sampler, requests served alone, and naive text rules.

The reference for every token is the codebase's batch-synchronous sampler (`sampling.sample`, itself tested
against full forward passes in test_sampling.py): a request decoded among others, arriving while they decode,
must get the tokens that sampler gives it alone.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.inference.engine import Engine, Settings, TextStream, prompt_buckets, wait_idle
from instruct_jax.inference.sampling import SamplingConfig, make_sampler, sample_rows, sample_token
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import ModelInput, Transformer, init_params_boxed
from instruct_jax.parallel.sharding import unbox

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

CFG = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_seq_len=64, init_std=0.3)
PAD, EOS = 0, 2


class IdTokenizer:
    """Token ids as text: id i decodes to chr(0x3b1 + i) (Greek and beyond: multi-byte UTF-8), specials to ''."""

    eos_id = eot_id = EOS
    pad_id = PAD
    bos_id = 1

    def decode(self, ids):
        return "".join(chr(0x3b1 + i) for i in ids if i > 2)


@pytest.fixture(scope="module")
def model_params():
    model = Transformer(CFG)
    return model, unbox(init_params_boxed(model, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def engine(model_params):
    model, params = model_params
    e = Engine(model, params, IdTokenizer(), slots=4, max_context=48, buckets=(8, 16))
    yield e
    e.close()


def prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, CFG.vocab_size, size=int(rng.integers(2, 16)))) for _ in range(count)]


def reference_greedy(model_params, ps, n):
    """The batch sampler's greedy tokens for prompts left-padded to 16, all in one batch (stop at EOS)."""
    model, params = model_params
    sampler = make_sampler(model, SamplingConfig(max_new_tokens=n, temperature=0.0, stop_tokens=(EOS,), pad_id=PAD))
    tokens = np.full((len(ps), 16), PAD, np.int32)
    for i, p in enumerate(ps):
        tokens[i, 16 - len(p):] = p
    out = sampler.sample(params, ModelInput.left_padded(jnp.asarray(tokens), jnp.asarray([len(p) for p in ps])),
                         jax.random.PRNGKey(0))
    rows = []
    for row, length in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
        row = [int(t) for t in row[:length]]
        rows.append(row[:-1] if row and row[-1] == EOS else row)
    return rows


def tokens_of(request):
    text, infos, finish = request.result(timeout=120)
    return [t.token for t in infos], finish


def test_prompt_buckets():
    assert prompt_buckets(1024) == (112, 240, 496, 1023)
    assert prompt_buckets(48) == (16, 47)  # at most four, de-duplicated, the last leaves room for a token
    assert len(prompt_buckets(32768)) == 4


def test_concurrent_greedy_equals_alone_and_the_batch_sampler(engine, model_params):
    """12 requests over 4 slots, submitted together (they queue, get admitted as slots free, and join rows that
    are mid-decode): each one's greedy tokens equal the same request alone, and the batch sampler's."""
    ps = prompts(12)
    alone = [tokens_of(engine.submit(p, Settings(max_tokens=20, temperature=0.0)))[0] for p in ps[:3]]
    requests = [engine.submit(p, Settings(max_tokens=20, temperature=0.0)) for p in ps]
    together = [tokens_of(r)[0] for r in requests]
    assert together[:3] == alone
    assert together == reference_greedy(model_params, ps, 20)


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    ps = prompts(6, seed=1)
    settings = [Settings(max_tokens=12, temperature=1.0, top_p=0.9, seed=100 + i) for i in range(6)]
    alone = tokens_of(engine.submit(ps[3], settings[3]))[0]
    crowd = [engine.submit(p, s) for p, s in zip(ps, settings)]
    assert tokens_of(crowd[3])[0] == alone
    again = tokens_of(engine.submit(ps[3], settings[3]))[0]
    assert again == alone
    other_seed = tokens_of(engine.submit(ps[3], Settings(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)))[0]
    assert other_seed != alone  # 12 tokens out of 93: the seed matters


def test_compiles_stay_flat_after_warm_up(engine):
    for length in (3, 12):  # both buckets
        prompt = list(range(3, 3 + length))
        tokens_of(engine.submit(prompt, Settings(max_tokens=4, temperature=0.0)))
        engine.score(prompt)
    warm = engine.compiles()
    rs = [engine.submit(p, Settings(max_tokens=int(k), temperature=float(k % 2), top_k=int(k % 3)))
          for k, p in zip(np.arange(3, 13), prompts(10, seed=5))]
    for r in rs:
        tokens_of(r)
    engine.score(prompts(1, seed=9)[0])
    assert engine.compiles() == warm


def test_cancel_frees_the_slot(engine):
    blockers = [engine.submit(p, Settings(max_tokens=30, temperature=1.0, seed=1, stop_tokens=())) for p in prompts(4)]
    waiting = engine.submit(prompts(1, seed=3)[0], Settings(max_tokens=3, temperature=0.0))
    for r in blockers:
        r.cancel()
    reasons = [tokens_of(r)[1].reason for r in blockers]
    assert reasons == ["cancelled"] * 4
    assert tokens_of(waiting)[1].reason == "length"
    wait_idle(engine)
    assert engine.active == 0


def test_max_tokens_and_context_end_a_request(engine):
    _, finish = tokens_of(engine.submit(prompts(1)[0], Settings(max_tokens=5, temperature=1.0, seed=0,
                                                                stop_tokens=())))
    assert (finish.reason, finish.completion_tokens) == ("length", 5)
    prompt = prompts(1, seed=2)[0][:10]
    _, finish = tokens_of(engine.submit(prompt, Settings(temperature=1.0, seed=0, stop_tokens=())))
    assert (finish.reason, finish.completion_tokens) == ("length", 48 - len(prompt))  # the cache is full
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.submit(prompt, Settings(max_tokens=48))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(prompt, Settings(max_tokens=0))
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([5, 500], Settings(max_tokens=1))


def test_score_equals_a_full_forward(engine, model_params):
    model, params = model_params
    p = prompts(1, seed=4)[0]
    chosen, top_ids, top_lps, _ = engine.score(p)
    logits = model.apply({"params": params}, ModelInput.unpacked(jnp.asarray([p], jnp.int32))).logits[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
    np.testing.assert_allclose(chosen, logp[np.arange(len(p) - 1), p[1:]], atol=1e-5)
    np.testing.assert_array_equal(top_ids[:, 0], logp[:-1].argmax(-1))


def test_reload_swaps_weights_without_recompiling(model_params):
    model, params = model_params
    e = Engine(model, params, IdTokenizer(), slots=2, max_context=32, buckets=(16,))
    try:
        p = prompts(1)[0]
        before = tokens_of(e.submit(p, Settings(max_tokens=8, temperature=0.0)))[0]
        warm = e.compiles()
        other = unbox(init_params_boxed(model, jax.random.PRNGKey(1)))
        assert e.reload(other) == 2
        after = tokens_of(e.submit(p, Settings(max_tokens=8, temperature=0.0)))[0]
        assert after != before and e.compiles() == warm
    finally:
        e.close()


# ----------------------------------------------------------------------------- sampling one row each
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 7, 0.6)])
def test_sample_rows_draws_what_sample_token_draws_for_each_row_alone(temperature, top_k, top_p):
    logits = jax.random.normal(jax.random.PRNGKey(0), (6, 50)) * 3
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    mixed_k = jnp.asarray([top_k, 0, top_k, 3, top_k, 0])  # other rows ask for other things
    mixed_p = jnp.asarray([top_p, 1.0, top_p, 0.5, top_p, 1.0])
    mixed_t = jnp.asarray([temperature, 0.0, temperature, 1.0, temperature, 2.0])
    got = sample_rows(logits, keys, mixed_t, mixed_p, mixed_k)
    for b in range(6):
        cfg = SamplingConfig(temperature=float(mixed_t[b]), top_k=int(mixed_k[b]), top_p=float(mixed_p[b]))
        want, _ = sample_token(logits[b:b + 1], keys[b], cfg)
        assert int(got[b]) == int(want[0]), b


# ----------------------------------------------------------------------------- text
def stream_text(pieces, stop, token_texts):
    """Feed tokens whose texts are token_texts (bytes ok: joined then decoded) through a TextStream."""
    table = dict(enumerate(token_texts))

    def decode(ids):
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    s = TextStream(decode, stop)
    out = []
    for i in range(len(token_texts)):
        out.append(s.push(i))
        if s.stopped:
            break
    out.append(s.flush())
    return out, s.stopped


def test_text_never_splits_a_character():
    euro = "€".encode()  # 3 bytes, one per token
    out, _ = stream_text(None, (), [b"a", euro[:1], euro[1:2], euro[2:], b"b"])
    assert out == ["a", "", "", "€", "b", ""]


def test_stop_strings_across_token_boundaries():
    out, stopped = stream_text(None, ("END",), [b"hello E", b"N", b"D and more"])
    assert stopped and "".join(out) == "hello " and "E" not in "".join(out)
    out, stopped = stream_text(None, ("END",), [b"hello E", b"N", b"o"])  # a false start is released
    assert not stopped and "".join(out) == "hello ENo"
    out, stopped = stream_text(None, ("\n\n", "xy"), [b"a\n", b"\nb"])
    assert stopped and "".join(out) == "a"


def test_a_stop_string_completed_by_a_held_back_token_is_cut_at_the_end_too():
    """The token completing "EN" also starts a character, so push holds it back; the reply then ends (EOS):
    flush must still cut before the stop string, not hand it out."""
    out, stopped = stream_text(None, ("EN",), [b"ab", b"E", b"N\xe2"])
    assert "".join(out) == "ab" and stopped


def test_close_finishes_every_live_and_waiting_request(model_params):
    model, params = model_params
    e = Engine(model, params, IdTokenizer(), slots=2, max_context=48, buckets=(16,))
    requests = [e.submit(p, Settings(max_tokens=30, temperature=1.0, seed=0, stop_tokens=())) for p in prompts(6)]
    e.close()
    reasons = {tokens_of(r)[1].reason for r in requests}
    assert reasons <= {"cancelled", "length"} and "cancelled" in reasons
    with pytest.raises(RuntimeError, match="stopped"):
        e.submit(prompts(1)[0], Settings(max_tokens=2))


def test_engine_stop_string(engine):
    """A stop string made of the model's own greedy text: the reply ends right before it."""
    p = prompts(1, seed=11)[0]
    text, _, _ = engine.submit(p, Settings(max_tokens=12, temperature=0.0, stop_tokens=())).result(timeout=60)
    stop = text[5:7]
    cut, _, finish = engine.submit(p, Settings(max_tokens=12, temperature=0.0, stop=(stop,),
                                               stop_tokens=())).result(timeout=60)
    assert finish.reason == "stop" and cut == text[:text.find(stop)]


def test_many_threads_submit_at_once(engine):
    ps = prompts(16, seed=12)
    results = [None] * 16

    def go(i):
        results[i] = tokens_of(engine.submit(ps[i], Settings(max_tokens=6, temperature=0.0)))[0]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results)
