"""QuantLinear and quantize_model: swap a decoder's nn.Linear layers for int8 ones, in place.

    report = quantize_model(model, "w8a16", tokenizer=tok)  # or "w8a8"; smoothing calibrates on a fixed text
    sum(t.nbytes for t in model.state_dict().values())       # the int8 weights + scales are in the state_dict

Quantised: every decoder layer's q/k/v/o and gate/up/down projections (what vLLM-Ascend's W8A8_DYNAMIC and
msModelSlim quantise). Not quantised: the embedding table and, by default, lm_head (tied in SmolLM2; the logits
are the most sensitive output), norms and biases. ``quantize_lm_head=True`` also makes lm_head int8 (per output
channel, never smoothed; a tied embedding keeps its float table for the lookups, so the int8 rows are an extra
copy): in a small model like SmolLM2-135M it is a fifth of the weights every decode step reads. It costs
agreement: on quality.EVAL_TEXT, SmolLM2 fp32, W8A16 top-1 fell from 97.7 % to 93.9 % (perplexity +0.4 % ->
+0.6 %) and W8A8 from 92.2 % to 90.9 % (+2.2 % -> +2.6 %), for W8A16 batch-1 TPOT 0.60-0.65x -> 0.50x of fp32's
(AVX512 Xeon, 1 thread, int8 panel kernel; benchmarks/bench_levers.py; before that kernel, on AVX2: 0.74x -> 0.66x)
and about 1.05x W8A8 throughput on the 64-request mixed workload.
``quantize_lm_head="bf16"`` stores lm_head in bfloat16 instead (Bf16Linear): half of fp32's bytes, each weight
rounded to 8 significant bits, the sums still fp32; an accelerator's bf16 model has its lm_head so already. On
quality.EVAL_TEXT with W8A16: top-1 97.5 % (97.7 % with the fp32 lm_head), perplexity +0.4 % either way.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine import cpu_gemm
from ..rows import Rows
from .kernels import (
    COPIES,
    METHODS,
    W8A8_ON_INTEGERS,
    KernelPlan,
    QuantizationError,
    choose_kernels,
    make_copy,
    quantize_per_channel,
    quantize_per_token,
)
from .layers import named_linears
from .smooth import CALIBRATION_TEXT, apply_smoothing, fit_smoothing


class QuantLinear(nn.Module):
    """An nn.Linear stored as int8 ``weight`` [out, in] + fp32 ``weight_scale`` [out] (vLLM-Ascend's names).

    ``forward`` accepts [..., in] like nn.Linear; the kernel comes from the shared KernelPlan and the number
    of rows (``plan.pick``). A kernel that runs on its own layout of the weight (``panel``) gets a copy here,
    in ``copies``.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 plan: KernelPlan):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"QuantLinear wants an int8 [out, in] weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.method = plan.method
        self.plan = plan
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", bias)
        # the weight in the layouts its kernels run on (kernels.COPIES), not in the state_dict
        self.copies = {k: make_copy(k, weight) for k in {plan.small, plan.large} & COPIES.keys()}

    @classmethod
    def from_linear(cls, linear: nn.Linear, plan: KernelPlan) -> QuantLinear:
        q, scale = quantize_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.to(linear.weight.device), scale.to(linear.weight.device), bias, plan)

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer stands for (int8 × scale), for error plots and tests."""
        return self.weight.float() * self.weight_scale[:, None]

    def kernel_for(self, rows: int) -> str:
        return self.plan.pick(rows)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T × weight_scale, without the bias (the engine's runner adds the bias itself)."""
        if x.dim() == 2:  # the engine's rows (the reshapes below cost microseconds, 210 times a step)
            panels = self.copies.get("panel") if self.method == "w8a16" else None  # W8A8 quantises x first
            if panels is not None and self.plan.pick(x.shape[0]) == "panel" and not torch.compiler.is_compiling():
                return cpu_gemm.panel_linear(x, panels, self.out_features, scale=self.weight_scale)  # its own copy
            return self.plan.run(x.contiguous(), self.weight, self.weight_scale)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        return self.plan.run(x2, self.weight, self.weight_scale).view(*shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(x)
        return y if self.bias is None else y + self.bias

    def shard(self, cut, *, row_parallel: bool) -> QuantLinear:
        """A tensor-parallel rank's slice, without the bias (the runner slices or adds it).

        ``cut(t)`` slices a tensor as the float weight is split. Column-parallel: the weight's rows and their
        scales. Row-parallel: the weight's columns, every scale (a rank's partial sums are scaled per output
        channel, so the all-reduce adds them exactly as it adds float partial sums).

        NOTE: W8A8's row-parallel ranks (o_proj, down_proj) quantise their own slice of each row, with its own
        per-token scale, as vLLM's row-parallel W8A8 layers do: tensor-parallel W8A8 rounds the activations
        differently from one rank, so its greedy tokens can part from the unsharded model's after a few (tiny-llama,
        two prompts, 8 tokens: one of them from the second token on). W8A16 has no such step: the same tokens.
        """
        scale = self.weight_scale if row_parallel else cut(self.weight_scale)
        return QuantLinear(cut(self.weight), scale, None, self.plan)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.plan.describe()}"


class W8A8Group:
    """W8A8 QuantLinears that read the same rows (q/k/v; gate/up), their rows quantised once for all of them: the
    runner's counterpart of cpu_gemm.FusedLinear for W8A8 (whose kernels quantise the rows first). ``group(x)``
    returns each member's ``x @ W.T * scale + bias``, the bits of separate calls (quantisation is per row and
    deterministic). SmolLM2 bf16, 64 rows of 576 (2-core AMD EPYC): quantising them took ~10 us in C, k_proj's whole
    W8A8 call 46 us.
    """

    def __init__(self, members: list[QuantLinear], biases: list):
        self.members, self.biases = members, biases
        self.sizes = [m.out_features for m in members]

    @classmethod
    def of(cls, members: list, biases: list) -> W8A8Group | None:
        """A group of two or more W8A8 QuantLinears of one input width, else None."""
        if (len(members) < 2 or not all(isinstance(m, QuantLinear) and m.method == "w8a8" for m in members)
                or len({m.in_features for m in members}) > 1):
            return None
        return cls(members, biases)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether every member runs a kernel written on integer rows (kernels.W8A8_ON_INTEGERS) at x's row count."""
        return x.dim() == 2 and all(m.plan.pick(x.shape[0]) in W8A8_ON_INTEGERS for m in self.members)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        qx, x_scale = quantize_per_token(x)
        out = []
        for m, b in zip(self.members, self.biases):
            y = W8A8_ON_INTEGERS[m.plan.pick(x.shape[0])](qx, x_scale, m.weight, m.weight_scale, x.dtype)
            out.append(y if b is None else y + b)
        return tuple(out)


class Bf16Linear(nn.Module):
    """An nn.Linear whose ``weight`` is stored in bfloat16 (half of fp32's bytes; each weight rounded to 8
    significant bits), computed with the activations' dtype: ``quantize_lm_head="bf16"``. On the CPU, fp32 rows run the
    panel kernel on a copy of the bf16 weight (``copies``), widening each weight exactly to fp32 as it is read;
    elsewhere the weight is cast to the activations' dtype (a no-op in a bf16 model)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", bias)
        panel = weight.device.type == "cpu" and cpu_gemm._panel_gemm() is not None
        self.copies = {"panel": cpu_gemm.pack_panels(self.weight)} if panel else {}

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T, without the bias (the engine's runner adds the bias itself)."""
        if "panel" in self.copies and x.dtype == torch.float32 and x.dim() == 2:
            return cpu_gemm.panel_linear(x, self.copies["panel"], self.out_features)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        y = self.project(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def shard(self, cut, *, row_parallel: bool) -> Bf16Linear:
        """A tensor-parallel rank's slice (``cut`` slices the weight as the float one is split), without the bias."""
        return Bf16Linear(cut(self.weight))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bfloat16 weight"


def state_dict_bytes(model) -> int:
    """Bytes of the model's state_dict, each tensor counted once (SmolLM2's lm_head is the embedding)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def linear_weight_bytes(model) -> int:
    """Bytes of the projection weights (+ scales) that quantize_model replaces."""
    total = 0
    for _, m in named_linears(model):
        total += m.weight.nbytes + (m.weight_scale.nbytes if isinstance(m, QuantLinear) else 0)
    return total


@dataclass
class QuantReport(Rows):
    method: str
    kernels: str                      # KernelPlan.describe()
    smoothing: str                    # "off" or how it smoothed (alpha fixed or searched, calibration tokens)
    num_linears: int                  # decoder projections (lm_head not counted, see lm_head)
    linear_bytes_before: int
    linear_bytes_after: int
    model_bytes_before: int
    model_bytes_after: int
    seconds: float
    reasons: list[str] = field(default_factory=list)  # the kernel probe's timings
    lm_head: str | None = None        # set when lm_head was quantised too: its kernels

    def rows(self) -> list[tuple[str, str]]:
        mib = 2**20
        return [("method", self.method), ("kernels", self.kernels), ("smoothing", self.smoothing),
                ("linears quantised", str(self.num_linears) + (f" + lm_head ({self.lm_head})" if self.lm_head else "")),
                ("linear weights",
                 f"{self.linear_bytes_before / mib:.1f} MiB → {self.linear_bytes_after / mib:.1f} MiB "
                                   f"({self.linear_bytes_before / self.linear_bytes_after:.2f}x smaller)"),
                ("whole model", f"{self.model_bytes_before / mib:.1f} MiB → {self.model_bytes_after / mib:.1f} MiB"),
                ("time", f"{self.seconds:.2f} s"), ("probe", " | ".join(self.reasons) or "-")]


@dataclass
class QuantRecipe:
    """What quantize_model decided. Applied to another copy of the same float checkpoint (a tensor-parallel
    worker's), it gives the same int8 weights bit for bit and the same kernels: neither the smoothing fit nor
    the kernel probe runs again, so neither can come out differently in another process."""

    method: str
    plan: KernelPlan                   # the decoder projections' kernels
    smoothing: dict[str, torch.Tensor]  # each smoothing group's factors (CPU fp32); empty when smoothing is off
    head_plan: KernelPlan | None = None  # lm_head's kernels when it is quantised too, to int8
    lm_head: str | None = None           # lm_head quantised too: "int8" (head_plan's kernels) or "bf16" (Bf16Linear)


def lm_head_format(quantize_lm_head) -> str | None:
    """``quantize_lm_head``'s value as None, "int8" or "bf16"; raises QuantizationError for anything else."""
    formats = {False: None, None: None, True: "int8", "int8": "int8", "bf16": "bf16"}
    if not isinstance(quantize_lm_head, (bool, str, type(None))) or quantize_lm_head not in formats:
        raise QuantizationError(f"quantize_lm_head must be False, True (= 'int8') or 'bf16', got {quantize_lm_head!r}")
    return formats[quantize_lm_head]


def _describe_bf16(head) -> str | None:
    if not isinstance(head, Bf16Linear):
        return None
    return "bf16 weights" + (", fp32 sums in the panel kernel" if head.copies else ", cast to the activations' dtype")


def _quantizable(model, method: str, with_head: bool) -> list[tuple[str, nn.Module]]:
    """The projections to quantise; raises QuantizationError, before anything changes, when one cannot be."""
    done = getattr(model, "quantization", None)
    if done is not None:
        raise QuantizationError(f"this model is already quantised ({done}); load a fresh copy to quantise it "
                                f"as {method}")
    linears = named_linears(model)
    for name, lin in linears:
        if not isinstance(lin, nn.Linear):
            raise QuantizationError(f"{name} is a {type(lin).__name__}, not an nn.Linear; cannot quantise it")
    head = model.get_output_embeddings()
    if with_head and not isinstance(head, nn.Linear):
        raise QuantizationError(f"lm_head is a {type(head).__name__}, not an nn.Linear; quantise without "
                                "quantize_lm_head")
    return linears


@torch.no_grad()
def apply_quant_recipe(model, recipe: QuantRecipe) -> None:
    """Smooth with the recipe's factors, then swap the projections for QuantLinears (and lm_head for a QuantLinear
    or a Bf16Linear), in place."""
    linears = _quantizable(model, recipe.method, recipe.lm_head is not None)
    if recipe.smoothing:
        apply_smoothing(model, recipe.smoothing)
    for name, lin in linears:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.model.get_submodule(parent_name), attr, QuantLinear.from_linear(lin, recipe.plan))
    head = model.get_output_embeddings()
    if recipe.lm_head == "bf16":
        model.set_output_embeddings(Bf16Linear(head.weight, None if head.bias is None else head.bias.detach().clone()))
    elif recipe.lm_head == "int8":
        model.set_output_embeddings(QuantLinear.from_linear(head, recipe.head_plan))
    model.quantization = recipe.method
    model.quant_recipe = recipe


@torch.no_grad()
def quantize_model(model, method: str, *, tokenizer=None, smooth: bool = True, alpha: float | None = None,
                   calibration_text: str | None = None, kernel: str | None = None,
                   quantize_lm_head: bool | str = False) -> QuantReport:
    """Quantise the decoder's projections of `model` in place; returns (and sets ``model.quant_report``, and
    ``model.quant_recipe``: what was decided, see QuantRecipe).

    method: "w8a16" (weight-only) or "w8a8" (dynamic per-token activations).
    smooth: the anti-outlier step before quantising (npukit.quant.smooth); it runs the model on
    ``calibration_text`` (default: CALIBRATION_TEXT), so it needs `tokenizer`. alpha: None searches it per
    group (default), a number fixes it (SmoothQuant: 0.5).
    kernel: force one kernel (see npukit.quant.kernels) instead of the per-CPU probe.
    quantize_lm_head: lm_head too: True or "int8" (with its own kernel probe), or "bf16" (see the module docstring).
    """
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)} (or None)")
    lm_head = lm_head_format(quantize_lm_head)
    linears = _quantizable(model, method, lm_head is not None)
    t0 = time.perf_counter()
    model_before, linear_before = state_dict_bytes(model), linear_weight_bytes(model)
    smoothing, factors = "off", {}
    if smooth:
        if tokenizer is None:
            raise QuantizationError("smoothing runs the model on calibration text: pass tokenizer= (or smooth=False)")
        ids = tokenizer(calibration_text or CALIBRATION_TEXT, return_tensors="pt").input_ids
        fitted = fit_smoothing(model, ids, alpha=alpha, per_token_activations=method == "w8a8")
        factors = {key: s for key, (_, s) in fitted.items()}
        how = f"alpha={alpha}" if alpha is not None else (
            f"alpha searched per group (median {statistics.median(a for a, _ in fitted.values()):.1f})")
        smoothing = f"SmoothQuant-style, {how}, on {ids.shape[1]} calibration tokens"
    w = model.model.layers[0].mlp.gate_proj.weight
    act_dtype = model.get_input_embeddings().weight.dtype
    plan = choose_kernels(method, w.device, act_dtype, tuple(w.shape), kernel=kernel)
    head_plan = None
    if lm_head == "int8":
        head = model.get_output_embeddings().weight
        head_plan = choose_kernels(method, head.device, act_dtype, tuple(head.shape), kernel=kernel)
    apply_quant_recipe(model, QuantRecipe(method, plan, factors, head_plan, lm_head))
    report = QuantReport(
        method=method, kernels=plan.describe(), smoothing=smoothing, num_linears=len(linears),
        linear_bytes_before=linear_before, linear_bytes_after=linear_weight_bytes(model),
        model_bytes_before=model_before, model_bytes_after=state_dict_bytes(model),
        seconds=time.perf_counter() - t0, reasons=plan.reasons,
        lm_head=head_plan.describe() if head_plan is not None else _describe_bf16(model.get_output_embeddings()))
    model.quant_report = report
    return report
