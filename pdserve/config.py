"""The one config tree. Its YAML form is what `pdserve serve --config` reads and what the Helm
chart renders from its values; unknown keys are errors, so a typo never silently becomes a default.

    model:       {path, dtype, max_model_len}
    engine:      {block_size, num_blocks, kv_cache_memory_gb, max_num_seqs, max_num_batched_tokens, device,
                  fp8_attention_min_tokens}
    prefill:     {replicas, precision, num_gpus, num_cpus, resources}
    decode:      {replicas, precision, num_gpus, num_cpus, resources}
    kv_transfer: {dtype, backend, lease_seconds, refresh_sink_tokens}
    router:      {host, port, metrics_port, policy, max_queued_requests, ...}
    autoscaling: {enabled, interval_s, cooldown_s, prefill: {...}, decode: {...}}
    ray:         {address, num_cpus}
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

# the enumerations, defined once; every layer may import them from here
DTYPES = ("float32", "bfloat16")  # compute dtypes of unquantized layers ("auto" picks one)
PRECISIONS = ("bf16", "fp8", "nvfp4")  # GEMM precisions of a pool ("auto" picks by GPU)
KV_WIRE_DTYPES = ("bf16", "fp8")  # KV on the wire: the cache's own dtype, or e4m3 + per-token-per-head scales
POLICIES = ("cache_aware", "least_loaded", "round_robin")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted path."""


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF directory or .gguf file; None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # compute dtype of unquantized layers; auto: bfloat16 on CUDA, float32 on CPU
    max_model_len: Optional[int] = None  # defaults to the checkpoint's context length

    def validate(self, at: str) -> None:
        _choice(at + ".dtype", self.dtype, DTYPES + ("auto",))
        _positive(at + ".max_model_len", self.max_model_len, allow_none=True)


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: Optional[int] = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024  # token budget of one scheduler step (chunked prefill)
    device: str = "auto"  # auto: cuda when available, else cpu
    # an fp8 pool runs attention's matmuls in fp8 on steps whose longest prompt chunk has at least this many
    # tokens (kernels/attention_fp8.py); 0: every step with a prompt chunk. Shorter chunks keep bf16
    # attention: on an H100 the fp8 kernel is 1.4x faster at 8192 tokens, 1.1x at 2048, and at 512 its
    # three launches cost more host time than it saves (docs/bench/prefill.md)
    fp8_attention_min_tokens: int = 2048

    def validate(self, at: str) -> None:
        _positive(at + ".block_size", self.block_size)
        _count(at + ".fp8_attention_min_tokens", self.fp8_attention_min_tokens, "0: every prompt step")
        _positive(at + ".num_blocks", self.num_blocks, allow_none=True)
        _positive(at + ".kv_cache_memory_gb", self.kv_cache_memory_gb)
        _positive(at + ".max_num_seqs", self.max_num_seqs)
        _positive(at + ".max_num_batched_tokens", self.max_num_batched_tokens)
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"{at}.device: expected auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class PoolConfig:
    replicas: int = 1
    precision: str = "auto"  # prefill auto: nvfp4 on Blackwell, fp8 on Hopper, bf16 elsewhere
    num_gpus: float = 0.0  # per actor; 0 on CPU
    num_cpus: float = 1.0  # per actor
    resources: dict = field(default_factory=dict)  # Ray custom resources that pin actors to pods
    engine: dict = field(default_factory=dict)  # per-pool overrides of `engine:` keys

    def validate(self, at: str) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 0:
            raise ConfigError(f"{at}.replicas: expected an integer >= 0, got {self.replicas!r}")
        _choice(at + ".precision", self.precision, PRECISIONS + ("auto",))
        if self.num_gpus < 0 or self.num_cpus < 0:
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
    metrics_port: Optional[int] = 9400  # Prometheus /metrics (and OpenAI HTTP when enabled); None: off
    policy: str = "cache_aware"
    max_queued_requests: int = 1024  # beyond this, RESOURCE_EXHAUSTED
    load_balance_slack: float = 2.0  # cache-aware: skip a worker whose load exceeds min load * slack + 1

    def validate(self, at: str) -> None:
        if not (0 <= self.port < 65536):
            raise ConfigError(f"{at}.port: {self.port} is not a TCP port")
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

    def validate(self, at: str) -> None:
        self.prefill.validate(at + ".prefill")
        self.decode.validate(at + ".decode")


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start a local Ray; "auto" or host:port joins one
    num_cpus: Optional[int] = None  # for a local Ray only


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=lambda: PoolConfig(precision="bf16"))
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate(f.name)
        return self

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
