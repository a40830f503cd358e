"""Fixtures for the serving tests: a tiny model folder and a server running in a thread.

    path = tiny_model_dir(tmp_path)                       # model.json + tokenizer/ + params/ (an import folder)
    with running_server({"tiny": path}, labels=tmp_path / "labels.jsonl") as base_url:
        ...                                                 # http://127.0.0.1:PORT

The tiny model is random (2 layers, d_model 64) with a sentencepiece tokenizer trained on the repo's
tinyshakespeare (byte fallback: any character round-trips); one folder per test session is enough.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import socket
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
            max_seq_len=256, init_std=0.5)


def tiny_model_dir(root, seed: int = 0, **model) -> str:
    """An `interop import`-style folder with a random tiny model; `seed` gives other weights (a "newer checkpoint")."""
    import jax

    from instruct_jax.checkpoint import export_params
    from instruct_jax.data.tokenizer import train_sentencepiece
    from instruct_jax.model.config import ModelConfig
    import flax.linen as nn

    from instruct_jax.model.transformer import Transformer, init_params_boxed

    root = pathlib.Path(root)
    tok_dir = root / "tokenizer"
    if not (tok_dir / "spm.model").exists():
        tok_dir.mkdir(parents=True, exist_ok=True)
        corpus = root / "corpus.txt"
        corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:200_000])
        train_sentencepiece([str(corpus)], str(tok_dir / "spm"), vocab_size=TINY["vocab_size"])
        corpus.unlink()
    cfg = ModelConfig(**{**TINY, **model})
    params = nn.unbox(init_params_boxed(Transformer(cfg), jax.random.PRNGKey(seed)))
    export_params(str(root / "params"), params)
    (root / "model.json").write_text(json.dumps({"model": dataclasses.asdict(cfg), "source": "random"}))
    return str(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(models: dict, labels=None, slots: int = 4, max_context: int = 128, devices=None, **options):
    """Serve `models` (name -> path, or name -> an already loaded Policy) with uvicorn in a thread; yields the base URL."""
    import uvicorn

    from instruct_jax.inference.policy import Policy, load_policy
    from instruct_jax.serve.app import ServeOptions, create_app

    policies = {name: p if isinstance(p, Policy) else load_policy(p, slots=slots, max_context=max_context, name=name,
                                                                  devices=devices)
                for name, p in models.items()}
    app = create_app(policies, ServeOptions(labels=str(labels) if labels else None, **options))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        for name, p in policies.items():
            if not isinstance(models[name], Policy):
                p.close()

