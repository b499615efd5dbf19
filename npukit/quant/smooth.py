"""SmoothQuant-style smoothing: move activation outliers into the weights before W8A8 quantisation.

A few input channels of a decoder's linears carry activations 10-100x larger than the rest. With one int8
scale per token, such a channel sets the scale and the other channels round to a handful of levels. For a
per-channel factor s_j (SmoothQuant, Xiao et al. 2023; msModelSlim's ``anti_method="m1"``-style
anti-outlier step):

    y = x W^T = (x / s) (W * s)^T,        s_j = max|x_j|^alpha / max|W_j|^(1-alpha)

and the division ``x / s`` is folded into whatever produced x, so it costs nothing at run time:

- q/k/v inputs come from ``input_layernorm``:       norm.weight /= s, q/k/v.weight[:, j] *= s_j
- gate/up inputs come from ``post_attention_layernorm``: the same
- down_proj's input is ``act(gate) * up``:           up.weight[j, :] /= s_j (and its bias), down.weight[:, j] *= s_j

o_proj is left alone: its input is attention output, where folding needs equal factors across the query
heads that share a KV head.
"""
from __future__ import annotations

import torch

from .linear import decoder_layers

# NOTE: calibration text, not the evaluation passage (npukit.quant.quality.EVAL_TEXT): smoothing factors
# fitted on the text they are scored on would flatter them.
CALIBRATION_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined a "
    "screw press, oil-based ink and movable metal type. Books became cheaper, literacy spread, and ideas moved "
    "across Europe faster than ever before. Scientists shared results in journals; merchants kept accounts; "
    "governments printed laws.\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "Q: What is the capital of France?\nA: The capital of France is Paris, a city on the Seine river.\n"
    "Q: How many legs does a spider have?\nA: A spider has eight legs.\n"
    "Water boils at 100 degrees Celsius at sea level; at higher altitudes the air pressure is lower and water "
    "boils at a lower temperature. Recipes for mountain cooking therefore add time, not heat. "
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89 - each number is the sum of the two before it."
)


@torch.no_grad()
def activation_absmax(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every projection's input over the calibration tokens (fp32, [in])."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(decoder_layers(model)):
        for part, names in (("self_attn", ("q_proj", "o_proj")), ("mlp", ("gate_proj", "down_proj"))):
            for name in names:
                key = f"layers.{i}.{part}.{name}"

                def hook(_mod, args, key=key):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
                    stats[key] = torch.maximum(stats[key], x) if key in stats else x

                hooks.append(getattr(getattr(layer, part), name).register_forward_pre_hook(hook))
    try:
        model(input_ids.to(model.get_input_embeddings().weight.device))
    finally:
        for h in hooks:
            h.remove()
    return stats


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W_j|^(1-alpha) over the linears that read the same input ([in])."""
    w_max = torch.stack([w.detach().abs().float().amax(0) for w in weights]).amax(0)
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@torch.no_grad()
def smooth_model(model, input_ids: torch.Tensor, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Smooth every decoder layer in place (the model's outputs do not change); returns the factors."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (SmoothQuant uses 0.5), got {alpha!r}")
    stats = activation_absmax(model, input_ids)
    factors = {}
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        groups = [(f"layers.{i}.self_attn.q_proj", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                  (f"layers.{i}.mlp.gate_proj", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])]
        for key, norm, lins in groups:
            s = smoothing_factors(stats[key], [lin.weight for lin in lins], alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            for lin in lins:
                lin.weight.mul_(s.to(lin.weight.dtype))
            factors[key] = s
        key = f"layers.{i}.mlp.down_proj"
        s = smoothing_factors(stats[key], [mlp.down_proj.weight], alpha)
        mlp.up_proj.weight.div_(s.to(mlp.up_proj.weight.dtype)[:, None])
        if mlp.up_proj.bias is not None:
            mlp.up_proj.bias.div_(s.to(mlp.up_proj.bias.dtype))
        mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype))
        factors[key] = s
    return factors
