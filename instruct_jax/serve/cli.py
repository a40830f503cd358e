"""`python -m instruct_jax chat|serve`: talk to a model in the terminal, or serve it over HTTP.

    python -m instruct_jax chat --model runs/smollm2
    python -m instruct_jax serve --model sft=runs/pipeline/sft --model ppo=runs/pipeline/ppo --labels labels.jsonl

A model path is what `load_policy` takes: an `interop import` folder, a run's workdir, or a params export.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys

CHAT_HELP = "talk to a model in the terminal: multi-turn, streamed, through its chat template"
SERVE_HELP = "OpenAI-compatible server with continuous batching, a chat page and a ranking view"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

CHAT_COMMANDS = """commands:
  /reset              forget the conversation (keeps the system prompt)
  /system TEXT        set the system prompt (empty: none) and reset
  /temperature X      sampling temperature (0 = greedy)
  /top_p X            nucleus sampling mass (1 = off)
  /max_tokens N       longest reply (0 = until the context is full)
  /settings           show the settings
  /help               this list
  /quit               leave (Ctrl-D too)"""


def add_parsers(sub) -> None:
    chat = sub.add_parser("chat", help=CHAT_HELP, description=CHAT_HELP + "\n\n" + CHAT_COMMANDS,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("--model", required=True, help="an interop import folder, a run's workdir or a params export")
    chat.add_argument("--system", default="", help="system prompt")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--max-tokens", type=int, default=256, help="longest reply (0: until the context is full)")
    chat.add_argument("--max-context", type=int, default=0, help="tokens of conversation kept (default: the model's)")
    chat.add_argument("--seed", type=int, default=None)

    serve = sub.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP)
    serve.add_argument("--model", required=True, action="append", metavar="[NAME=]PATH",
                       help="a model to serve (repeat for several: the ranking view compares them)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("INSTRUCT_JAX_API_KEY"),
                       help="required off loopback (env INSTRUCT_JAX_API_KEY)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="accept this Host / Origin name too (the name clients use to reach the server)")
    serve.add_argument("--labels", default=None, help="jsonl file the ranking view appends to (default: ranking off)")
    serve.add_argument("--slots", type=int, default=16, help="requests decoded together per model")
    serve.add_argument("--max-context", type=int, default=1024, help="prompt + reply tokens per request")
    serve.add_argument("--max-concurrent", type=int, default=64, help="generations queued or running before 429")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20)
    serve.add_argument("--max-image-body-bytes", type=int, default=16 << 20,
                       help="body limit of /v1/chat/completions for a model with a vision tower (data URL images)")
    dist = serve.add_argument_group("multi-host: one model over every process's devices; process 0 takes HTTP")
    dist.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address for jax.distributed")
    dist.add_argument("--num-processes", type=int, default=None, metavar="N")
    dist.add_argument("--process-id", type=int, default=None, metavar="I")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _named(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if name in out:
            raise ValueError(f"--model {spec}: the name {name!r} is used twice (give NAME=PATH)")
        out[name] = path
    return out


def run_serve(args) -> int:
    import uvicorn

    from instruct_jax.inference.policy import load_policy
    from instruct_jax.serve.app import ServeOptions, create_app

    if not _is_loopback(args.host) and not args.api_key:
        print(f"error: --host {args.host} is reachable from other machines: set --api-key (or "
              "INSTRUCT_JAX_API_KEY)", file=sys.stderr)
        return 2
    try:
        paths = _named(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    from instruct_jax.parallel import distributed

    plan = distributed.plan(distributed.DistributedConfig(), coordinator=args.coordinator,
                            num_processes=args.num_processes, process_id=args.process_id)
    distributed.initialize(plan)
    if jax.process_count() > 1 and len(paths) > 1:
        print("error: a multi-process server serves one model (each model's steps are collectives over every "
              "process)", file=sys.stderr)
        return 2
    policies = {}
    for name, path in paths.items():
        policies[name] = load_policy(path, slots=args.slots, max_context=args.max_context, name=name)
        print(f"serving {name} from {path} ({policies[name].engine.slots} slots, context "
              f"{policies[name].max_context}, prompt buckets {policies[name].engine.buckets})", flush=True)
    def bracketed(host: str) -> str:  # an IPv6 literal is written [addr] in a Host header
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    hosts = {bracketed(h) for h in set(LOOPBACK) | set(args.allowed_host)
             | ({args.host} if args.host not in ("0.0.0.0", "::") else set())}
    options = ServeOptions(labels=args.labels, api_key=args.api_key, allowed_hosts=tuple(sorted(hosts)),
                           max_body_bytes=args.max_body_bytes, max_image_body_bytes=args.max_image_body_bytes,
                           max_concurrent=args.max_concurrent)
    if jax.process_index() != 0:  # run the steps process 0 decides until it stops
        next(iter(policies.values())).engine.follow()
        return 0
    app = create_app(policies, options)
    print(f"open http://{args.host}:{args.port}/ (chat and ranking); API at http://{args.host}:{args.port}/v1",
          flush=True)
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, then re-raises the signal under the handler it found:
    # make that an exit that runs the `finally` below (SIGTERM's default would kill the process there).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    finally:
        for policy in policies.values():
            policy.close()  # and, multi-process, every follower
    return 0


def _exit_on_signal(signum, frame):
    raise SystemExit(0)


# ----------------------------------------------------------------------------- chat
class Conversation:
    """The turns of a terminal chat, cut from the oldest when the context fills."""

    def __init__(self, policy, system: str, max_tokens: int):
        self.policy, self.system, self.max_tokens = policy, system, max_tokens
        self.turns: list[dict] = []

    def prompt_ids(self) -> tuple[list[int], int]:
        """The prompt for the next reply and how many old turns had to go for it to fit."""
        quarter = max(16, self.policy.max_context // 4)  # a reply gets at least this much room (or max_tokens)
        room = min(self.max_tokens, quarter) if self.max_tokens else quarter
        dropped = 0
        while True:
            ids = self.policy.chat_ids(self.turns, self.system or None)
            if len(ids) + room <= self.policy.max_context and len(ids) <= self.policy.engine.buckets[-1]:
                return ids, dropped
            if len(self.turns) <= 1:
                raise ValueError(f"the message alone ({len(ids)} tokens) does not fit the context of "
                                 f"{self.policy.max_context} tokens with room for a reply")
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[1:]  # a user turn and its answer
            dropped += 2


def run_chat(args, stdin=None, stdout=None) -> int:
    from instruct_jax.inference.engine import Finish, Settings, TextEvent
    from instruct_jax.inference.policy import load_policy

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    policy = load_policy(args.model, slots=1, max_context=args.max_context or None)
    settings = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
    chat = Conversation(policy, args.system, args.max_tokens)
    interactive = stdin.isatty()
    print(f"chatting with {args.model} (context {policy.max_context} tokens); /help for commands", file=stdout)
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, value = text[1:].partition(" ")
            try:
                if command == "quit":
                    break
                elif command == "help":
                    print(CHAT_COMMANDS, file=stdout)
                elif command == "reset":
                    chat.turns = []
                    print("[conversation reset]", file=stdout)
                elif command == "system":
                    chat.system, chat.turns = value.strip(), []
                    print(f"[system prompt {'set' if chat.system else 'cleared'}; conversation reset]", file=stdout)
                elif command in ("temperature", "top_p"):
                    Settings(**{**{k: settings[k] for k in ("temperature", "top_p")}, command: float(value)}).check()
                    settings[command] = float(value)
                elif command == "max_tokens":
                    if int(value) < 0:
                        raise ValueError("max_tokens must be >= 0 (0: until the context is full)")
                    settings["max_tokens"] = chat.max_tokens = int(value)
                elif command == "settings":
                    print(f"[model {args.model}, system {chat.system!r}, " + ", ".join(
                        f"{k} {v}" for k, v in settings.items()) + f", turns {len(chat.turns)}]", file=stdout)
                else:
                    print(f"[unknown command /{command}; /help lists them]", file=stdout)
            except ValueError as e:
                print(f"[bad value for /{command}: {e}]", file=stdout)
            continue
        chat.turns.append({"role": "user", "content": text})
        try:
            ids, dropped = chat.prompt_ids()
        except ValueError as e:
            chat.turns.pop()
            print(f"[{e}]", file=stdout)
            continue
        if dropped:
            print(f"[context full: dropped the {dropped} oldest turns]", file=stdout)
        budget = policy.max_context - len(ids)
        request = policy.submit(ids, Settings(max_tokens=min(settings["max_tokens"] or budget, budget),
                                              temperature=settings["temperature"], top_p=settings["top_p"],
                                              seed=args.seed))
        reply = []
        try:
            for event in request.events():
                if isinstance(event, TextEvent):
                    reply.append(event.text)
                    print(event.text, end="", file=stdout, flush=True)
                elif isinstance(event, Finish) and event.reason == "length":
                    print(" [cut: max_tokens]", end="", file=stdout)
        except KeyboardInterrupt:
            request.cancel()
            print(" [stopped]", end="", file=stdout)
        print(file=stdout, flush=True)
        chat.turns.append({"role": "assistant", "content": "".join(reply)})
    policy.close()
    return 0


def main(args) -> int:
    try:
        return run_serve(args) if args.command == "serve" else run_chat(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
