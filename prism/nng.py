"""pynng, without the asyncio it imports for nothing.

pynng's ``_aio`` module imports asyncio at load time, for its asyncio
support; Prism's processes use nng from trio (or, in the supervisor, from no
loop at all), so asyncio is 30 modules and about 1.5 MB of every worker's
memory for nothing. Importing pynng through here puts a stand-in for
asyncio in ``sys.modules`` first, unless asyncio is already loaded: the real
module is imported the first time anything reads an attribute of it (pynng's
asyncio helper, if anything ever asked for one; ``from asyncio import ...``
anywhere), so code that does use asyncio still gets all of it.

Import pynng only as ``from prism.nng import pynng``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["pynng"]


class _OnFirstUse(types.ModuleType):
    """Stands for a module in ``sys.modules`` until one of its attributes is read."""

    def __getattr__(self, name: str) -> Any:
        module = sys.modules.get(self.__name__)
        if module is self or module is None:
            del sys.modules[self.__name__]
            module = importlib.import_module(self.__name__)
        return getattr(module, name)


if "asyncio" not in sys.modules and "pynng" not in sys.modules:
    sys.modules["asyncio"] = _OnFirstUse("asyncio")

import pynng  # noqa: E402  (after the stand-in, on purpose)
