"""Latency and memory: repeat a generation N times, with and without the KV cache, and plot the spread.

    LatencyDashboard(model, tokenizer)                        # sliders: prompt length, new tokens, repeats
    kv_cache_bytes(model.config, 4096, torch.bfloat16)        # 2 × layers × kv_heads × head_dim × bytes × tokens
    kv_cache_usage(lengths, max_model_len=4096, bytes_per_token=...)   # contiguous vs paged reservation

Why the KV cache matters: without it every decode step recomputes keys and values for the whole
context, so step ``i`` costs ``O(prompt + i)`` and the per-token latency climbs; with it a step only
computes the new token and reads the cached K/V.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import ipywidgets as widgets
import torch

from npukit.cjk import plot_text
from npukit.engine.kv_cache import kv_bytes_per_block, kv_shape
from npukit.i18n import t
from npukit.metrics import GenerationTiming, format_bytes, format_seconds, summarize, time_generation

from .base import Dashboard, action, figure_png, html_table, new_figure, resolve_model

CACHE_MODES = {"with KV cache": (True,), "without KV cache": (False,), "both": (True, False)}
MODE_LABEL = {"with KV cache": "dash.latency.with_cache", "without KV cache": "dash.latency.without_cache",
              "both": "dash.latency.both"}  # message keys of the toggle buttons (values stay CACHE_MODES' keys)
LABEL = {True: "dash.latency.kv_cache", False: "dash.latency.no_cache"}  # message keys
COLOUR = {True: "#4c72b0", False: "#dd8452"}
FILLER = ("The time to first token measures the prefill, and the time per output token measures each "
          "decode step. Paged attention stores keys and values in fixed size blocks. ")


# ------------------------------------------------------------------------------------------------
# KV cache arithmetic
# ------------------------------------------------------------------------------------------------


def kv_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """K and V of one token over all layers: 2 × layers × kv_heads × head_dim × bytes per element."""
    return kv_bytes_per_block(config, 1, dtype)


def kv_cache_bytes(config, num_tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the K/V of ``num_tokens`` tokens take: 2 × layers × kv_heads × head_dim × bytes × tokens."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return kv_bytes_per_token(config, dtype) * num_tokens


def kv_formula(config, dtype: torch.dtype = torch.float32) -> str:
    """The formula with this model's numbers filled in, e.g. '2 × 30 layers × 3 kv_heads × 64 head_dim × 4 bytes'."""
    layers, heads, dim = kv_shape(config)
    item = torch.empty((), dtype=dtype).element_size()
    return (f"2 (K and V) × {layers} layers × {heads} kv_heads × {dim} head_dim × {item} bytes "
            f"= {kv_bytes_per_token(config, dtype):,} bytes per token")


@dataclass
class KVUsage:
    """KV memory for a set of requests under two allocation schemes (all sizes in bytes)."""

    num_requests: int
    tokens: int  # tokens actually held (sum of the lengths)
    used_bytes: int  # what those tokens need
    contiguous_bytes: int  # one max_model_len buffer per request (the pre-vLLM way)
    paged_bytes: int  # whole blocks of block_size tokens, allocated as needed (vLLM's PagedAttention)

    @property
    def contiguous_waste(self) -> float:
        """Fraction of the contiguous reservation that holds no token."""
        return 1 - self.used_bytes / self.contiguous_bytes if self.contiguous_bytes else 0.0

    @property
    def paged_waste(self) -> float:
        """Fraction of the paged reservation that holds no token (only each request's last block)."""
        return 1 - self.used_bytes / self.paged_bytes if self.paged_bytes else 0.0


def kv_cache_usage(lengths: Sequence[int], max_model_len: int, bytes_per_token: int, block_size: int = 16) -> KVUsage:
    """KV bytes used vs reserved for requests of the given total lengths (prompt + output tokens)."""
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ValueError("lengths is empty: pass the token count of each request")
    if max_model_len < 1 or block_size < 1 or bytes_per_token < 1:
        raise ValueError("max_model_len, block_size and bytes_per_token must be positive")
    too_long = [n for n in lengths if n < 0 or n > max_model_len]
    if too_long:
        raise ValueError(f"{len(too_long)} lengths are outside 0..max_model_len={max_model_len} (e.g. {too_long[0]}): "
                         "clip them or raise max_model_len")
    tokens = sum(lengths)
    return KVUsage(
        num_requests=len(lengths),
        tokens=tokens,
        used_bytes=tokens * bytes_per_token,
        contiguous_bytes=len(lengths) * max_model_len * bytes_per_token,
        paged_bytes=sum(math.ceil(n / block_size) for n in lengths) * block_size * bytes_per_token,
    )


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def synthetic_prompt_ids(tokenizer, num_tokens: int) -> list[int]:
    """Exactly ``num_tokens`` token ids of plain English text (no chat template), for length sweeps."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    text = FILLER
    ids = tokenizer(text)["input_ids"]
    while len(ids) < num_tokens:
        text += FILLER
        ids = tokenizer(text)["input_ids"]
    return ids[:num_tokens]


def time_fixed_length(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, use_cache: bool = True
                      ) -> GenerationTiming:
    """One greedy generation of exactly ``max_new_tokens`` tokens (end-of-turn is ignored), timed per token."""
    # NOTE: min_new_tokens = max_new_tokens keeps every run the same length, so runs are comparable.
    return time_generation(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, use_cache=use_cache)


def _stats_cells(values: list[float], unit: str) -> list[str]:
    if not values:
        return ["n/a"] * 3
    s = summarize(values, unit=unit)
    f = format_seconds if unit == "s" else (lambda v: f"{v:.1f}")
    return [f(s.mean), f(s.median), f(s.p99)] if len(values) > 1 else [f(s.mean), "—", "—"]


class LatencyDashboard(Dashboard):
    """Repeat a fixed-length generation N times (with / without KV cache): distributions and memory."""

    title_key = "dash.latency.title"

    def __init__(self, model="smollm2-135m-instruct", tokenizer=None, *, device: str = "auto", dtype: str = "auto",
                 prompt_tokens: int = 64, max_new_tokens: int = 16, repeats: int = 3, cache: str = "both"):
        super().__init__()
        self.model, self.tokenizer, self.model_name = resolve_model(model, tokenizer, device=device, dtype=dtype)
        self.results: dict[bool, list[GenerationTiming]] = {}
        self.prompt_tokens = widgets.IntSlider(value=prompt_tokens, min=1, max=1024,
                                               description=t("dash.latency.prompt_tokens"),
                                               style={"description_width": "initial"})
        self.max_new_tokens = widgets.IntSlider(value=max_new_tokens, min=2, max=256,
                                                description=t("dash.new_tokens"),
                                                style={"description_width": "initial"})
        self.repeats = widgets.IntSlider(value=repeats, min=1, max=20, description=t("dash.latency.repeats"))
        self.cache = widgets.ToggleButtons(options=[(t(MODE_LABEL[m]), m) for m in CACHE_MODES], value=cache,
                                           description="")
        self.run_button = widgets.Button(description=t("dash.run"), button_style="primary", icon="play")
        self.run_button.on_click(lambda _: self.run())
        self.summary = widgets.HTML()
        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="900px"))
        dtype_name = str(self.model.dtype).removeprefix("torch.")
        formula = kv_formula(self.model.config, self.model.dtype)
        self.formula = widgets.HTML(t("dash.latency.formula", dtype=dtype_name, formula=formula))
        self.widget = widgets.VBox([
            self.header(t("dash.on_device", model=self.model_name, dtype=dtype_name, device=self.model.device)),
            widgets.HBox([self.prompt_tokens, self.max_new_tokens, self.repeats]),
            widgets.HBox([self.cache, self.run_button, self.progress]),
            self.formula, self.status, self.summary, self.chart,
        ])

    def describe(self) -> str:
        return f"LatencyDashboard(model={self.model_name!r})"

    def buttons(self) -> list[widgets.Button]:
        return [self.run_button]

    @action("dash.latency.measuring")
    def run(self) -> dict[bool, list[GenerationTiming]]:
        modes = CACHE_MODES[self.cache.value]
        n, new, repeats = self.prompt_tokens.value, self.max_new_tokens.value, self.repeats.value
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and n + new > limit:
            raise ValueError(t("dash.latency.too_long", total=n + new, limit=limit))
        ids = synthetic_prompt_ids(self.tokenizer, n)
        self.results = {m: [] for m in modes}
        self.start_progress(len(modes) * repeats, t("dash.latency.runs"))
        for use_cache in modes:
            self.set_status(t("dash.latency.warmup", mode=t(LABEL[use_cache])))
            time_fixed_length(self.model, self.tokenizer, ids[: min(n, 8)], 2, use_cache)
            for i in range(repeats):
                self.set_status(t("dash.latency.run_i", mode=t(LABEL[use_cache]), i=i + 1, n=repeats))
                self.results[use_cache].append(time_fixed_length(self.model, self.tokenizer, ids, new, use_cache))
                self.step_progress()
                self.refresh()
        self.end_progress()
        self.set_status(t("dash.latency.done", runs=len(modes) * repeats, prompt=n, new=new), "ok")
        return self.results

    # --- rendering -------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Redraw the table and the plots from ``self.results``."""
        self.summary.value = self._table_html()
        self.chart.value = self._figure_png()

    def _table_html(self) -> str:
        mean, runs_label = t("dash.latency.mean"), t("dash.latency.runs")
        header = [t("dash.latency.setting"), runs_label, f"TTFT {mean}", "TTFT p50", "TTFT p99", f"TPOT {mean}",
                  "TPOT p50", "TPOT p99", "tok/s", t("dash.latency.peak_mem"), t("dash.latency.kv_at_end")]
        rows = []
        for use_cache, runs in self.results.items():
            if not runs:
                continue
            end_tokens = runs[-1].metrics.num_prompt_tokens + runs[-1].metrics.num_output_tokens
            kv = kv_cache_bytes(self.model.config, end_tokens, self.model.dtype) if use_cache else 0
            rows.append([t(LABEL[use_cache]), len(runs),
                         *_stats_cells([r.ttft for r in runs if r.ttft is not None], "s"),
                         *_stats_cells([r.tpot for r in runs if r.tpot is not None], "s"),
                         _stats_cells([r.output_tokens_per_s for r in runs if r.output_tokens_per_s], "tok/s")[0],
                         format_bytes(max(r.peak_memory_bytes or 0 for r in runs)),
                         format_bytes(kv) if use_cache else t("dash.latency.none_kept")])
        return html_table(header, rows)

    def _figure_png(self) -> bytes:
        fig = new_figure(9, 5.4)
        (ax_itl, ax_dist), (ax_mem, ax_kv) = fig.subplots(2, 2)
        for use_cache, runs in self.results.items():
            if not runs:
                continue
            c, label = COLOUR[use_cache], plot_text(LABEL[use_cache])
            last = runs[-1]
            ax_itl.plot(range(2, len(last.itl) + 2), [x * 1e3 for x in last.itl], color=c, label=label)
            ax_mem.plot(range(1, len(runs) + 1), [(r.peak_memory_bytes or 0) / 2**20 for r in runs], "o-",
                        color=c, label=label)
        ax_itl.set(title=plot_text("dash.latency.itl_title"), xlabel=plot_text("dash.output_token"), ylabel="ms")
        from matplotlib.ticker import MaxNLocator

        ax_mem.xaxis.set_major_locator(MaxNLocator(integer=True))
        where = plot_text("dash.latency.rss" if self.model.device.type == "cpu" else "dash.latency.device")
        ax_mem.set(title=plot_text("dash.latency.mem_title", where=where), xlabel=plot_text("dash.latency.run"),
                   ylabel="MiB")
        groups = [(f"{m} {plot_text(LABEL[u])}",
                   [getattr(r, m.lower()) * 1e3 for r in runs if getattr(r, m.lower()) is not None])
                  for u, runs in self.results.items() if runs for m in ("TTFT", "TPOT")]
        groups = [(name, vals) for name, vals in groups if vals]
        if groups:
            ax_dist.boxplot([v for _, v in groups], showmeans=True)
            ax_dist.set_xticks(range(1, len(groups) + 1), [n.replace(" ", "\n", 1) for n, _ in groups], fontsize=8)
        ax_dist.set(title=plot_text("dash.latency.ttft_tpot_title"), ylabel="ms")
        total = self.prompt_tokens.value + self.max_new_tokens.value
        xs = list(range(0, max(total * 2, 64) + 1, max(1, max(total * 2, 64) // 64)))
        for dtype, c in ((torch.float32, "#8172b2"), (torch.bfloat16, "#55a868")):
            ax_kv.plot(xs, [kv_cache_bytes(self.model.config, x, dtype) / 2**20 for x in xs], color=c,
                       label=str(dtype).removeprefix("torch."))
        ax_kv.axvline(total, color="#999999", linestyle="--", label=plot_text("dash.latency.this_run", total=total))
        ax_kv.set(title=plot_text("dash.latency.kv_title"), xlabel=plot_text("dash.latency.tokens_in_context"),
                  ylabel="MiB")
        for ax in (ax_itl, ax_mem, ax_kv):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        return figure_png(fig)
