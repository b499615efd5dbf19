"""Shared fixtures: the embedded models, loaded once per test session on the CPU in fp32."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on two busy cores it is several times faster than two fighting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded random tiny Llama, fp32 on CPU."""
    import npukit

    return npukit.load_model("tiny-llama", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32 on CPU."""
    import npukit

    return npukit.load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
