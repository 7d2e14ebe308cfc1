"""The autoscaling decision: targets, bounds, cool-down."""
from pdserve.config import load_config
from pdserve.router.autoscaler import PoolSignal, decide


def cfg():
    return load_config(None, {"autoscaling.enabled": True, "autoscaling.cooldown_s": 60.0,
                              "autoscaling.prefill.min_replicas": 1, "autoscaling.prefill.max_replicas": 3,
                              "autoscaling.prefill.target": 4.0, "autoscaling.decode.target": 0.8,
                              "autoscaling.target_ttft_s": 1.0, "autoscaling.target_itl_s": 0.1}).autoscaling


def test_scales_up_on_queue_or_latency_and_down_when_idle():
    c = cfg()
    assert decide(c, "prefill", PoolSignal(1, 6.0, 0.2), 0, 1000) == 2  # queue over target
    assert decide(c, "prefill", PoolSignal(1, 1.0, 2.5), 0, 1000) == 2  # TTFT over target
    assert decide(c, "prefill", PoolSignal(2, 3.0, 0.8), 0, 1000) == 2  # within targets: stay
    assert decide(c, "prefill", PoolSignal(2, 0.5, 0.1), 0, 1000) == 1  # comfortably under: shrink
    assert decide(c, "decode", PoolSignal(1, 0.95, 0.05), 0, 1000) == 2  # KV nearly full
    assert decide(c, "decode", PoolSignal(2, 0.3, 0.2), 0, 1000) == 3  # ITL over target
    assert decide(c, "decode", PoolSignal(2, 0.1, 0.01), 0, 1000) == 1


def test_bounds_and_cooldown():
    c = cfg()
    assert decide(c, "prefill", PoolSignal(3, 50.0, 9.0), 0, 1000) == 3  # at max
    assert decide(c, "prefill", PoolSignal(1, 0.0, None), 0, 1000) == 1  # at min
    assert decide(c, "prefill", PoolSignal(0, 0.0, None), 990, 1000) == 1  # below min: fix at once
    assert decide(c, "prefill", PoolSignal(1, 9.0, None), 990, 1000) == 1  # cooling down
