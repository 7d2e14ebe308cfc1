"""A small gRPC client for the router: `pdserve generate --server`, the demo, bench and tests; and the
credentials a client shows a router that needs TLS or a token (router/tls.py, router/auth.py)."""
from __future__ import annotations

import concurrent.futures
import os
import time
from dataclasses import dataclass
from typing import Optional

import grpc

TOKEN_ENV = "PDSERVE_AUTH_TOKEN"  # the router reads its own token from the same variable


@dataclass(frozen=True)
class Credentials:
    token: Optional[str] = None  # sent as `authorization: Bearer TOKEN`
    ca_file: Optional[str] = None  # PEM CA of the router's certificate; TLS when set
    cert_file: Optional[str] = None  # this client's certificate and key, for a router that asks for one (mTLS)
    key_file: Optional[str] = None
    system_ca: bool = False  # TLS without ca_file: the router's certificate is checked against the system's CAs

    @property
    def tls(self) -> bool:
        return self.ca_file is not None or self.system_ca

    def channel(self, target: str, options=None, aio: bool = False):
        """A gRPC channel (grpc.aio's with `aio`) that carries these credentials on every call."""
        mod = grpc.aio if aio else grpc
        options = list(options or [])
        if self.tls:
            roots = _read(self.ca_file) if self.ca_file is not None else system_ca_certificates()
            ch = mod.secure_channel(target, grpc.ssl_channel_credentials(
                roots, _read(self.key_file), _read(self.cert_file)), options,
                **({"interceptors": self._interceptors()} if aio else {}))
        else:
            ch = mod.insecure_channel(target, options, **({"interceptors": self._interceptors()} if aio else {}))
        # a plaintext channel takes no call credentials, so the token goes as metadata through interceptors
        return ch if aio or self.token is None else grpc.intercept_channel(ch, _Bearer(self.token))

    def _interceptors(self) -> list:
        kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
        return [] if self.token is None else [kind(self.token) for kind in kinds]

    def http_headers(self) -> dict:
        return {} if self.token is None else {"Authorization": f"Bearer {self.token}"}

    def http_verify(self):
        """httpx's `verify` for an https URL: the router's CA, else the system's CAs (with this client's certificate
        when given); True (httpx's own default) when no TLS option was given."""
        if not self.tls:
            return True
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca_file)  # no cafile: the system's default CA certificates
        if self.cert_file is not None:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def system_ca_certificates() -> Optional[bytes]:
    """The system's CA certificates for a gRPC channel: OpenSSL's default bundle ($SSL_CERT_FILE, else e.g.
    /etc/ssl/certs/ca-certificates.crt), as Python's ssl and curl use. None (gRPC's own bundled roots) where there is
    no such file, or where $GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names gRPC's roots."""
    import ssl

    if os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        return None
    cafile = ssl.get_default_verify_paths().cafile  # None when the file does not exist
    return _read(cafile) if cafile else None


def add_credential_args(p) -> None:
    """The flags of every command that talks to a router."""
    p.add_argument("--token-file", default=None,
                   help=f"file holding the router's bearer token (default: ${TOKEN_ENV} when set)")
    p.add_argument("--tls", action="store_true",
                   help="connect over TLS, checking the router's certificate against the system's CA certificates "
                        "(--ca-file instead: against that CA)")
    p.add_argument("--ca-file", default=None, help="PEM CA that signed the router's certificate: connect over TLS")
    p.add_argument("--cert-file", default=None, help="this client's PEM certificate, for a router that checks it")
    p.add_argument("--key-file", default=None, help="the key of --cert-file")


def credentials_from_args(args) -> Credentials:
    from pdserve.errors import CLIError

    token = os.environ.get(TOKEN_ENV, "").strip() or None
    if args.token_file:
        try:
            token = open(args.token_file).read().strip() or None
        except OSError as e:
            raise CLIError(f"cannot read --token-file {args.token_file}: {e.strerror}") from None
    tls = args.tls or args.ca_file is not None
    if (args.cert_file is None) != (args.key_file is None) or (args.cert_file and not tls):
        raise CLIError("--cert-file and --key-file go together, and with --tls or --ca-file (TLS)")
    for flag, path in (("--ca-file", args.ca_file), ("--cert-file", args.cert_file), ("--key-file", args.key_file)):
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"{flag} {path}: no such file")
    return Credentials(token, args.ca_file, args.cert_file, args.key_file, system_ca=args.tls and args.ca_file is None)


def _read(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _with_token(details, token: str):
    md = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
    return details._replace(metadata=md)


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    def _call(self, continuation, details, request):
        return continuation(_with_token(details, self.token), request)

    intercept_unary_unary = intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = _call


class _AioBearer:
    """grpc.aio files an interceptor under the first kind of call it implements: one class per kind."""

    def __init__(self, token: str):
        self.token = token

    async def _call(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _AioUnaryUnary(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AioBearer._call


class _AioUnaryStream(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AioBearer._call


class _AioStreamUnary(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AioBearer._call


class _AioStreamStream(_AioBearer, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AioBearer._call


class ServerError(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code.name}: {message}")
        self.code = code


def request_proto(req: dict, params, request_id: str = ""):
    from pdserve.proto import pb

    sp = pb.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                           top_k=params.top_k, min_p=params.min_p, stop=params.stop,
                           stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos)
    if params.seed is not None:
        sp.seed = params.seed
    if params.logprobs is not None:
        sp.logprobs = params.logprobs
    msg = pb.GenerateRequest(request_id=request_id, chat=bool(req.get("chat")), sampling=sp)
    if req.get("prompt_token_ids") is not None:
        msg.prompt_token_ids.ids.extend(req["prompt_token_ids"])
    else:
        msg.prompt = req.get("prompt") or ""
    return msg


def stream_one(stub, msg, on_delta=None, timeout=None) -> dict:
    """Run one streaming Generate; returns the JSON-line result with timing."""
    t0 = time.monotonic()
    out = {"prompt_token_ids": None, "token_ids": [], "text": "", "finish_reason": None}
    times = []
    try:
        for resp in stub.Generate(msg, timeout=timeout):
            times.append(time.monotonic() - t0)
            if out["prompt_token_ids"] is None and resp.prompt_token_ids:
                out["prompt_token_ids"] = list(resp.prompt_token_ids)
            out["token_ids"].extend(resp.token_ids)
            out["text"] += resp.text
            if on_delta is not None:
                on_delta(resp)
            if resp.finish_reason:
                out["finish_reason"] = resp.finish_reason
                out["usage"] = {"prompt_tokens": resp.usage.prompt_tokens,
                                "completion_tokens": resp.usage.completion_tokens,
                                "cached_tokens": resp.usage.cached_tokens}
    except grpc.RpcError as e:
        raise ServerError(e.code(), e.details()) from None
    out["timing"] = {"ttft": times[0] if times else None, "token_times": times}
    return out


def generate_remote(server: str, reqs: list[dict], params, stream_to=None, prompt_ids=None,
                    credentials: Credentials = Credentials()) -> list[dict]:
    """Send every request concurrently (the cluster batches them); results in input order."""
    from pdserve.errors import EXIT_BAD_INPUT, EXIT_SERVER, CLIError
    from pdserve.proto import rpc

    channel = credentials.channel(server)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        raise CLIError(f"cannot reach a pdserve router at {server}", EXIT_SERVER) from None
    stub = rpc.PDServeStub(channel)

    def run(i):
        cb = None if stream_to is None else (lambda r: stream_to(i, r.text, bool(r.finish_reason)))
        return stream_one(stub, request_proto(reqs[i], params), cb)

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(reqs), 64))) as ex:
        futures = [ex.submit(run, i) for i in range(len(reqs))]
        results = []
        for f in futures:
            try:
                r = f.result()
            except ServerError as e:
                code = EXIT_BAD_INPUT if e.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_SERVER
                raise CLIError(str(e), code) from None
            results.append(r)
    channel.close()
    for r in results:
        r.pop("timing", None)
    return results
