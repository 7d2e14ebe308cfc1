"""The router's TLS and token settings, in process: the config's rules, the files read and checked before anything
starts, and mutual TLS on real gRPC and HTTP servers (the router's own interceptors, health service and HTTP
server class) with certificates made here."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.client import Credentials
from pdserve.config import ConfigError, load_config
from pdserve.router.auth import TokenInterceptor, http_guard, load_token
from pdserve.router.cluster import Cluster
from pdserve.router.decoding import DecodingInterceptor
from pdserve.router.http_server import HTTPServer, metrics_app
from pdserve.router.listeners import tcp_socket
from pdserve.router.metrics import Metrics
from pdserve.router.tls import grpc_credentials, load_tls, uvicorn_options
from pdserve.testing.certs import CA


def _router(**keys):
    return load_config(None, {f"router.{k}": v for k, v in keys.items()})


@contextlib.asynccontextmanager
async def _doors(tls, token: str | None = None):
    """A gRPC health service and the metrics HTTP server on 127.0.0.1 with the router's TLS (and token guard);
    yields their ports."""
    grpc_server = grpc.aio.server(interceptors=[TokenInterceptor(token), DecodingInterceptor()] if token else None)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_secure_port("127.0.0.1:0", grpc_credentials(tls))
    await grpc_server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    app = metrics_app(Metrics(Cluster(_router()), "m"))  # no Ray: a cluster not started has empty pools
    web = HTTPServer(http_guard(app, token) if token else app, tcp_socket("127.0.0.1", 0, "http_port"),
                     uvicorn_options(tls))
    await web.start()
    try:
        yield port, web.port
    finally:
        await web.stop()
        await grpc_server.stop(0)


async def _knock(creds: Credentials, grpc_port: int, http_port: int) -> tuple:
    """(the health check's status or the gRPC error code, the metrics response or the HTTP error's type name)."""
    async with creds.channel(f"127.0.0.1:{grpc_port}", aio=True) as ch:
        try:
            g = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)).status
        except grpc.aio.AioRpcError as e:
            g = e.code()
    async with httpx.AsyncClient(verify=creds.http_verify(), headers=creds.http_headers()) as h:
        try:
            r = await h.get(f"https://127.0.0.1:{http_port}/metrics", timeout=10)
        except httpx.HTTPError as e:
            r = type(e).__name__
    return g, r


def test_config_rules_for_tls_and_the_token():
    with pytest.raises(ConfigError, match="set both"):
        _router(tls_cert_file="/c.pem")
    with pytest.raises(ConfigError, match="tls_client_ca_file needs"):
        _router(tls_client_ca_file="/ca.pem")
    with pytest.raises(ConfigError, match="drain_timeout_s"):
        _router(drain_timeout_s=0)
    with pytest.raises(ConfigError, match="unknown key.*auth_token"):
        _router(auth_token="inline")  # a token never sits in the config itself
    assert _router().router.drain_timeout_s == 30.0 and load_tls(_router()) is None


def test_tls_files_are_checked_before_anything_starts(tmp_path):
    ca = CA(tmp_path)
    good, other = ca.server("good"), ca.server("other")
    assert load_tls(_router(tls_cert_file=good.cert_file, tls_key_file=good.key_file)).client_ca is None
    with pytest.raises(ConfigError, match="router.tls_key_file: cannot read /missing.key"):
        load_tls(_router(tls_cert_file=good.cert_file, tls_key_file="/missing.key"))
    with pytest.raises(ConfigError, match="matching private key"):  # a key of another certificate
        load_tls(_router(tls_cert_file=good.cert_file, tls_key_file=other.key_file))
    with pytest.raises(ConfigError, match="router.tls_client_ca_file: not PEM"):
        load_tls(_router(tls_cert_file=good.cert_file, tls_key_file=good.key_file, tls_client_ca_file=good.key_file))


def test_the_token_comes_from_its_file_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("PDSERVE_AUTH_TOKEN", raising=False)
    assert load_token(_router()) is None
    monkeypatch.setenv("PDSERVE_AUTH_TOKEN", " from-env\n")
    assert load_token(_router()) == "from-env"
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert load_token(_router(auth_token_file=str(f))) == "from-file"
    f.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_token(_router(auth_token_file=str(f)))
    with pytest.raises(ConfigError, match="cannot read"):
        load_token(_router(auth_token_file=str(tmp_path / "none")))


def test_mutual_tls_on_both_doors(tmp_path):
    """With tls_client_ca_file, a client needs a certificate from that CA, on gRPC and on HTTP."""
    ca, stranger = CA(tmp_path), CA(tmp_path, "stranger CA")
    server = ca.server()
    client, foreign = ca.client("client"), stranger.client("foreign")
    tls = load_tls(_router(tls_cert_file=server.cert_file, tls_key_file=server.key_file,
                           tls_client_ca_file=ca.cert_file))

    async def run():
        got = {}
        async with _doors(tls, "t0k") as ports:
            for name, creds in (("cert", Credentials("t0k", ca.cert_file, client.cert_file, client.key_file)),
                                ("no cert", Credentials("t0k", ca.cert_file)),
                                ("foreign cert", Credentials("t0k", ca.cert_file, foreign.cert_file,
                                                             foreign.key_file))):
                g, r = await _knock(creds, *ports)
                got[name, "grpc"], got[name, "http"] = g, r if isinstance(r, str) else r.text
        return got

    got = asyncio.run(run())
    assert got["cert", "grpc"] == health_pb2.HealthCheckResponse.SERVING
    assert "pdserve_requests" in got["cert", "http"]
    for name in ("no cert", "foreign cert"):
        assert got[name, "grpc"] == grpc.StatusCode.UNAVAILABLE, got
        assert got[name, "http"] in ("ConnectError", "ReadError", "RemoteProtocolError"), got


def test_client_tls_with_the_systems_ca_certificates(tmp_path, monkeypatch):
    """`--tls` without --ca-file checks the router's certificate against the system's CA certificates (OpenSSL's
    default bundle; here $SSL_CERT_FILE, so no real store and no network): refused on gRPC and HTTP while they hold
    no CA of it, accepted once they do."""
    from pdserve.cli import build_parser
    from pdserve.client import credentials_from_args, system_ca_certificates
    from pdserve.errors import CLIError

    def creds_of(*flags):
        return credentials_from_args(build_parser().parse_args(["generate", "--server", "127.0.0.1:1", *flags, "hi"]))

    ca, stranger = CA(tmp_path), CA(tmp_path, "stranger CA")
    server, client = ca.server(), ca.client()
    monkeypatch.delenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", raising=False)
    monkeypatch.delenv("PDSERVE_AUTH_TOKEN", raising=False)
    creds = creds_of("--tls")
    assert creds.tls and creds.system_ca and creds.ca_file is None
    assert not creds_of().tls and creds_of("--ca-file", ca.cert_file).tls
    assert not creds_of("--tls", "--ca-file", ca.cert_file).system_ca  # a CA file names the roots itself
    assert creds_of("--tls", "--cert-file", client.cert_file, "--key-file", client.key_file).cert_file
    with pytest.raises(CLIError, match="with --tls or --ca-file"):
        creds_of("--cert-file", client.cert_file, "--key-file", client.key_file)
    tls = load_tls(_router(tls_cert_file=server.cert_file, tls_key_file=server.key_file))

    async def run():
        got = {}
        async with _doors(tls) as ports:
            for roots, bundle in (("stranger", stranger.cert_file), ("ca", ca.cert_file)):
                monkeypatch.setenv("SSL_CERT_FILE", bundle)  # what the system's CAs are, for OpenSSL
                assert system_ca_certificates() == Path(bundle).read_bytes()
                g, r = await _knock(creds, *ports)
                got[roots, "grpc"], got[roots, "http"] = g, r if isinstance(r, str) else r.status_code
        return got

    got = asyncio.run(run())
    assert got["stranger", "grpc"] == grpc.StatusCode.UNAVAILABLE, got
    assert got["stranger", "http"] == "ConnectError", got
    assert got["ca", "grpc"] == health_pb2.HealthCheckResponse.SERVING, got
    assert got["ca", "http"] == 200, got
