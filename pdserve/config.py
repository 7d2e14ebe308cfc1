"""The one config tree. Its YAML form is what `pdserve serve --config` reads and what the Helm
chart renders from its values; unknown keys are errors, so a typo never silently becomes a default.

    mode:        disaggregated | colocated
    model:       {path, dtype, max_model_len, load_format}
    engine:      {block_size, num_blocks, kv_cache_memory_gb, max_num_seqs, max_num_batched_tokens,
                  prompt_chunk_tokens, device, fp8_attention_min_tokens, overlap_schedule, step_log}
    prefill:     {replicas, precision, num_gpus, num_cpus, resources}
    decode:      {replicas, precision, num_gpus, num_cpus, resources}
    kv_transfer: {dtype, backend, lease_seconds, refresh_sink_tokens}
    router:      {host, port, http_port, metrics_port, policy, max_queued_requests, max_request_id_bytes,
                  max_cache_namespace_bytes, liveness_timeout_s, call_timeout_s, start_timeout_s,
                  max_migrations, restart_backoff_s, drain_timeout_s, tls_cert_file, tls_key_file,
                  tls_client_ca_file, auth_token_file, ...}
    autoscaling: {enabled, interval_s, cooldown_s, target_ttft_s, target_itl_s, prefill: {...}, decode: {...},
                  prefill_per_decode}
    ray:         {address, num_cpus}
    tracing:     {otlp_endpoint, service_name, sample_ratio}
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import yaml

# the enumerations, defined once; every layer may import them from here
DTYPES = ("float32", "bfloat16")  # compute dtypes of unquantized layers ("auto" picks one)
PRECISIONS = ("bf16", "fp8", "nvfp4")  # GEMM precisions of a pool ("auto" picks by GPU)
KV_WIRE_DTYPES = ("bf16", "fp8")  # KV on the wire: the cache's own dtype, or e4m3 + per-token-per-head scales
POLICIES = ("cache_aware", "least_loaded", "round_robin")
LOAD_FORMATS = ("auto", "dummy")
# disaggregated: prefill pool -> KV transfer -> decode pool. colocated: no prefill pool; each decode-pool worker
# prefills and decodes its requests in one engine (the baseline disaggregation is measured against)
MODES = ("disaggregated", "colocated")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted path."""


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF directory or .gguf file; None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # compute dtype of unquantized layers; auto: bfloat16 on CUDA, float32 on CPU
    max_model_len: Optional[int] = None  # defaults to the checkpoint's context length
    # auto: the checkpoint's weights; dummy: random weights of its shape made on the device (benchmarks of
    # real shapes without the weights; the directory needs only config.json and the tokenizer)
    load_format: str = "auto"

    def validate(self, at: str) -> None:
        _choice(at + ".dtype", self.dtype, DTYPES + ("auto",))
        _choice(at + ".load_format", self.load_format, LOAD_FORMATS)
        _positive(at + ".max_model_len", self.max_model_len, allow_none=True)


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: Optional[int] = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024  # token budget of one scheduler step (chunked prefill)
    # while several prompts compete for a step, those that can finish within this many tokens go first and the oldest
    # gets at least this many (engine/prompt_chunks.py): a short prompt is not queued behind every chunk of a long
    # one. None: max_num_batched_tokens // 4
    prompt_chunk_tokens: Optional[int] = None
    device: str = "auto"  # auto: cuda when available, else cpu
    # an fp8 pool runs attention's matmuls in fp8 on steps whose longest prompt chunk has at least this many
    # tokens (kernels/attention_fp8.py); 0: every step with a prompt chunk. Shorter chunks keep bf16
    # attention: on an H100 the fp8 kernel is 1.4x faster at 8192 tokens, 1.1x at 2048, and at 512 its
    # three launches cost more host time than it saves (docs/bench/prefill.md)
    fp8_attention_min_tokens: int = 2048
    # the engine launches model step N+1 before it reads step N's sampled tokens, and detokenizes and checks
    # stops for N while the device runs N+1 (engine/engine.py); the outputs are the same either way. None
    # (auto): on for CUDA; off on CPU, where the host runs the model itself and nothing would overlap
    overlap_schedule: Optional[bool] = None
    # a directory: each engine appends a JSON line per request added and per model step (composition, host and
    # device times; engine/step_log.py) to <role>-<pid>.jsonl there. For measuring (benchmarks/step_timeline.py),
    # not for production: it grows without bound. None: off
    step_log: Optional[str] = None

    def validate(self, at: str) -> None:
        _positive(at + ".block_size", self.block_size)
        if self.step_log is not None and (not isinstance(self.step_log, str) or not self.step_log):
            raise ConfigError(f"{at}.step_log: expected a directory path or null, got {self.step_log!r}")
        if self.overlap_schedule is not None and not isinstance(self.overlap_schedule, bool):
            raise ConfigError(f"{at}.overlap_schedule: expected true, false or null (auto), "
                              f"got {self.overlap_schedule!r}")
        _count(at + ".fp8_attention_min_tokens", self.fp8_attention_min_tokens, "0: every prompt step")
        _positive(at + ".num_blocks", self.num_blocks, allow_none=True)
        _positive(at + ".kv_cache_memory_gb", self.kv_cache_memory_gb)
        _positive(at + ".max_num_seqs", self.max_num_seqs)
        _positive(at + ".max_num_batched_tokens", self.max_num_batched_tokens)
        _positive(at + ".prompt_chunk_tokens", self.prompt_chunk_tokens, allow_none=True)
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"{at}.device: expected auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class PoolConfig:
    replicas: int = 1
    precision: str = "auto"  # prefill auto: nvfp4 on Blackwell, fp8 on Hopper, bf16 elsewhere
    # GPUs per actor (Ray's num_gpus; a fraction shares one GPU between actors). None: a whole GPU each where the
    # Ray cluster has GPUs and the pool's engine may use them, else 0 (gpus_per_actor)
    num_gpus: Optional[float] = None
    num_cpus: float = 1.0  # per actor
    resources: dict = field(default_factory=dict)  # Ray custom resources that pin actors to pods
    engine: dict = field(default_factory=dict)  # per-pool overrides of `engine:` keys

    def validate(self, at: str) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 0:
            raise ConfigError(f"{at}.replicas: expected an integer >= 0, got {self.replicas!r}")
        _choice(at + ".precision", self.precision, PRECISIONS + ("auto",))
        if (self.num_gpus is not None and self.num_gpus < 0) or self.num_cpus < 0:
            raise ConfigError(f"{at}: num_gpus and num_cpus must be >= 0")
        _check_fields(EngineConfig, self.engine, at + ".engine")


@dataclass
class KVTransferConfig:
    dtype: str = "bf16"  # bf16: the cache's own dtype on the wire; fp8: e4m3 + per-token-per-head scales
    backend: str = "nixl"  # NIXL (UCX; RDMA between nodes): the one transport
    lease_seconds: float = 30.0  # prefill frees exported blocks if no pull completes in time
    # decode recomputes the KV of this many first prompt tokens (attention sinks) when the KV it got
    # differs from its own (fp8 wire, or another prefill precision); 0: never (decode_worker/worker.py)
    refresh_sink_tokens: int = 4

    def validate(self, at: str) -> None:
        _choice(at + ".dtype", self.dtype, KV_WIRE_DTYPES)
        _choice(at + ".backend", self.backend, ("nixl",))
        _positive(at + ".lease_seconds", self.lease_seconds)
        _count(at + ".refresh_sink_tokens", self.refresh_sink_tokens, "0 disables")


@dataclass
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: Optional[int] = 8000  # OpenAI-compatible HTTP (and /metrics, /health, /ready); None: off
    metrics_port: Optional[int] = 9400  # Prometheus /metrics alone (the chart's ServiceMonitor); None: off
    policy: str = "cache_aware"
    max_queued_requests: int = 1024  # beyond this, RESOURCE_EXHAUSTED
    load_balance_slack: float = 2.0  # cache-aware: skip a worker whose load exceeds min load * slack + 1
    # UTF-8 bytes; longer is INVALID_ARGUMENT (HTTP 400): a request id is echoed in every streamed message,
    # and the namespace is hashed into every prompt block
    max_request_id_bytes: int = 256
    max_cache_namespace_bytes: int = 1024
    # toward the workers (router/cluster.py, router/dispatch.py): a worker whose stats probe has not
    # answered for liveness_timeout_s is UNHEALTHY (routed around, what it holds fails over); no single
    # wait on a worker (a prefill, the next decode delta, a drain) lasts past call_timeout_s; a new
    # worker has start_timeout_s to load and answer; a request moves to another worker at most
    # max_migrations times when its worker dies or stalls; a dead worker is replaced after
    # restart_backoff_s, doubling per failed attempt up to 60 s
    liveness_timeout_s: float = 5.0
    call_timeout_s: float = 120.0
    start_timeout_s: float = 600.0
    max_migrations: int = 3
    restart_backoff_s: float = 1.0
    # on SIGTERM/SIGINT the router stops admitting (UNAVAILABLE / HTTP 503, health NOT_SERVING) and gives the
    # requests in flight this long to finish; those still running then end with finish_reason "abort"
    drain_timeout_s: float = 30.0
    # TLS on the gRPC and OpenAI HTTP ports (PEM files); with tls_client_ca_file, clients must present a
    # certificate that CA signed (mTLS). The metrics port stays plain HTTP (router/tls.py says why)
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    tls_client_ca_file: Optional[str] = None
    # a bearer token every gRPC call and HTTP request must carry (`authorization: Bearer TOKEN`), but health
    # checks (router/auth.py). Read from this file, else from $PDSERVE_AUTH_TOKEN; never from the config itself,
    # which is often a ConfigMap or checked in
    auth_token_file: Optional[str] = None

    def validate(self, at: str) -> None:
        for name in ("port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not (0 <= port < 65536):
                raise ConfigError(f"{at}.{name}: {port} is not a TCP port")
        _positive(at + ".max_request_id_bytes", self.max_request_id_bytes)
        _positive(at + ".max_cache_namespace_bytes", self.max_cache_namespace_bytes)
        for name in ("liveness_timeout_s", "call_timeout_s", "start_timeout_s", "restart_backoff_s", "drain_timeout_s"):
            _positive(f"{at}.{name}", getattr(self, name))
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError(f"{at}.tls_cert_file and {at}.tls_key_file: set both (TLS) or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError(f"{at}.tls_client_ca_file needs {at}.tls_cert_file and tls_key_file: client "
                              "certificates are checked only over TLS")
        _count(at + ".max_migrations", self.max_migrations, "0: a request fails with its worker")
        _choice(at + ".policy", self.policy, POLICIES)
        _positive(at + ".max_queued_requests", self.max_queued_requests)


@dataclass
class PoolScaling:
    min_replicas: int = 1
    max_replicas: int = 4
    target: float = 1.0  # prefill: queue depth per worker; decode: KV usage fraction per worker

    def validate(self, at: str) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(self.min_replicas, 1):
            raise ConfigError(f"{at}: need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        _positive(at + ".target", self.target)


@dataclass
class AutoscalingConfig:
    enabled: bool = False
    interval_s: float = 5.0
    cooldown_s: float = 60.0
    target_ttft_s: float = 1.0
    target_itl_s: float = 0.1
    prefill: PoolScaling = field(default_factory=lambda: PoolScaling(target=4.0))
    decode: PoolScaling = field(default_factory=lambda: PoolScaling(target=0.8))
    # the P:D ratio `pdserve plan` recommends: when set, the prefill pool follows the decode pool at this many
    # prefill replicas per decode replica (rounded up, within its bounds) instead of its own queue and TTFT
    prefill_per_decode: Optional[float] = None

    def validate(self, at: str) -> None:
        self.prefill.validate(at + ".prefill")
        self.decode.validate(at + ".decode")
        _positive(at + ".prefill_per_decode", self.prefill_per_decode, allow_none=True)


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start a local Ray; "auto" or host:port joins one
    num_cpus: Optional[int] = None  # for a local Ray only


@dataclass
class TracingConfig:
    # OpenTelemetry spans of every request (router, prefill and decode workers; pdserve/tracing.py), exported over
    # OTLP/gRPC to this receiver: http://HOST:PORT (plaintext, e.g. http://otel-collector:4317) or https:// (TLS).
    # None: tracing off, and nothing of OpenTelemetry is imported
    otlp_endpoint: Optional[str] = None
    service_name: str = "pdserve"  # each process reports as <service_name>-router, -prefill or -decode
    # share of the requests traced among those whose caller sent no traceparent (a traceparent decides itself)
    sample_ratio: float = 1.0

    def validate(self, at: str) -> None:
        if self.otlp_endpoint is not None:
            _endpoint(at + ".otlp_endpoint", self.otlp_endpoint)
        if not isinstance(self.service_name, str) or not self.service_name:
            raise ConfigError(f"{at}.service_name: expected a non-empty string, got {self.service_name!r}")
        ratio = self.sample_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ConfigError(f"{at}.sample_ratio: expected a number in [0, 1], got {ratio!r}")


@dataclass
class Config:
    mode: str = "disaggregated"
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=lambda: PoolConfig(precision="bf16"))
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)

    def validate(self) -> "Config":
        _choice("mode", self.mode, MODES)
        if self.mode == "colocated" and (self.prefill.replicas or self.autoscaling.enabled):
            raise ConfigError("mode colocated runs no prefill pool: set prefill.replicas to 0 (and leave "
                              "autoscaling off; it scales the two pools of a disaggregated cluster)")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate(f.name)
        return self

    @property
    def colocated(self) -> bool:
        return self.mode == "colocated"

    def roles(self) -> tuple[str, ...]:
        """The pools this cluster serves with: both, or only the decode pool when colocated."""
        return ("decode",) if self.colocated else ("prefill", "decode")

    def gpus_per_actor(self, role: str, cluster_gpus: float) -> float:
        """What one actor of the pool asks Ray for: its num_gpus, or (None) 1 when the cluster has GPUs and the
        pool's engine is not pinned to the CPU, else 0."""
        pool = getattr(self, role)
        if pool.num_gpus is not None:
            return pool.num_gpus
        return 1.0 if cluster_gpus > 0 and self.pool_engine(role).device != "cpu" else 0.0

    def pool_engine(self, role: str) -> EngineConfig:
        """The engine config one pool runs with: `engine:` overlaid with `<role>.engine:`."""
        pool = getattr(self, role)
        return dataclasses.replace(self.engine, **pool.engine)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Read a YAML config (None: all defaults), apply dotted overrides, validate."""
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: the top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(Config, data, "").validate()


def from_dict(cls, data: Any, at: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{at or 'config'}: expected a mapping, got {type(data).__name__}")
    _check_fields(cls, data, at)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{at}.{f.name}" if at else f.name)
    return cls(**kwargs)


def _check_fields(cls, data: dict, at: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{at or 'config'}: unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(names))}")


def _coerce(tp, value, at: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, at)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{at}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{at}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{at}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{at}: expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _choice(at: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{at}: expected one of {', '.join(choices)}, got {value!r}")


def _count(at: str, value, zero_means: str) -> None:
    """An integer >= 0, where 0 means `zero_means`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{at}: expected an integer >= 0 ({zero_means}), got {value!r}")


def _positive(at: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{at}: expected a positive number, got {value!r}")


def _endpoint(at: str, value) -> None:
    """An OTLP/gRPC receiver's URL: the scheme says plaintext or TLS, and a port is needed (gRPC's default, 443,
    is not OTLP's 4317)."""
    want = "expected http://HOST:PORT or https://HOST:PORT (OTLP/gRPC, e.g. http://otel-collector:4317)"
    if not isinstance(value, str):
        raise ConfigError(f"{at}: {want}, got {value!r}")
    url = urlsplit(value)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme not in ("http", "https") or not url.hostname or port is None or url.path not in ("", "/"):
        raise ConfigError(f"{at}: {want}, got {value!r}")
