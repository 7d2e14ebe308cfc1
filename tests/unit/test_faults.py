"""PDSERVE_FAULTS (worker/faults.py): which requests a fault hits, and specs that are refused, not ignored."""
from __future__ import annotations

import pytest

from pdserve.errors import InvalidRequest
from pdserve.worker.faults import Faults


def test_faults_hit_the_first_attempt_of_their_prefix_only():
    f = Faults("drop_transfer=chaos-drop, kill_decode_at=chaos-kd:5,kill_prefill_at=chaos-kp:0")
    assert f.hits("drop_transfer", "chaos-drop-3") and not f.hits("drop_transfer", "chaos-drop-3#1")
    assert not f.hits("delay_transfer", "chaos-drop-3")
    assert f.kill_at("kill_decode_at", "chaos-kd-1") == 5
    assert f.kill_at("kill_decode_at", "chaos-kd-1#1") is None  # the moved request is not killed again
    assert f.kill_at("kill_decode_at", "other") is None
    assert f.kill_at("kill_prefill_at", "chaos-kp") == 0
    assert Faults("kill_decode_at=a:b:7").kill_at("kill_decode_at", "a:b-1") == 7  # N after the last colon


def test_no_spec_means_no_faults(monkeypatch):
    monkeypatch.delenv("PDSERVE_FAULTS", raising=False)
    f = Faults()
    assert not f.prefixes and f.kill_at("kill_decode_at", "anything") is None


@pytest.mark.parametrize("spec", ["kill_decode_at=chaos-kd", "kill_decode_at=chaos-kd:", "kill_decode_at=:5",
                                  "kill_prefill_at=chaos:-1", "drop_transfer=", "kill_router_at=x:1", "drop"])
def test_a_malformed_spec_is_refused(spec):
    with pytest.raises(InvalidRequest, match="PDSERVE_FAULTS"):
        Faults(spec)
