"""The HTTP server: OpenAI-compatible endpoints, the web page and the ranking loop, on FastAPI.

    app = create_app({"sft": policy}, ServeOptions(labels="labels.jsonl"))   # uvicorn.run(app, ...)

Endpoints (docs/SERVING.md has examples):

  GET  /v1/models                       the loaded models, with their weight versions
  POST /v1/chat/completions             messages -> reply; stream (server-sent events), n, seed, stop,
                                        temperature, top_p, max_tokens, logprobs / top_logprobs; content parts
                                        {"type": "image_url"} with data URLs for a model with a vision tower
  POST /v1/completions                  text (or token ids) -> continuation; logprobs (0..5), echo (max_tokens 0 ok)
  POST /v1/models/{model}/reload        load newer weights of the same model without a restart
  POST /v1/rankings/sample              K answers to one prompt (K samples of one model, or one per model),
                                        anonymised, shuffled, identical answers merged
  POST /v1/rankings                     a person's ranking of those answers -> one row of the labels jsonl
  GET  /metrics                         per model: compiles, weight version, live / waiting requests, tokens
  GET  /tokenizer_info, POST /tokenize, POST /detokenize    (vLLM-style; lm-eval's remote tokenizer)
  GET  /                                the chat and ranking page (assets in serve/static/)

Every generation goes through the model's `Engine` (continuous batching). Safety: see `guard`.

Images (`chat_images`): a message's content may be OpenAI's list of parts, {"type": "text", "text": ...} and
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}. Each image part becomes an "<image>"
marker at its place in the message text (the chat template expands it to the model's image tokens) and its
pixels, decoded and resized to model.vision.image_size, go with the request in order. Only data URLs: the server
never fetches a URL. 400 naming the problem for an image sent to a text-only model, an http(s) URL, an
undecodable or oversized image, more images than model.vision.max_images, or a text containing the literal
"<image>" marker (on a vision model it would become image tokens with no image behind them).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import pathlib
import random
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from instruct_jax.data.images import IMAGE_MARKER, load_image
from instruct_jax.inference.engine import Finish, Settings, TextEvent, TokenInfo
from instruct_jax.serve.guard import ApiError, Guard, error_body
from instruct_jax.serve.labels import LabelStore, RankingSession, check_ranking

STATIC = pathlib.Path(__file__).with_name("static")
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # lm-eval sends a task's stop list plus the EOS string: more than OpenAI's 4
MAX_IMAGE_PIXELS = 4096 * 4096  # an image's width x height before resizing (a small PNG can decode huge)


@dataclasses.dataclass
class ServeOptions:
    """Limits and files of one server (the `serve` command's flags)."""

    labels: Optional[str] = None  # where rankings are appended (jsonl); None: the ranking endpoints answer 404
    api_key: Optional[str] = None  # required as "Authorization: Bearer KEY" on /v1 and the tokenizer routes
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")  # Host / Origin names accepted
    max_body_bytes: int = 1 << 20
    max_image_body_bytes: int = 16 << 20  # /v1/chat/completions of a model with a vision tower (data URL images)
    max_concurrent: int = 64  # generations in flight (queued or decoding) before 429
    max_messages: int = 256
    max_n: int = 8
    max_prompts: int = 64  # prompts in one /v1/completions call


# ----------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...): ignored


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ImageUrl(_Body):
    url: str
    detail: Optional[str] = None  # OpenAI's "auto" / "low" / "high": the tower has one resolution, ignored


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Annotated[Union[ContentPart, ImagePart], Field(discriminator="type")]]]

    def text(self) -> str:
        """The text, an IMAGE_MARKER where each image part is."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, ContentPart) else IMAGE_MARKER for p in self.content)

    def image_urls(self) -> list[str]:
        return [] if isinstance(self.content, str) else [p.image_url.url for p in self.content
                                                          if isinstance(p, ImagePart)]


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must be non-empty", "stop")
        # Every token checks every stop string on the engine's one thread: bound the work one request can ask for.
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters", "stop")
        return tuple(stops)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=5)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0)  # null: 16, OpenAI's default
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False


class RankSampleRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = None
    k: int = Field(4, ge=2, le=9)
    models: Optional[list[str]] = Field(None, min_length=2, max_length=4)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: Optional[int] = Field(None, ge=1)


class RankSubmitRequest(_Body):
    id: str
    labeler: str = Field(min_length=1, max_length=200)
    ranks: dict[str, int]


class ReloadRequest(_Body):
    path: Optional[str] = None


class TokenizeRequest(_Body):
    prompt: str
    add_special_tokens: bool = False
    model: Optional[str] = None


class DetokenizeRequest(_Body):
    tokens: list[int]
    model: Optional[str] = None


# ----------------------------------------------------------------------------- helpers
def _error(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def decode_data_url(url: str, where: str, size: int, channels: int):
    """[size, size, channels] float32 of a data URL image; ApiError 400 naming `where` and the problem."""
    if not url.startswith("data:"):
        raise ApiError(400, f"{where}: only data URLs (data:image/png;base64,...) are accepted for image_url; "
                            "this server does not fetch URLs", "messages")
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise ApiError(400, f"{where}: expected a base64 image data URL (data:image/...;base64,...), got "
                            f"{header[:40]!r}", "messages")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data URL is not valid base64", "messages") from None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as image:  # reads the header only: the size before any decoding
            width, height = image.size
    except (OSError, ValueError) as e:
        raise ApiError(400, f"{where}: cannot decode the image ({e})", "messages") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise ApiError(400, f"{where}: the image is {width}x{height} pixels, over {MAX_IMAGE_PIXELS} pixels",
                       "messages")
    try:
        return load_image(raw, size, channels)
    except ValueError as e:  # MalformedDataError: a truncated or corrupt image
        raise ApiError(400, f"{where}: cannot decode the image ({getattr(e, 'detail', e)})", "messages") from None


def chat_images(messages: list, policy):
    """(messages as role / text dicts, an IMAGE_MARKER per image part, images [n, H, W, C] float32 or None) of
    a chat request; ApiError 400 naming the problem (module docstring)."""
    layout = policy.layout
    urls = [(f"messages[{i}].content[{j}]", p.image_url.url) for i, m in enumerate(messages)
            if not isinstance(m.content, str) for j, p in enumerate(m.content) if isinstance(p, ImagePart)]
    if urls and layout is None:
        raise ApiError(400, f"model {policy.name!r} has no vision tower: image_url parts are not accepted",
                       "messages")
    if layout is not None:
        for i, m in enumerate(messages):
            texts = [m.content] if isinstance(m.content, str) else [p.text for p in m.content
                                                                    if isinstance(p, ContentPart)]
            if any(IMAGE_MARKER in t for t in texts):
                raise ApiError(400, f"messages[{i}]: the text contains the image marker {IMAGE_MARKER!r}, which "
                                    "this model reads as an image; send images as image_url parts", "messages")
        if len(urls) > layout.max_images:
            raise ApiError(400, f"{len(urls)} images, more than model {policy.name!r} takes "
                                f"(model.vision.max_images={layout.max_images})", "messages")
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    if not urls:
        return plain, None
    images = [decode_data_url(url, where, layout.size, layout.channels) for where, url in urls]
    return plain, np.stack(images)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Run:
    """The engine requests behind one HTTP request, their events merged into one asyncio queue."""

    def __init__(self, policy, loop: asyncio.AbstractEventLoop, guard: Guard):
        self.policy, self.loop, self.guard = policy, loop, guard
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = []

    def submit(self, index: int, ids, settings: Settings, images=None):
        def on_event(event, i=index):  # on the engine thread
            if isinstance(event, Finish):
                self.guard.release(1)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

        request = self.policy.submit(ids, settings, on_event=on_event, images=images)
        self.requests.append(request)
        return request

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def events(self, http: HTTPRequest):
        """(index, event) pairs until every request finished; cancels them if the client goes away."""
        left = len(self.requests)
        try:
            while left:
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                left -= isinstance(item[1], Finish)
                yield item
        finally:
            self.cancel()  # no-op for finished requests; frees the slots of a disconnected client

    async def collect(self, http: HTTPRequest) -> list[dict]:
        """Per request: text, tokens (TokenInfo), finish."""
        out = [{"text": [], "tokens": [], "finish": None} for _ in self.requests]
        async for i, event in self.events(http):
            if isinstance(event, TextEvent):
                out[i]["text"].append(event.text)
                out[i]["tokens"].extend(event.tokens)
            else:
                out[i]["finish"] = event
        for o in out:
            o["text"] = "".join(o["text"])
            if o["finish"] is not None and o["finish"].reason == "error":
                raise ApiError(500, f"generation failed: {o['finish'].error}")
        return out


# ----------------------------------------------------------------------------- the app
def create_app(policies: dict, options: Optional[ServeOptions] = None) -> FastAPI:
    """The server for `policies` (name -> `Policy`); see the module docstring."""
    options = options or ServeOptions()
    if not policies:
        raise ValueError("no model to serve")
    app = FastAPI(title="instruct_jax", docs_url=None, redoc_url=None, openapi_url=None)
    guard = Guard(options, image_paths=("/v1/chat/completions",) if any(
        getattr(p, "layout", None) is not None for p in policies.values()) else ())
    app.add_middleware(guard.middleware())  # outermost: nothing reaches a route unchecked
    labels = LabelStore(options.labels) if options.labels else None
    sessions: dict[str, RankingSession] = {}
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(422, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(422, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None)

    def policy_for(name: Optional[str]):
        if name is None or name == "" or (len(policies) == 1 and name not in policies and name == "default"):
            return next(iter(policies.items()))
        if name not in policies:
            raise ApiError(404, f"model {name!r} is not served here (served: {sorted(policies)})", "model")
        return name, policies[name]

    def settings(body: Sampling, max_tokens: Optional[int], seed_offset: int = 0, stop_tokens=None) -> Settings:
        if body.presence_penalty or body.frequency_penalty:
            raise ApiError(400, "presence_penalty and frequency_penalty are not supported (use 0)",
                           "presence_penalty" if body.presence_penalty else "frequency_penalty")
        seed = None if body.seed is None else (body.seed + seed_offset) % (2 ** 31)
        return Settings(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                        seed=seed, stop=body.stops(), stop_tokens=stop_tokens)

    def check_n(body: Sampling) -> None:
        if body.n > options.max_n:
            raise ApiError(400, f"n must be at most {options.max_n}", "n")

    def submit_all(run: _Run, jobs: list, images=None) -> None:
        """jobs: (ids, Settings), each with the same images (None: none). All validated first, so a bad one
        queues nothing; each generation holds one unit of the concurrency budget until it finishes."""
        for ids, s in jobs:
            try:
                run.policy.engine.check(ids, s, images)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
        guard.reserve(len(jobs))
        submitted = 0
        try:
            for i, (ids, s) in enumerate(jobs):
                run.submit(i, ids, s, images)
                submitted += 1
        except OverflowError as e:
            run.cancel()
            raise ApiError(429, str(e)) from None
        except RuntimeError as e:  # the engine stopped (closed, or a multi-process failure)
            run.cancel()
            raise ApiError(503, str(e)) from None
        finally:
            guard.release(len(jobs) - submitted)

    # ------------------------------------------------------------------ models, metrics, page
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "instruct_jax", "version": p.version,
             "max_context": p.max_context} for name, p in policies.items()]}

    @app.get("/metrics")
    async def metrics():
        return {"models": {name: {"compiles": p.engine.compiles(), "version": p.version, "active": p.engine.active,
                                  "queued": p.engine.queued, "slots": p.engine.slots, "buckets": p.engine.buckets,
                                  **p.engine.stats} for name, p in policies.items()},
                "in_flight": guard.in_flight}

    @app.post("/v1/models/{name}/reload")
    async def reload(name: str, body: Optional[ReloadRequest] = None):
        _, policy = policy_for(name)
        try:
            version = await asyncio.to_thread(policy.reload, body.path if body else None)
        except FileNotFoundError as e:
            raise ApiError(400, str(e), "path") from None
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"the checkpoint does not fit model {name!r}: {e}", "path") from None
        return {"id": name, "version": version}

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        name, policy = policy_for(body.model)
        if len(body.messages) > options.max_messages:
            raise ApiError(400, f"at most {options.max_messages} messages", "messages")
        check_n(body)
        if body.messages[-1].role == "assistant":
            raise ApiError(400, "the last message must be from the user (or system)", "messages")
        messages, images = await asyncio.to_thread(chat_images, body.messages, policy)
        try:
            ids = policy.chat_ids(messages)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        run = _Run(policy, asyncio.get_running_loop(), guard)
        submit_all(run, [(ids, settings(body, max_tokens, j)) for j in range(body.n)], images)
        rid, tokenizer = f"chatcmpl-{uuid.uuid4().hex}", policy.tokenizer

        def logprobs(tokens: list[TokenInfo]):
            if not body.logprobs:
                return None

            def entry(token, logprob):
                text = _token_text(tokenizer, token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

            return {"content": [{**entry(t.token, t.logprob),
                                 "top_logprobs": [entry(i, v) for i, v in t.top[:body.top_logprobs]]}
                                for t in tokens]}

        if body.stream:
            async def sse():
                head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name}
                for j in range(body.n):
                    yield _sse({**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                completion = 0
                async for j, event in run.events(http):
                    if isinstance(event, TextEvent):
                        if event.text or (body.logprobs and event.tokens):
                            yield _sse({**head, "choices": [{"index": j, "delta": {"content": event.text},
                                                             "logprobs": logprobs(event.tokens),
                                                             "finish_reason": None}]})
                    elif event.reason == "error":  # mid-stream: the status is already 200
                        yield _sse({"error": {"message": f"generation failed: {event.error}",
                                              "type": "server_error", "param": None, "code": None}})
                    else:
                        completion += event.completion_tokens
                        reason = "stop" if event.reason in ("stop", "cancelled") else event.reason
                        yield _sse({**head, "choices": [{"index": j, "delta": {}, "logprobs": None,
                                                         "finish_reason": reason}]})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(len(ids), completion)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        results = await run.collect(http)
        completion = sum(r["finish"].completion_tokens for r in results if r["finish"])
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": j, "message": {"role": "assistant", "content": r["text"]},
                             "logprobs": logprobs(r["tokens"]),
                             "finish_reason": r["finish"].reason if r["finish"] else "stop"}
                            for j, r in enumerate(results)],
                "usage": _usage(len(ids), completion)}

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        name, policy = policy_for(body.model)
        check_n(body)
        if body.max_tokens is None:
            body.max_tokens = 16
        tokenizer = policy.tokenizer
        raw = body.prompt
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise ApiError(400, "prompt is empty", "prompt")
        if len(raw) > options.max_prompts:
            raise ApiError(400, f"at most {options.max_prompts} prompts per request", "prompt")
        vocab = policy.cfg.vocab_size
        for i, p in enumerate(raw):
            if not isinstance(p, str) and any(not 0 <= t < vocab for t in p):
                raise ApiError(400, f"prompt {i}: token ids must be in [0, {vocab})", "prompt")
        prompts = [(p, tokenizer.encode(p)) if isinstance(p, str) else (tokenizer.decode(p), list(p)) for p in raw]
        for i, (_, ids) in enumerate(prompts):
            if not ids:
                raise ApiError(400, f"prompt {i} is empty", "prompt")
        if body.stream and (body.echo or body.max_tokens == 0):
            raise ApiError(400, "stream with echo or max_tokens=0 is not supported", "stream")
        scored = {}
        if body.echo and body.logprobs is not None:
            for i, (_, ids) in enumerate(prompts):
                try:
                    scored[i] = await asyncio.to_thread(policy.engine.score, ids)
                except ValueError as e:
                    raise ApiError(400, str(e), "prompt") from None
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.max_tokens == 0:
            if not body.echo:
                raise ApiError(400, "max_tokens=0 needs echo=true (nothing to return otherwise)", "max_tokens")
            for _, ids in prompts:  # the same bound as a generation
                if len(ids) > policy.engine.buckets[-1]:
                    raise ApiError(400, f"prompt of {len(ids)} tokens exceeds the context", "prompt")
            results = [{"text": "", "tokens": [], "finish": Finish("length", 0, len(ids))}
                       for _, ids in prompts for _ in range(body.n)]
        else:
            run = _Run(policy, asyncio.get_running_loop(), guard)
            submit_all(run, [(ids, settings(body, body.max_tokens, j)) for _, ids in prompts for j in range(body.n)])
            if body.stream:
                async def sse():
                    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name}
                    completion = 0
                    async for j, event in run.events(http):
                        if isinstance(event, TextEvent) and event.text:
                            yield _sse({**head, "choices": [{"index": j, "text": event.text, "logprobs": None,
                                                             "finish_reason": None}]})
                        elif isinstance(event, Finish) and event.reason == "error":
                            yield _sse({"error": {"message": f"generation failed: {event.error}",
                                                  "type": "server_error", "param": None, "code": None}})
                        elif isinstance(event, Finish):
                            completion += event.completion_tokens
                            yield _sse({**head, "choices": [{"index": j, "text": "", "logprobs": None,
                                                             "finish_reason": event.reason if event.reason in (
                                                                 "stop", "length") else "stop"}]})
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(sum(len(i) for _, i in prompts),
                                                                            completion)})
                    yield "data: [DONE]\n\n"

                return StreamingResponse(sse(), media_type="text/event-stream")
            results = await run.collect(http)

        choices = []
        for index, r in enumerate(results):
            p = index // body.n
            text, ids = prompts[p]
            tokens: list[TokenInfo] = list(r["tokens"])
            finish: Finish = r["finish"]
            if finish is not None and finish.stop_token is not None:
                tokens.append(finish.stop_token)
            choice = {"index": index, "text": (text if body.echo else "") + r["text"], "logprobs": None,
                      "finish_reason": finish.reason if finish and finish.reason in ("stop", "length") else "stop"}
            if body.logprobs is not None:
                k = body.logprobs
                entries = []
                if body.echo:
                    chosen, top_ids, top_lps, _ = scored[p]
                    entries.append((ids[0], None, None))
                    entries += [(ids[i + 1], float(chosen[i]), [(int(a), float(b)) for a, b in
                                                               zip(top_ids[i][:max(k, 1)], top_lps[i][:max(k, 1)])])
                                for i in range(len(ids) - 1)]
                entries += [(t.token, t.logprob, t.top[:max(k, 1)]) for t in tokens]
                choice["logprobs"] = _completion_logprobs(tokenizer, entries, k)
            choices.append(choice)
        completion = sum(r["finish"].completion_tokens for r in results if r["finish"])
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": choices, "usage": _usage(sum(len(i) for _, i in prompts), completion)}

    # ------------------------------------------------------------------ tokenizer (vLLM-style)
    @app.get("/tokenizer_info")
    async def tokenizer_info(model: Optional[str] = None):
        _, policy = policy_for(model)
        tok = policy.tokenizer
        return {"eos_token": _token_text_raw(tok, tok.eos_id),
                "bos_token": None if tok.bos_id is None else _token_text_raw(tok, tok.bos_id),
                "pad_token": _token_text_raw(tok, tok.pad_id), "chat_template": tok.chat_template,
                "model_max_length": policy.max_context}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _, policy = policy_for(body.model)
        tok = policy.tokenizer
        special = {text: i for text, i in tok.special_tokens.items()}
        ids = [special[body.prompt]] if body.prompt in special else tok.encode(body.prompt)
        if body.add_special_tokens and tok.bos_id is not None:
            ids = [tok.bos_id] + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": policy.max_context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _, policy = policy_for(body.model)
        vocab = policy.cfg.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ApiError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": policy.tokenizer.decode(body.tokens)}

    # ------------------------------------------------------------------ ranking
    def need_labels() -> LabelStore:
        if labels is None:
            raise ApiError(404, "this server was started without --labels: ranking is off")
        return labels

    @app.post("/v1/rankings/sample")
    async def rank_sample(body: RankSampleRequest, http: HTTPRequest):
        need_labels()
        if any(m.image_urls() for m in body.messages):
            raise ApiError(400, "ranking takes text only: image_url parts are not accepted here", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must be from the user", "messages")
        if body.models:
            if len(set(body.models)) != len(body.models):
                raise ApiError(400, "models must be distinct", "models")
            sources = [policy_for(m) for m in body.models]
        else:
            sources = [policy_for(body.model)] * body.k
        sampling = {"temperature": body.temperature, "top_p": body.top_p, "max_tokens": body.max_tokens}
        runs = []
        for j, (name, policy) in enumerate(sources):
            run = _Run(policy, asyncio.get_running_loop(), guard)
            s = Settings(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                         seed=random.randrange(2 ** 31))
            try:
                submit_all(run, [(policy.chat_ids(messages), s)])
            except BaseException:
                for other in runs:
                    other[2].cancel()
                raise
            runs.append((name, policy, run))
        answers = []
        for name, policy, run in runs:
            result = (await run.collect(http))[0]
            answers.append((result["text"].strip(), name, run.requests[0].version))  # the weights that wrote it
        session = RankingSession.build(messages, answers, sampling)
        if len(session.answers) < 2:
            raise ApiError(409, "every answer came out the same; nothing to rank - try again or raise the "
                                "temperature")
        sessions[session.id] = session
        while len(sessions) > 1000:
            sessions.pop(next(iter(sessions)))
        return {"id": session.id, "answers": [{"id": a.id, "text": a.text} for a in session.answers]}

    @app.post("/v1/rankings")
    async def rank_submit(body: RankSubmitRequest):
        store = need_labels()
        session = sessions.pop(body.id, None)  # taken at once: a double submit cannot write two rows
        if session is None:
            raise ApiError(404, f"no answers with id {body.id!r} to rank (expired, already ranked, or never "
                                "sampled)", "id")
        try:
            ranks = check_ranking(session, body.ranks)
        except ApiError:
            sessions[body.id] = session  # a ranking to correct, not to lose
            raise
        row = session.row(ranks, body.labeler.strip())
        number = await asyncio.to_thread(store.append, row)
        return {"ok": True, "row": number, "path": store.path}

    return app


def _token_text_raw(tokenizer, token: int) -> str:
    text = tokenizer.token_text(token)
    return text if text is not None else tokenizer.decode([token])


def _completion_logprobs(tokenizer, entries: list, k: int) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for token, logprob, top in entries:
        text = _token_text(tokenizer, token)
        tokens.append(text)
        token_logprobs.append(logprob)
        offsets.append(offset)
        offset += len(text)
        if top is None:
            top_logprobs.append(None)
            continue
        top_k = {}
        for i, v in top[:max(k, 1)]:
            top_k.setdefault(_token_text(tokenizer, i), v)
        top_logprobs.append(top_k)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
