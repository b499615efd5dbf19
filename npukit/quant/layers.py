"""Which parts of a decoder npukit quantises: every layer's q/k/v/o and gate/up/down projections."""
from __future__ import annotations

from torch import nn

from .kernels import QuantizationError

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def decoder_layers(model) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers):
        raise QuantizationError(f"quantize_model knows Llama-family decoders (model.model.layers[i].self_attn / "
                                f".mlp), not {type(model).__name__}; load it without quantization")
    return list(layers)


def named_linears(model) -> list[tuple[str, nn.Module]]:
    """("layers.3.mlp.down_proj", module) for every projection quantize_model handles, in order."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        for part, names in (("self_attn", ATTN_LINEARS), ("mlp", MLP_LINEARS)):
            for name in names:
                out.append((f"layers.{i}.{part}.{name}", getattr(getattr(layer, part), name)))
    return out
