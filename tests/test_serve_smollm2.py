"""A real model behind every way of talking to it: SmolLM2-135M-Instruct (the GGUF from requirements-models.txt),
imported with `interop import`, answers "What is the capital of France?" with Paris through `load_policy`,
the `chat` command and the server; and under 32 concurrent requests the server's greedy answer to each equals
that request served alone. Slow tier (a few minutes on 2 CPU cores)."""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys

import openai
import pytest

from serve_fixtures import REPO, running_server
from test_interop_smollm2 import smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from instruct_jax.interop.cli import run_import

    out = str(tmp_path_factory.mktemp("smollm2"))
    run_import(argparse.Namespace(source=smollm2_gguf(), out=out, vocab_size=0, experiment=None))
    return out


@pytest.fixture(scope="module")
def policy(smollm2_dir):
    import instruct_jax

    import jax

    # One device: the tests run on 8 emulated CPU devices, and an 8-way sharded 135M model on 2 cores spends
    # its time in collectives.
    p = instruct_jax.load_policy(smollm2_dir, slots=8, max_context=256, devices=jax.devices()[:1])
    yield p
    p.close()


def test_load_policy_chat_says_paris(policy):
    assert "Paris" in policy.chat(QUESTION)
    assert "Paris" in "".join(policy.stream_chat([{"role": "user", "content": QUESTION}], max_tokens=24))


def test_chat_command_says_paris(smollm2_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}  # one CPU device
    out = subprocess.run([sys.executable, "-m", "instruct_jax", "chat", "--model", smollm2_dir, "--temperature", "0",
                          "--max-context", "256"], input=f"{QUESTION}\n/settings\n/quit\n", capture_output=True,
                         text=True, timeout=600, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout and "temperature 0.0" in out.stdout


QUESTIONS = [QUESTION] + [f"{q} Answer in one sentence." for q in (
    "Name a primary color.", "What is 2 + 3?", "What is the largest ocean?", "Who wrote Hamlet?",
    "What language is spoken in Spain?", "What is the boiling point of water?", "Name a planet.",
    "What do bees make?", "What is the opposite of hot?", "How many legs does a spider have?",
    "What is the capital of Italy?", "What color is the sky?", "Name a fruit.", "What is ice made of?",
    "What is the first letter of the alphabet?", "Name a musical instrument.", "What animal barks?",
    "What is the capital of Japan?", "How many days are in a week?", "What gas do plants absorb?",
    "Name a continent.", "What is the sun?", "What is 10 minus 4?", "Who painted the Mona Lisa?",
    "What is the freezing point of water?", "Name a vegetable.", "What is a baby cat called?",
    "What is the capital of Germany?", "What shape has three sides?", "What do cows drink?",
    "Name a season.")]


def test_server_says_paris_and_32_concurrent_answers_equal_each_served_alone(policy):
    assert len(QUESTIONS) == 32
    with running_server({"smollm2": policy}) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(q):
            r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": q}],
                                               temperature=0, max_tokens=24)
            return r.choices[0].message.content

        alone = [ask(q) for q in QUESTIONS]
        assert "Paris" in alone[0]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            together = list(pool.map(ask, QUESTIONS))
        assert together == alone
