"""Shared fixtures: the real embedded model, loaded once per test session."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# 12 prompts, raw and chat, of different lengths and kinds (the token-exactness set)

def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("PDSERVE_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    has_gpu = torch.cuda.is_available()
    for item in items:
        # markers, not keywords: a test's keywords include its folders' names, and tests/gpu/ also holds
        # CPU cases (the kernels under Triton's interpreter) that must run everywhere
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set PDSERVE_SLOW=1 or -m slow"))
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def engine_f32():
    from pdserve.engine.engine import LLMEngine

    return LLMEngine(dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_f32():
    return _hf_model(torch.float32)


def _hf_model(dtype):
    from transformers import AutoModelForCausalLM

    from pdserve.engine.loader import default_model_path

    d, f = os.path.split(default_model_path())
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).eval()
    m.generation_config.eos_token_id = None  # compare pure argmax continuations of fixed length
    return m


@pytest.fixture(scope="session")
def hf_model_factory():
    return _hf_model
