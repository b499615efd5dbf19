"""W8A16 / W8A8 quantisation of the decoder's linear layers (see linear.py, kernels.py, smooth.py)."""
from .kernels import METHODS, KernelPlan, QuantizationError, choose_kernels, quantize_per_channel, quantize_per_token
from .layers import named_linears
from .linear import (
    Bf16Linear,
    QuantLinear,
    QuantRecipe,
    QuantReport,
    apply_quant_recipe,
    linear_weight_bytes,
    quantize_model,
    state_dict_bytes,
)

__all__ = ["METHODS", "Bf16Linear", "KernelPlan", "QuantLinear", "QuantRecipe", "QuantReport", "QuantizationError",
           "apply_quant_recipe", "choose_kernels", "linear_weight_bytes", "named_linears", "quantize_model",
           "quantize_per_channel", "quantize_per_token", "state_dict_bytes"]
