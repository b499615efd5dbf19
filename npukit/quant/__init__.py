"""W8A16 / W8A8 quantisation of the decoder's linear layers (see linear.py, kernels.py, smooth.py)."""
from .kernels import METHODS, KernelPlan, QuantizationError, choose_kernels, quantize_per_channel, quantize_per_token
from .layers import named_linears
from .linear import QuantLinear, QuantReport, linear_weight_bytes, quantize_model, state_dict_bytes

__all__ = ["METHODS", "KernelPlan", "QuantLinear", "QuantReport", "QuantizationError", "choose_kernels",
           "linear_weight_bytes", "named_linears", "quantize_model", "quantize_per_channel", "quantize_per_token",
           "state_dict_bytes"]
