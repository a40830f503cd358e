"""Talking to a model: the `chat` and `serve` commands, the OpenAI-compatible HTTP app, its web page and the
ranking loop (serve/app.py, serve/guard.py, serve/labels.py, serve/static/). Generation itself is
`inference/engine.py` (continuous batching) behind `inference/policy.py: load_policy`."""
