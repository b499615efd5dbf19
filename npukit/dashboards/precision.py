"""Precision: load one model in fp32 / bf16 / fp16 and compare weight memory, speed and output drift.

    results = compare_precisions("smollm2-135m-instruct", device="cpu")    # list[PrecisionResult]
    PrecisionDashboard("smollm2-135m-instruct").show()                      # the same, with widgets

Drift is measured against the reference precision (fp32) on the same tokens: the reference greedily
continues the prompt, then every precision reads that exact token sequence (teacher forcing) and we
compare the next-token logits position by position: the largest absolute difference, the mean one, and
how often the top-1 token (what greedy decoding would pick) is the same.
"""
from __future__ import annotations

import gc
import html
from dataclasses import dataclass, field
from typing import Callable

import ipywidgets as widgets
import torch

from npukit import device as device_mod
from npukit import i18n
from npukit.cjk import plot_text
from npukit.i18n import t
from npukit.metrics import format_bytes, format_seconds

from .base import Dashboard, action, figure_png, html_table, new_figure

PRECISIONS = ("float32", "bfloat16", "float16")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DEFAULT_PROMPT = "Explain in one sentence why the sky is blue."


@dataclass
class PrecisionResult:
    """One precision's numbers. ``error`` is set (and the numbers are left empty) when it could not run."""

    dtype: str
    device: str = ""
    weight_bytes: int = 0
    memory_delta: int = 0  # device memory after load minus before (process RSS on CPU: rough)
    load_seconds: float = 0.0
    ttft: float | None = None
    tpot: float | None = None
    tokens_per_s: float | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    max_logit_diff: float | None = None  # vs the reference precision, over the compared positions
    mean_logit_diff: float | None = None
    top1_agreement: float | None = None  # fraction of positions whose argmax token matches the reference
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class Drift:
    max_abs: float
    mean_abs: float
    top1_agreement: float
    positions: int


def logit_drift(logits: torch.Tensor, reference: torch.Tensor) -> Drift:
    """Compare two ``[positions, vocab]`` logit tensors (any dtype / device)."""
    if logits.shape != reference.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits.shape)} vs reference {tuple(reference.shape)}")
    a, b = logits.detach().float().cpu(), reference.detach().float().cpu()
    diff = (a - b).abs()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return Drift(diff.max().item(), diff.mean().item(), agree, int(a.shape[0]))


def auto_dtype(device: str | torch.device = "auto") -> tuple[str, list[str]]:
    """The precision ``load_model(dtype="auto")`` would pick on ``device``, and why."""
    from npukit.loading import choose_dtype

    dtype, reasons = choose_dtype(device_mod.resolve(device))
    return str(dtype).removeprefix("torch."), reasons


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        from npukit.chat import apply_chat_template

        return apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]


def _free(model) -> None:
    dev = model.device
    del model
    gc.collect()
    device_mod.empty_cache(dev)


def _time_one(m, tok, prompt: str, max_new_tokens: int, result: PrecisionResult) -> list[int]:
    """Time a greedy reply into result (after a warm-up); returns the prompt's token ids."""
    from npukit.metrics import time_generation

    ids = _chat_ids(tok, prompt)
    time_generation(m, tok, ids, max_new_tokens=2)  # warm-up: first calls pay one-off costs
    timing = time_generation(m, tok, ids, max_new_tokens=max_new_tokens)
    result.ttft, result.tpot, result.tokens_per_s = timing.ttft, timing.tpot, timing.output_tokens_per_s
    result.text, result.token_ids = timing.text, timing.token_ids
    return ids


def _generated_logits(m, seq: list[int], n_prompt: int) -> torch.Tensor:
    """float32 CPU logits of the positions that predict the generated tokens (n_prompt-1 … end-1): that is
    where drift matters."""
    with torch.inference_mode():
        logits = m(torch.tensor([seq], device=m.device)).logits[0]
    return logits[max(n_prompt - 1, 0):].float().cpu()


def _precision_order(prompt, max_new_tokens, dtypes, reference) -> list[str]:
    """Check the arguments; the dtype names to run, the reference first."""
    from npukit.loading import parse_dtype

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type a sentence for the model to continue")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    names = [str(parse_dtype(d)).removeprefix("torch.") for d in dtypes]  # raises on unknown names
    reference = str(parse_dtype(reference)).removeprefix("torch.")
    # NOTE: the reference runs first: its greedy tokens are what every other precision is compared on.
    return [reference] + [d for d in dict.fromkeys(names) if d != reference]


def compare_precisions(
    model: str = "smollm2-135m-instruct",
    dtypes: tuple[str, ...] | list[str] = PRECISIONS,
    *,
    device: str = "auto",
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 16,
    reference: str = "float32",
    on_step: Callable[[str], None] | None = None,
    on_result: Callable[[PrecisionResult], None] | None = None,
) -> list[PrecisionResult]:
    """Load ``model`` once per precision (the reference first) and measure each one.

    A precision the device lacks gives a result with ``error`` set; the others still run. ``on_step(text)``
    is called as each stage finishes, ``on_result(result)`` as each precision finishes (for dashboards).
    """
    from npukit.loading import load_model

    order = _precision_order(prompt, max_new_tokens, dtypes, reference)
    reference = order[0]
    dev = device_mod.resolve(device)
    step = on_step or (lambda text: None)
    finished = on_result or (lambda result: None)

    results: list[PrecisionResult] = []
    seq: list[int] = []
    n_prompt = 0
    ref_logits: torch.Tensor | None = None
    for name in order:
        result = PrecisionResult(dtype=name, device=str(dev))
        try:
            m, tok = load_model(model, device=dev, dtype=name)
        except (ValueError, RuntimeError) as e:  # e.g. "bfloat16 is not supported on npu:0 ..."
            if name == reference:
                raise
            result.error = str(e)
            results.append(result)
            step(f"{name}: skipped")
            finished(result)
            continue
        report = m.load_report
        result.weight_bytes, result.load_seconds = report.weight_bytes, report.seconds
        result.memory_delta = report.memory_after - report.memory_before
        step(f"{name}: loaded")

        ids = _time_one(m, tok, prompt, max_new_tokens, result)
        step(f"{name}: timed")
        if name == reference:
            seq, n_prompt = ids + result.token_ids, len(ids)
        logits = _generated_logits(m, seq, n_prompt)
        if name == reference:
            ref_logits = logits
        drift = logit_drift(logits, ref_logits)
        result.max_logit_diff, result.mean_logit_diff = drift.max_abs, drift.mean_abs
        result.top1_agreement = drift.top1_agreement
        step(f"{name}: compared")
        _free(m)
        results.append(result)
        finished(result)
    return results


def results_table_html(results: list[PrecisionResult]) -> str:
    header = ["dtype", t("dash.precision.weights"), t("dash.precision.load"), "TTFT", "TPOT", "tok/s", "max |Δlogit|",
              t("dash.precision.top1"), t("dash.precision.output")]
    rows = []
    for r in results:
        if not r.ok:
            rows.append([SHORT.get(r.dtype, r.dtype), "—", "—", "—", "—", "—", "—", "—",
                         t("dash.precision.not_run_cell", error=r.error)])
            continue
        rows.append([
            SHORT.get(r.dtype, r.dtype), format_bytes(r.weight_bytes), format_seconds(r.load_seconds),
            format_seconds(r.ttft), format_seconds(r.tpot),
            f"{r.tokens_per_s:.1f}" if r.tokens_per_s else "n/a",
            f"{r.max_logit_diff:.3g}", f"{100 * r.top1_agreement:.0f}%", r.text.strip()[:80],
        ])
    return html_table(header, rows, wrap_last=True)


def results_figure_png(results: list[PrecisionResult]) -> bytes:
    done = [r for r in results if r.ok]
    labels = [SHORT.get(r.dtype, r.dtype) for r in done]
    colours = ["#4c72b0", "#dd8452", "#55a868"][: len(done)]
    fig = new_figure(9, 2.6)
    axes = fig.subplots(1, 3)
    panels = [
        (plot_text("dash.precision.weights_mib"), [r.weight_bytes / 2**20 for r in done], "{:.0f}"),
        (plot_text("dash.precision.decode_speed"), [r.tokens_per_s or 0 for r in done], "{:.1f}"),
        (plot_text("dash.precision.max_logit_diff"), [r.max_logit_diff or 0 for r in done], "{:.2g}"),
    ]
    for ax, (title, values, fmt) in zip(axes, panels):
        bars = ax.bar(labels, values, color=colours)
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.2)
    return figure_png(fig)


class PrecisionDashboard(Dashboard):
    """Pick a device and precisions, press Compare: memory, speed and drift side by side."""

    title_key = "dash.precision.title"

    def __init__(self, model: str = "smollm2-135m-instruct", device: str = "auto", prompt: str | None = None,
                 max_new_tokens: int = 16):
        super().__init__()
        if not isinstance(model, str):
            raise TypeError("PrecisionDashboard loads the model itself in each precision: pass its name or folder "
                            "(e.g. 'smollm2-135m-instruct'), not a loaded model")
        self.model_name = model
        prompt = i18n.prompt("sky") if prompt is None else prompt
        self.results: list[PrecisionResult] = []
        options = [("auto", "auto")] + [
            (k if device_mod.is_available(k) else t("dash.precision.not_available", kind=k), k)
            for k in device_mod.KINDS]
        if device not in [value for _, value in options]:  # e.g. "npu:1"
            options.append((device, device))
        self.device = widgets.Dropdown(options=options, value=device, description=t("dash.precision.device"))
        self.dtypes = {
            name: widgets.Checkbox(value=True, description=f"{SHORT[name]} ({name})", indent=False,
                                   layout=widgets.Layout(width="150px"))
            for name in PRECISIONS
        }
        self.dtypes["float32"].disabled = True  # the reference: always measured
        self.prompt = widgets.Textarea(value=prompt, description=t("dash.prompt"), layout=widgets.Layout(width="520px"))
        self.max_new_tokens = widgets.IntSlider(value=max_new_tokens, min=1, max=64, description=t("dash.new_tokens"))
        self.compare_button = widgets.Button(description=t("dash.precision.compare"), button_style="primary",
                                             icon="play")
        self.compare_button.on_click(lambda _: self.run())
        self.auto_line = widgets.HTML()
        self.table = widgets.HTML()
        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="900px"))
        self.device.observe(lambda _: self.update_auto_line(), names="value")
        self.update_auto_line()
        self.widget = widgets.VBox([
            self.header(model),
            widgets.HBox([self.device, *self.dtypes.values()]),
            self.prompt,
            widgets.HBox([self.max_new_tokens, self.compare_button, self.progress]),
            self.auto_line, self.status, self.table, self.chart,
        ])

    def describe(self) -> str:
        return f"PrecisionDashboard(model={self.model_name!r})"

    def buttons(self) -> list[widgets.Button]:
        return [self.compare_button]

    def selected_dtypes(self) -> list[str]:
        return [name for name, box in self.dtypes.items() if box.value or name == "float32"]

    def update_auto_line(self) -> None:
        try:
            dtype, reasons = auto_dtype(self.device.value)
            self.auto_line.value = t("dash.precision.auto_picks", dtype=dtype, device=html.escape(self.device.value),
                                     reasons=html.escape("; ".join(reasons)))
        except Exception as e:
            self.auto_line.value = f"<b>dtype='auto'</b>: {html.escape(str(e))}"

    @action("dash.precision.measuring")
    def run(self) -> list[PrecisionResult]:
        dtypes = self.selected_dtypes()
        self.results = []
        self.table.value = ""
        self.start_progress(3 * len(dtypes), "")

        def on_step(text: str) -> None:
            self.step_progress()
            self.set_status(text)

        def on_result(result: PrecisionResult) -> None:
            if not result.ok:
                self.step_progress(2)  # a skipped precision reports one step instead of three
            self.results.append(result)
            self.table.value = results_table_html(self.results)
            self.chart.value = results_figure_png(self.results)

        compare_precisions(self.model_name, dtypes, device=self.device.value, prompt=self.prompt.value,
                           max_new_tokens=self.max_new_tokens.value, on_step=on_step, on_result=on_result)
        self.end_progress()
        skipped = [r for r in self.results if not r.ok]
        if skipped:
            self.set_status("; ".join(t("dash.precision.not_run", dtype=r.dtype, error=r.error) for r in skipped),
                            "warn")
        else:
            self.set_status(t("dash.precision.done", n=len(self.results), device=self.results[0].device), "ok")
        return self.results
