"""npukit: learn and tune LLM inference on Ascend NPUs (torch_npu), with CUDA and CPU fallback.

Heavy modules (torch, transformers) load on first use, so `npukit --help` stays fast.
"""
from __future__ import annotations

import importlib

# NOTE: imported eagerly (it is stdlib-only at import time) so that `npukit.doctor` is the function, not the
# submodule of the same name that a later `import npukit.doctor` would otherwise bind here.
from .doctor import doctor  # noqa: F401 - re-exported
from .i18n import set_language  # noqa: F401 - stdlib-only: npukit.set_language("zh") before a dashboard or doctor()
from .plan import plan  # noqa: F401 - stdlib-only at import time too; same reason as doctor

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "npukit.loading",
    "LoadReport": "npukit.loading",
    "download": "npukit.hub",
    "Chat": "npukit.chat",
    "LLM": "npukit.engine",
    "SamplingParams": "npukit.engine",
    "EngineConfig": "npukit.engine",
    "RequestOutput": "npukit.engine",
    "EMBEDDED": "npukit.samples",
}

__all__ = sorted([*_EXPORTS, "doctor", "plan", "set_language"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'npukit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
