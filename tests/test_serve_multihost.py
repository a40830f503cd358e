"""A model sharded over two processes serves: process 0 takes HTTP, both run the same steps (loopback, gloo).

`python -m instruct_jax serve` in 2 processes x 2 emulated CPU devices; the model's weights and KV cache are
sharded over all 4 devices, so every prefill and decode step is a collective program both processes run, in
the order process 0 broadcasts. Its answers must equal a one-process server's on the same weights.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import numpy as np
import pytest

from conftest import REPO, assert_processes_ok, rerun_on_xla_cpu_deadlock
from instruct_jax.parallel.distributed import free_port, launch_local
from serve_fixtures import running_server, tiny_model_dir

pytestmark = [pytest.mark.slow, rerun_on_xla_cpu_deadlock,
              pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")]
QUESTIONS = ["Hello there", "What news from the court?", "Speak, friend", "Now is the winter", "To be", "Good morrow"]
PROMPT = "To be, or not to be: that is the question"


def answers(url: str) -> dict:
    def chat(q):
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 12})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:  # concurrent: they share decode steps
        replies = list(pool.map(chat, QUESTIONS))
    echo = httpx.post(url + "/v1/completions", timeout=300, json={"prompt": PROMPT, "max_tokens": 0, "echo": True,
                                                                  "logprobs": 1}).json()
    return {"replies": replies, "logprobs": echo["choices"][0]["logprobs"]["token_logprobs"][1:]}


def test_two_processes_serve_one_sharded_model(tmp_path):
    model = tiny_model_dir(tmp_path / "tiny")
    with running_server({"tiny": model}, slots=4, max_context=64) as url:
        expected = answers(url)
    port, seen = free_port(), {}

    def client(procs):
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("the two-process server did not come up")
                time.sleep(0.5)
            seen.update(answers(url))
            seen["metrics"] = httpx.get(url + "/metrics").json()["models"]["tiny"]
        except Exception as e:  # noqa: BLE001 - reported by the test below
            seen["error"] = repr(e)
        finally:
            procs[0].send_signal(signal.SIGTERM)  # uvicorn stops; process 0 tells process 1 to stop

    results = launch_local(["-m", "instruct_jax", "serve", "--model", f"tiny={model}", "--port", str(port),
                            "--slots", "4", "--max-context", "64"], num_processes=2, devices_per_process=2,
                           cwd=str(REPO), timeout_s=600, while_running=client)
    assert "error" not in seen, seen.get("error")
    assert_processes_ok(results)
    assert seen["replies"] == expected["replies"]
    np.testing.assert_allclose(seen["logprobs"], expected["logprobs"], atol=1e-4)
    assert seen["metrics"]["slots"] == 4 and seen["metrics"]["active"] == 0
