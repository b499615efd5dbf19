"""Shared fixtures: the embedded models, loaded once per test session on the CPU in fp32."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# NOTE: NPUKIT_TEST_DEVICE=cuda (scripts/gpu-check.sh) loads the tiny model on that device, so the engine's
# fidelity tests (tests/test_llm.py -k greedy_equals_hf, tests/test_graph.py) run there; default: the CPU.
TEST_DEVICE = os.environ.get("NPUKIT_TEST_DEVICE", "cpu")

# NOTE: the unit tests check English messages (the default); a developer's zh_CN locale must not change them.
# Tests of the Chinese messages set the language themselves (tests/test_i18n.py). The notebooks set theirs in
# their settings cell, so nbval does not depend on this either.
os.environ["NPUKIT_LANG"] = "en"


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
    """(model, tokenizer) of the seeded random tiny Llama, fp32 on CPU (on $NPUKIT_TEST_DEVICE if set)."""
    import npukit

    return npukit.load_model("tiny-llama", device=TEST_DEVICE, dtype="float32")


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32 on CPU."""
    import npukit

    return npukit.load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
