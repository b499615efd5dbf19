"""What npukit's `quantization` setting becomes on vLLM / vLLM-Ascend (for `npukit graduate`).

Stdlib only. NOTE: neither vLLM nor vLLM-Ascend quantises a float checkpoint to int8 while loading it:
`--quantization ascend` serves a checkpoint that msModelSlim quantised offline (its folder carries a
`quant_model_description.json`), and LLM-Compressor checkpoints (compressed-tensors) need no flag.
"""
from __future__ import annotations

ASCEND_METHOD = {"w8a8": "W8A8_DYNAMIC", "w8a16": "W8A16"}  # msModelSlim / vLLM-Ascend method names
COMPRESSOR_SCHEME = {"w8a8": "W8A8 (int8, dynamic per-token activations)", "w8a16": "W8A16 (int8 weights)"}


def vllm_quantization(method: str | None, device: str) -> tuple[list[str], list[str]]:
    """(vllm serve flags, notes) for npukit's quantization=`method` when graduating to `device`'s vLLM."""
    if method is None:
        return [], []
    if method not in ASCEND_METHOD:
        raise ValueError(f"unknown quantization {method!r}; use one of {', '.join(ASCEND_METHOD)} or None")
    if device == "npu":
        return ["--quantization", "ascend"], [
            f"quantization={method}: vLLM-Ascend does not quantise at load. Quantise the checkpoint offline with "
            f"msModelSlim ({ASCEND_METHOD[method]}{', with its anti-outlier step' if method == 'w8a8' else ''}) "
            "and serve the quantised folder with --quantization ascend."]
    return [], [
        f"quantization={method}: vLLM does not quantise at load either. Quantise the checkpoint with "
        f"LLM-Compressor ({COMPRESSOR_SCHEME[method]}); its compressed-tensors folder loads with no flag."]
