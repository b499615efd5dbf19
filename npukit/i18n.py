"""Messages in the user's language: English (default) and Chinese (中文).

    from npukit.i18n import t
    t("doctor.summary", passed=3, warned=1, failed=0, verdict=t("doctor.verdict_ok"))
    npukit.set_language("zh")      # or NPUKIT_LANG=zh, or a zh_CN locale (LC_ALL / LC_MESSAGES / LANG)

Every user-facing message lives in one catalogue per language: `npukit/locales/en.py` and `zh.py`, each a
dict `MESSAGES` of key -> `str.format` template. Code asks for a key and never branches on the language.
A key missing from a catalogue falls back to English (a test keeps zh complete, with the same {fields}).

NOTE: the language is looked up on every call (set_language(), else the environment), so a notebook's
setting cell or a test's monkeypatched environment takes effect at once. Standard library only: the CLI
imports this module, and `npukit --help` stays instant.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

LANGUAGES = ("en", "zh")
DEFAULT_LANGUAGE = "en"
# NOTE: POSIX precedence (LC_ALL over LC_MESSAGES over LANG), after npukit's own NPUKIT_LANG.
LANGUAGE_VARIABLES = ("NPUKIT_LANG", "LC_ALL", "LC_MESSAGES", "LANG")

_chosen: str | None = None  # set_language(); None: follow the environment


def normalize(value: str | None) -> str | None:
    """'zh', 'zh_CN.UTF-8', 'zh-Hans' -> 'zh'; 'en_US', 'C', 'POSIX' -> 'en'; '' or None -> None."""
    value = (value or "").strip().lower()
    if not value:
        return None
    return "zh" if value.startswith("zh") else "en"


def detect_language(environ: Mapping[str, str] | None = None) -> str:
    """The language the environment asks for: NPUKIT_LANG, then the locale; English when none is set."""
    environ = os.environ if environ is None else environ
    for name in LANGUAGE_VARIABLES:
        lang = normalize(environ.get(name))
        if lang is not None:
            return lang
    return DEFAULT_LANGUAGE


def set_language(lang: str | None) -> str:
    """Use `lang` ('en', 'zh', 'zh_CN', …) from now on; None goes back to the environment. Returns the language."""
    global _chosen
    if lang is not None and normalize(lang) is None:
        raise ValueError(f"unknown language {lang!r}: use one of {', '.join(LANGUAGES)}")
    _chosen = normalize(lang)
    return get_language()


def get_language() -> str:
    return _chosen or detect_language()


def catalogue(lang: str) -> dict[str, str]:
    """The messages of one language (npukit/locales/<lang>.py)."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}: use one of {', '.join(LANGUAGES)}")
    return importlib.import_module(f"npukit.locales.{lang}").MESSAGES


def is_message(key: str) -> bool:
    """Is `key` a message of the catalogues (every key is in the English one)?"""
    return key in catalogue(DEFAULT_LANGUAGE)


def t(key: str, /, lang: str | None = None, **fields) -> str:
    """The message `key` in `lang` (default: the current language), with `fields` filled in."""
    english = catalogue(DEFAULT_LANGUAGE)
    if key not in english:
        raise KeyError(f"no message {key!r} in npukit/locales/en.py")
    template = catalogue(lang or get_language()).get(key, english[key])
    return template.format(**fields)


def prompt(name: str, lang: str | None = None) -> str:
    """A demo prompt of the notebooks (key `prompt.<name>`), so the zh edition asks Chinese questions."""
    return t(f"prompt.{name}", lang=lang)
