"""Chinese labels on matplotlib plots: find a CJK font, or fall back to English labels.

    from npukit.cjk import plot_text
    ax.set(title=plot_text("dash.latency.itl_title"))   # 中文 when the language is zh and a CJK font exists

matplotlib's default font (DejaVu Sans) has no Chinese glyphs: a Chinese label would render as empty boxes
(with a "Glyph missing" warning). So a plot label is translated only when a CJK font is installed; then that
font is put first in ``font.sans-serif``. Without one, plots warn once (how to install a font) and keep their
English labels. Text outside plots (widgets, tables, messages) needs no matplotlib font: use ``npukit.i18n.t``.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

from npukit.i18n import DEFAULT_LANGUAGE, get_language, t

# NOTE: family names as matplotlib's font_manager reports them, most common on Debian/Ubuntu/ModelArts first.
CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans SC", "Noto Serif CJK SC",
    "Source Han Sans SC", "Source Han Sans CN", "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
    "Droid Sans Fallback", "AR PL UMing CN", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC",
)
# File names of the same fonts, for system fonts installed after matplotlib built its font cache.
CJK_FILE_HINTS = ("notosanscjk", "notoserifcjk", "notosanssc", "sourcehansans", "wqy", "droidsansfallback",
                  "uming", "simhei", "msyh", "pingfang")

_warned = False


def _known_families() -> set[str]:
    from matplotlib import font_manager

    return {f.name for f in font_manager.fontManager.ttflist}


@lru_cache(maxsize=1)
def find_cjk_font() -> str | None:
    """The family name of an installed CJK font that matplotlib can use, or None.

    Looks in matplotlib's font list, then among the system fonts (a font installed after matplotlib cached its
    list is added to it here).
    """
    families = _known_families()
    for name in CJK_FAMILIES:
        if name in families:
            return name
    from matplotlib import font_manager

    for path in font_manager.findSystemFonts():
        if any(hint in Path(path).name.lower().replace("-", "").replace("_", "") for hint in CJK_FILE_HINTS):
            try:
                font_manager.fontManager.addfont(path)
            except (OSError, RuntimeError, ValueError):
                continue
    families = _known_families()
    return next((name for name in CJK_FAMILIES if name in families), None)


def use_cjk_font() -> str | None:
    """Put the CJK font first in matplotlib's sans-serif list; its name, or None (then warn once)."""
    global _warned
    font = find_cjk_font()
    if font is None:
        if not _warned:
            _warned = True
            warnings.warn(t("plot.no_cjk_font"), stacklevel=3)
        return None
    from matplotlib import rcParams

    if rcParams["font.sans-serif"][:1] != [font]:
        rcParams["font.sans-serif"] = [font] + [f for f in rcParams["font.sans-serif"] if f != font]
    return font


def plot_language() -> str:
    """The language of plot labels: npukit's language, or English when it needs a font that is missing."""
    lang = get_language()
    if lang == DEFAULT_LANGUAGE or use_cjk_font() is not None:
        return lang
    return DEFAULT_LANGUAGE


def plot_text(key: str, /, **fields) -> str:
    """`t(key, **fields)` for a plot label: in English when the language needs a CJK font and none is installed."""
    return t(key, lang=plot_language(), **fields)
