"""`pdserve` command line: generate, serve, scale, demo, bench, eval.

Exit codes: 0 ok, 2 bad input (argument, request or config), 3 model cannot be loaded,
4 server unreachable or failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pdserve.config import PRECISIONS
from pdserve.errors import EXIT_BAD_INPUT, EXIT_MODEL, CLIError


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    ap.add_argument("--version", action="version", version=f"pdserve {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text in this process (or through a server with --server)")
    g.add_argument("prompt", nargs="?", help="a prompt (or use --input)")
    g.add_argument("--input", help="JSONL file: {\"prompt\": ..., \"chat\": bool} or {\"prompt_token_ids\": [...]}")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    _sampling_args(g)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="auto")
    g.add_argument("--model", default=None, help="HF model directory or .gguf file (default: embedded SmolLM2)")
    g.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="linear-layer precision of this in-process engine")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt, in input order")
    g.add_argument("--server", default=None, help="HOST:PORT of a pdserve router: send requests over gRPC")
    from pdserve.client import add_credential_args

    add_credential_args(g.add_argument_group("with --server, a router that needs TLS or a token"))
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    from pdserve import commands  # serve, scale and the tools (demo, bench, eval)

    commands.register(sub)
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def read_requests(args) -> list[dict]:
    if args.input and args.prompt:
        raise CLIError("give a PROMPT or --input FILE, not both")
    if args.input:
        try:
            lines = open(args.input).read().splitlines()
        except OSError as e:
            raise CLIError(f"cannot read {args.input}: {e.strerror}") from None
        reqs = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{args.input}:{n}: not JSON: {e.msg}") from None
            if not isinstance(obj, dict) or not ({"prompt", "prompt_token_ids"} & set(obj)):
                raise CLIError(f"{args.input}:{n}: expected an object with prompt or prompt_token_ids")
            unknown = set(obj) - {"prompt", "prompt_token_ids", "chat"}
            if unknown:
                raise CLIError(f"{args.input}:{n}: unknown field(s) {', '.join(sorted(unknown))}")
            reqs.append({"prompt": obj.get("prompt"), "prompt_token_ids": obj.get("prompt_token_ids"),
                         "chat": bool(obj.get("chat", args.chat))})
        if not reqs:
            raise CLIError(f"{args.input} holds no requests")
        return reqs
    if args.prompt is None:
        if sys.stdin.isatty():
            raise CLIError("no prompt: give PROMPT or --input FILE")
        args.prompt = sys.stdin.read()
    return [{"prompt": args.prompt, "prompt_token_ids": None, "chat": args.chat}]


def sampling_from_args(args):
    from pdserve.engine.sequence import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                          ignore_eos=args.ignore_eos)


class StreamPrinter:
    """Prints results in input order while they are generated in one batch: the current prompt's
    text streams live; later prompts' text is buffered until their turn."""

    def __init__(self, n: int, out=sys.stdout):
        self.buf = [""] * n
        self.done = [False] * n
        self.cur = 0
        self.out = out
        self.n = n

    def __call__(self, i: int, new_text: str, finished: bool) -> None:
        self.buf[i] += new_text
        self.done[i] = self.done[i] or finished
        while self.cur < self.n:
            if self.buf[self.cur]:
                self.out.write(self.buf[self.cur])
                self.buf[self.cur] = ""
            if not self.done[self.cur]:
                break
            self.out.write("\n" if self.n == 1 else "\n\n")
            self.cur += 1
        self.out.flush()


def cmd_generate(args) -> int:
    from pdserve.errors import InvalidRequest

    reqs = read_requests(args)
    try:
        params = sampling_from_args(args)
    except InvalidRequest as e:
        raise CLIError(str(e)) from None
    if args.server:
        from pdserve.client import credentials_from_args, generate_remote

        results = generate_remote(args.server, reqs, params, stream_to=None if args.json else StreamPrinter(len(reqs)),
                                  credentials=credentials_from_args(args))
    else:
        results = generate_local(args, reqs, params)
    if args.json:
        for r in results:
            print(json.dumps(r), flush=True)
    return 0


def generate_local(args, reqs, params) -> list[dict]:
    from pdserve.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.errors import InvalidRequest, ModelLoadError

    kw = {}
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.block_size:
        kw["block_size"] = args.block_size
    try:
        engine = LLMEngine(args.model, args.dtype, EngineConfig(**kw), precision=args.precision,
                           progress=sys.stderr.isatty())
    except ModelLoadError as e:
        raise CLIError(str(e), EXIT_MODEL) from None
    from pdserve.errors import NoFreeBlocks

    printer = None if args.json else StreamPrinter(len(reqs))
    on_output = None if printer is None else (lambda i, o: printer(i, o.new_text, o.finished))
    try:
        prompts = [engine.tokenize(r["prompt"], r["prompt_token_ids"], r["chat"]) for r in reqs]
        return engine.generate([(p, params) for p in prompts], on_output=on_output)
    except (InvalidRequest, NoFreeBlocks) as e:
        raise CLIError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # gRPC's fork handlers serve a child that goes on using gRPC after fork(); no process of ours does (Ray starts
    # its own with fork, a preexec_fn, then exec). Left on, a fork while gRPC's threads run (ray.init beside the
    # router's started server) may restart gRPC's poller in the child, which then aborts before its exec
    # (ev_epoll1_linux.cc "Check failed: next_worker->state == KICKED", SIGABRT) and a Ray component never starts;
    # each fork also logs "fork_posix.cc ... skipping fork() handlers". gRPC reads this when first imported, which
    # is after this line; Ray's processes and the workers inherit it.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    args = build_parser().parse_args(argv)
    from pdserve.config import ConfigError

    try:
        return args.func(args) or 0
    except CLIError as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except ConfigError as e:
        print(f"pdserve {args.command}: config error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
