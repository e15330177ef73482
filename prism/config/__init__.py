"""Server configuration (being split by job; see the modules)."""

from prism.config.server import *  # noqa: F403
from prism.config.server import __all__  # noqa: F401
