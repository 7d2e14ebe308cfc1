"""TLS on the router's two public doors (gRPC and OpenAI HTTP), from the PEM files the config names:
router.tls_cert_file and tls_key_file (the server's certificate chain and key), and optionally
tls_client_ca_file, which makes both doors require a client certificate that CA signed (mTLS).

The files are read and checked once, at start and before Ray or the model load, so a wrong path or a key that
does not match its certificate is a one-line config error; a renewed certificate needs a restart.

The metrics port (router.metrics_port) stays plain HTTP: it serves aggregate counters and the /health and /ready
of probes, and kubelet can neither present a client certificate nor speak TLS in a gRPC probe. Keep it on a
network only Prometheus and the kubelet reach (the chart binds it in the pod, behind its Service).
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc

from pdserve.config import Config, ConfigError


@dataclass(frozen=True)
class TLS:
    cert_file: str
    key_file: str
    client_ca_file: Optional[str]
    cert: bytes
    key: bytes
    client_ca: Optional[bytes]


def load_tls(config: Config) -> Optional[TLS]:
    """The router's TLS material, checked, or None (plaintext)."""
    r = config.router
    if r.tls_cert_file is None:
        return None
    cert, key = _read("tls_cert_file", r.tls_cert_file), _read("tls_key_file", r.tls_key_file)
    ca = None if r.tls_client_ca_file is None else _read("tls_client_ca_file", r.tls_client_ca_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(r.tls_cert_file, r.tls_key_file)
    except ssl.SSLError as e:
        raise ConfigError(f"router.tls_cert_file / tls_key_file: not a PEM certificate chain and its matching "
                          f"private key ({e.reason or e})") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(r.tls_client_ca_file)
        except ssl.SSLError as e:
            raise ConfigError(f"router.tls_client_ca_file: not PEM CA certificates ({e.reason or e})") from None
    return TLS(r.tls_cert_file, r.tls_key_file, r.tls_client_ca_file, cert, key, ca)


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"router.{key}: cannot read {path}: {e.strerror}") from None


def grpc_credentials(tls: TLS) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.client_ca,
                                       require_client_auth=tls.client_ca is not None)


def uvicorn_options(tls: Optional[TLS]) -> dict:
    """uvicorn.Config's TLS arguments (none for plaintext)."""
    if tls is None:
        return {}
    opts = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    if tls.client_ca_file is not None:
        opts.update(ssl_ca_certs=tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return opts
