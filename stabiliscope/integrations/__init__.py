"""Callbacks that attach a `Watch` to training frameworks.

- `StabiliscopeCallback`: a Lightning callback (the `lightning` extra);
- `StabiliscopeTrainerCallback`: a Hugging Face `Trainer` callback
  (the `hf` extra).

Each callback is imported from its framework module on first access, so
`import stabiliscope.integrations` needs neither framework installed.
"""

from __future__ import annotations

import importlib

_CALLBACK_MODULES = {
    "StabiliscopeCallback": "stabiliscope.integrations.lightning",
    "StabiliscopeTrainerCallback": "stabiliscope.integrations.huggingface",
}

__all__ = sorted(_CALLBACK_MODULES)


def __getattr__(name: str):
    module_name = _CALLBACK_MODULES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
