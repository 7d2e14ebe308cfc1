"""The config tree's rules that are not a plain type check: deployment mode, GPU placement defaults."""
from __future__ import annotations

import pytest

from pdserve.config import ConfigError, load_config


def test_colocated_config_needs_an_empty_prefill_pool():
    with pytest.raises(ConfigError, match="prefill.replicas to 0"):
        load_config(overrides={"mode": "colocated"})
    with pytest.raises(ConfigError, match="mode: expected one of"):
        load_config(overrides={"mode": "both"})
    assert load_config(overrides={"mode": "colocated", "prefill.replicas": 0}).roles() == ("decode",)


def test_actors_own_whole_gpus_by_default_and_none_without_gpus():
    c = load_config()
    assert c.prefill.num_gpus is None and c.decode.num_gpus is None
    assert (c.gpus_per_actor("prefill", 8.0), c.gpus_per_actor("decode", 8.0)) == (1.0, 1.0)
    assert c.gpus_per_actor("decode", 0.0) == 0.0
    pinned = load_config(overrides={"decode.engine": {"device": "cpu"}, "prefill.num_gpus": 0.5})
    assert pinned.gpus_per_actor("decode", 8.0) == 0.0  # its engine may not use them
    assert pinned.gpus_per_actor("prefill", 0.0) == 0.5  # as configured, even where Ray has none
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_config(overrides={"prefill.num_gpus": -1})


def test_tracing_is_off_by_default_and_its_endpoint_must_be_an_otlp_grpc_url():
    assert load_config().tracing.otlp_endpoint is None
    on = load_config(overrides={"tracing.otlp_endpoint": "http://otel-collector.observability:4317",
                                "tracing.sample_ratio": 0.25})
    assert (on.tracing.otlp_endpoint, on.tracing.service_name, on.tracing.sample_ratio) == (
        "http://otel-collector.observability:4317", "pdserve", 0.25)
    assert load_config(overrides={"tracing.otlp_endpoint": "https://[::1]:4317/"}).tracing.otlp_endpoint
    # no scheme (plaintext or TLS?), no port (gRPC would dial 443), a path (OTLP/HTTP's /v1/traces), a bad port
    for bad in ("otel-collector:4317", "http://otel-collector", "http://otel-collector:4318/v1/traces",
                "grpc://otel-collector:4317", "http://otel-collector:99999"):
        with pytest.raises(ConfigError, match="tracing.otlp_endpoint: expected http://HOST:PORT"):
            load_config(overrides={"tracing.otlp_endpoint": bad})
    with pytest.raises(ConfigError, match=r"tracing.sample_ratio: expected a number in \[0, 1\]"):
        load_config(overrides={"tracing.sample_ratio": 1.5})
    with pytest.raises(ConfigError, match="tracing.service_name: expected a non-empty string"):
        load_config(overrides={"tracing.service_name": ""})
