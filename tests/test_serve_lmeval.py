"""lm-evaluation-harness runs unchanged against `instruct_jax serve` (its `local-completions` model), offline.

lm-eval's `local-completions` posts OpenAI legacy completions to `base_url`; with `tokenized_requests=False` the
prompts are strings. A multiple-choice task becomes one `echo=True, max_tokens=1, logprobs=1` request per
(question, choice): lm-eval counts the context's tokens itself (so it needs a tokenizer even then: the model's own,
from a local folder, no Hub) and sums `choices[0].logprobs.token_logprobs[ctxlen:-1]` (the trailing entry is the one
generated token). A generate_until task becomes `{"prompt", "max_tokens", "temperature", "stop", "seed"}` and reads
`choices[i].text`, already cut at the stop string.

The tasks are hand-made (tests/data/lmeval_mc/), read with the `json` dataset builder from the local path. As an
independent check, one choice's loglikelihood from lm-eval is recomputed from the server's own echo logprobs,
fetched with httpx and split at the context with the model's own (instruct_jax) tokenizer, not lm-eval's.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import httpx
import pytest
import transformers

import datasets.config
import huggingface_hub.constants
import lm_eval
import lm_eval.models.api_models
from lm_eval.tasks import TaskManager

from instruct_jax.data.tokenizer import load_tokenizer
from instruct_jax.interop.hf import export_tokenizer

from serve_fixtures import running_server, tiny_model_dir

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "tests" / "data" / "lmeval_mc"  # the task YAMLs name their jsonl relative to REPO
MC_TASK, GEN_TASK = "instruct_jax_mc", "instruct_jax_gen"
MODEL = "tiny"
LOGPROB_TOL = 1e-4


def questions() -> list[dict]:
    with open(TASK_DIR / "questions.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base_url, model_dir, hf_tokenizer_dir): one tiny model served for the whole module."""
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("lmeval_model"))
    hf_dir = hf_tokenizer(model_dir, str(tmp_path_factory.mktemp("lmeval_hf_tokenizer")))
    with running_server({MODEL: model_dir}) as base_url:
        yield base_url, model_dir, hf_dir


def hf_tokenizer(model_dir: str, out: str) -> str:
    """The model's tokenizer as a transformers folder (what lm-eval's huggingface backend loads), checked to give
    the server's token ids on every string lm-eval will send: lm-eval counts the context's tokens with it, and a
    count that differs from the server's shifts the scored span without any error."""
    src = os.path.join(model_dir, "tokenizer")
    export_tokenizer(src, out)  # sets add_prefix_space from the sentencepiece model (no dummy prefix here)
    ours = load_tokenizer(src)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for q in questions():
        for text in [f"Question: {q['question']}\nAnswer:"] + [f"Question: {q['question']}\nAnswer: {c}"
                                                                 for c in q["choices"]]:
            ids = ours.encode(text)
            assert theirs(text, add_special_tokens=False).input_ids == ids, text
            assert theirs.batch_decode([ids])[0] == text, text
    return out


@pytest.fixture
def lmeval_env(monkeypatch):
    """Offline, from the repository root (the tasks' relative data_files), with every POST lm-eval sends recorded."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # The libraries read the variables at import: set their constants too, so any Hub access fails at once.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.chdir(REPO)

    posts = []
    requests_module = lm_eval.models.api_models.requests
    real_post = requests_module.post

    def post(url, *args, **kwargs):
        posts.append((url, kwargs.get("json"), kwargs.get("headers")))
        return real_post(url, *args, **kwargs)

    monkeypatch.setattr(requests_module, "post", post)
    return posts


def evaluate(base_url: str, hf_dir: str, task: str, tokenizer: str = "local") -> dict:
    """tokenizer "local": lm-eval loads the model's tokenizer, exported to a transformers folder `hf_dir`, from that
    path (tokenizer_backend=huggingface,tokenizer=PATH). "auto": lm-eval's default backend, which finds the server's
    /tokenizer_info and /tokenize and uses them (the "remote" backend): no tokenizer on the client at all."""
    # The string form, as on lm-eval's command line (--model_args): "False" is parsed to a bool there.
    args = [f"base_url={base_url}/v1/completions", f"model={MODEL}", "tokenized_requests=False"]
    if tokenizer == "local":
        args += ["tokenizer_backend=huggingface", f"tokenizer={hf_dir}"]
    args += ["num_concurrent=1", "batch_size=1",
             "max_retries=1"]  # a rejected request fails the run at once instead of after backoff
    model_args = ",".join(args)
    results = lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=[task],
        task_manager=TaskManager(include_path=str(TASK_DIR)), log_samples=True, bootstrap_iters=0,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    assert results is not None, "simple_evaluate returned no results"
    return results


def completion(base_url: str, **body) -> dict:
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def echo_logprobs(base_url: str, prompt: str) -> list:
    """The server's token_logprobs for `prompt` echoed (one entry per prompt token; the first is null)."""
    out = completion(base_url, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    (choice,) = out["choices"]
    logprobs = choice["logprobs"]["token_logprobs"]
    assert logprobs[0] is None and all(isinstance(x, float) for x in logprobs[1:]), logprobs
    return logprobs


@pytest.mark.parametrize("tokenizer", ["local", "auto"])
def test_multiple_choice_loglikelihoods(server, lmeval_env, tokenizer):
    base_url, model_dir, hf_dir = server
    qs = questions()
    n_requests = sum(len(q["choices"]) for q in qs)

    results = evaluate(base_url, hf_dir, MC_TASK, tokenizer)

    acc = results["results"][MC_TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0, results["results"]
    samples = results["samples"][MC_TASK]
    assert len(samples) == len(qs)
    assert sum(len(s["arguments"]) for s in samples) == n_requests
    # One HTTP request per (question, choice), as lm-eval's loglikelihood payload with a string prompt.
    assert len(lmeval_env) == n_requests
    for url, body, _ in lmeval_env:
        assert url == f"{base_url}/v1/completions"
        assert isinstance(body["prompt"], str)
        assert (body["echo"], body["max_tokens"], body["logprobs"]) == (True, 1, 1)

    # acc is what the loglikelihoods lm-eval parsed from the server's responses say.
    correct = []
    for s in samples:
        lls = [r[0][0] for r in s["resps"]]  # resps: per choice, [(loglikelihood, is_greedy)]
        assert all(math.isfinite(ll) and ll < 0 for ll in lls), lls
        correct.append(max(range(len(lls)), key=lls.__getitem__) == s["target"])
    assert acc == pytest.approx(sum(correct) / len(correct))

    # Independent check: the gold choice of the first question, from the server's own echo logprobs, split at
    # the context by the model's own tokenizer (instruct_jax's, which the server uses; not lm-eval's).
    tok = load_tokenizer(os.path.join(model_dir, "tokenizer"))
    s = min(samples, key=lambda x: x["doc_id"])
    gold = s["target"]
    context, continuation = s["arguments"][gold]
    context_ids, full_ids = tok.encode(context), tok.encode(context + continuation)
    assert full_ids[:len(context_ids)] == context_ids and len(full_ids) > len(context_ids)
    full = echo_logprobs(base_url, context + continuation)
    # Every prompt token, then the one generated token (max_tokens=1) that lm-eval drops with its [ctxlen:-1].
    assert len(full) == len(full_ids) + 1, (len(full), len(full_ids))
    server_ll = sum(full[len(context_ids):len(full_ids)])
    lm_eval_ll = s["resps"][gold][0][0]
    assert lm_eval_ll == pytest.approx(server_ll, abs=LOGPROB_TOL), (context, continuation, full)
    # The context's own echo agrees with the longer prompt's on the shared tokens (a causal model).
    shared = slice(1, len(context_ids))
    assert echo_logprobs(base_url, context)[shared] == pytest.approx(full[shared], abs=LOGPROB_TOL)


def test_generate_until(server, lmeval_env):
    base_url, _, hf_dir = server
    qs = questions()

    results = evaluate(base_url, hf_dir, GEN_TASK)

    em = results["results"][GEN_TASK]["exact_match,none"]
    assert 0.0 <= em <= 1.0, results["results"]
    samples = results["samples"][GEN_TASK]
    assert len(samples) == len(qs)
    assert len(lmeval_env) == len(qs)  # one request per question
    for _, body, _ in lmeval_env:
        assert isinstance(body["prompt"], str)
        assert body["max_tokens"] == 8 and body["temperature"] == 0
        assert "\n" in body["stop"]
    for s in samples:
        (text,) = s["resps"][0]
        assert isinstance(text, str) and "\n" not in text, text  # the server cut it at the stop string

    # The same request sent directly gives the same (greedy) text lm-eval recorded.
    s = min(samples, key=lambda x: x["doc_id"])
    out = completion(base_url, prompt=s["arguments"][0][0], max_tokens=8, temperature=0, stop=["\n"], seed=1234)
    assert out["choices"][0]["text"] == s["resps"][0][0]
