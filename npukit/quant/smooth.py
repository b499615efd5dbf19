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

alpha: SmoothQuant fixes it (0.5). By default npukit *searches* it per group instead (msModelSlim's
anti-outlier methods and AWQ search their scales too): for each alpha in ALPHAS it quantises the smoothed
weights (and, for W8A8, the smoothed activations per token) and keeps the alpha whose product is closest to
the float one on the calibration tokens. W8A16 gains as well: small alphas protect the weight columns that
meet large activations.
"""
from __future__ import annotations

import torch

from .layers import decoder_layers

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


ALPHAS = tuple(i / 10 for i in range(11))
# NOTE: the search's cost: it scores at most this many calibration tokens and output rows per group
SEARCH_TOKENS, SEARCH_ROWS = 128, 512


def _capture_inputs(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fp32 inputs [tokens, in] of every smoothing group's linears (q_proj, gate_proj, down_proj) and
    o_proj's, from one forward pass over the calibration tokens."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(decoder_layers(model)):
        for part, names in (("self_attn", ("q_proj", "o_proj")), ("mlp", ("gate_proj", "down_proj"))):
            for name in names:
                key = f"layers.{i}.{part}.{name}"

                def hook(_mod, args, key=key):
                    inputs[key] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

                hooks.append(getattr(getattr(layer, part), name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids.to(model.get_input_embeddings().weight.device))
    finally:
        for h in hooks:
            h.remove()
    return inputs


def activation_absmax(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every projection's input over the calibration tokens (fp32, [in])."""
    return {k: x.abs().amax(0) for k, x in _capture_inputs(model, input_ids).items()}


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                      w_max: torch.Tensor | None = None) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W_j|^(1-alpha) over the linears that read the same input ([in])."""
    if w_max is None:
        w_max = torch.stack([w.detach().abs().float().amax(0) for w in weights]).amax(0)
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


def _int8_rounded(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t rounded to the int8 grid of one symmetric scale per slice along ``dim`` (quantise, then dequantise)."""
    scale = t.abs().amax(dim, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(t / scale).mul_(scale)


@torch.no_grad()
def search_alpha(x: torch.Tensor, weights: list[torch.Tensor], per_token_activations: bool,
                 alphas=ALPHAS) -> float:
    """The alpha whose smoothed, int8-quantised product x W^T is closest (mean squared error) to the float one:
    per-channel int8 weights, and per-token int8 activations when ``per_token_activations`` (W8A8)."""
    w = torch.cat([t.detach().float() for t in weights])
    act_max, w_max = x.abs().amax(0), w.abs().amax(0)
    # NOTE: the maxima above saw every token and weight row; the error is scored on a strided sample of both
    x = x[::max(1, -(-x.shape[0] // SEARCH_TOKENS))]
    w = w[::max(1, -(-w.shape[0] // SEARCH_ROWS))]
    ref = x @ w.T
    errors = {}
    for alpha in alphas:
        s = smoothing_factors(act_max, weights, alpha, w_max)
        xs = _int8_rounded(x / s, 1) if per_token_activations else x / s
        errors[alpha] = float((xs @ _int8_rounded(w * s, 1).T).sub_(ref).pow_(2).mean())
    return min(errors, key=errors.get)


def _groups(model):
    """(key of the shared input, the linears that read it, where x / s is folded: a norm's weight or up_proj)."""
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"layers.{i}.self_attn.q_proj", [attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm
        yield f"layers.{i}.mlp.gate_proj", [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm
        yield f"layers.{i}.mlp.down_proj", [mlp.down_proj], mlp.up_proj


@torch.no_grad()
def fit_smoothing(model, input_ids: torch.Tensor, alpha: float | None = None, *,
                  per_token_activations: bool = True) -> dict[str, tuple[float, torch.Tensor]]:
    """Each group's alpha and factors s (fp32, on the CPU), from the model's inputs on ``input_ids``; the model
    is not changed. alpha: fixed in [0, 1], or None to search it per group (``search_alpha``), scoring int8
    weights and, when ``per_token_activations`` (W8A8), per-token int8 activations."""
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be None (search) or in [0, 1] (SmoothQuant uses 0.5), got {alpha!r}")
    inputs = _capture_inputs(model, input_ids)
    fitted = {}
    # NOTE: folding one group's factors never changes another group's weights or float inputs as seen here
    # (the inputs were captured before any folding, and folding keeps every product), so all are fitted first.
    for key, lins, _fold in _groups(model):
        weights = [lin.weight for lin in lins]
        a = search_alpha(inputs[key], weights, per_token_activations) if alpha is None else alpha
        fitted[key] = (a, smoothing_factors(inputs[key].abs().amax(0), weights, a).cpu())
    return fitted


@torch.no_grad()
def apply_smoothing(model, factors: dict[str, torch.Tensor]) -> None:
    """Fold each group's factors s into its linears' weights (columns * s) and into what produced their input
    (/ s), in place: the float outputs stay the same. The same factors on the same float weights give the
    same weights bit for bit (how a tensor-parallel worker repeats rank 0's smoothing)."""
    for key, lins, fold in _groups(model):
        s = factors[key].to(fold.weight.device)
        for lin in lins:
            lin.weight.mul_(s.to(lin.weight.dtype))
        if isinstance(fold, torch.nn.Linear):  # up_proj: its output rows are down_proj's input channels
            fold.weight.div_(s.to(fold.weight.dtype)[:, None])
            if fold.bias is not None:
                fold.bias.div_(s.to(fold.bias.dtype))
        else:
            fold.weight.div_(s.to(fold.weight.dtype))


def smooth_model(model, input_ids: torch.Tensor, alpha: float | None = None, *,
                 per_token_activations: bool = True) -> dict[str, float]:
    """Smooth every decoder layer in place (the model's float outputs do not change); returns each group's alpha.
    ``fit_smoothing`` then ``apply_smoothing``; see them for the arguments."""
    fitted = fit_smoothing(model, input_ids, alpha, per_token_activations=per_token_activations)
    apply_smoothing(model, {key: s for key, (_, s) in fitted.items()})
    return {key: a for key, (a, _) in fitted.items()}
