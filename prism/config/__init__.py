"""Server configuration: frozen structs, loaded and validated once at start-up.

- ``load``: the layers (flags > ``PRISM_*`` env > TOML file > defaults),
  merged as plain data and decoded once, every error one line naming the
  field and its source;
- ``server``: ``ServerConfig`` (listeners, limits, workers, tenants), which
  validates itself on construction;
- ``namespaces``: a namespace's config (backend, options, cache) and its
  checks, backend options included (``prism.backends.catalog``);
- ``fields``: the error that names a field, and shared address syntaxes.

Nothing here imports trio, a driver or a backend: the supervisor process
loads (and reloads) the config.
"""

from prism.config.fields import FieldError, parse_host_port
from prism.config.load import (
    DEFAULT_CONFIG_FILE,
    ENV_VARS,
    ConfigSyntaxError,
    config_path,
    load_config,
    load_config_text,
)
from prism.config.namespaces import ABSTRACTIONS, CacheConfig, NamespaceConfig, TenantConfig
from prism.config.server import DEFAULT_TENANT, LOG_LEVELS, CacheTableConfig, ServerConfig

__all__ = [
    "ABSTRACTIONS",
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_TENANT",
    "ENV_VARS",
    "LOG_LEVELS",
    "CacheConfig",
    "CacheTableConfig",
    "ConfigSyntaxError",
    "FieldError",
    "NamespaceConfig",
    "ServerConfig",
    "TenantConfig",
    "config_path",
    "load_config",
    "load_config_text",
    "parse_host_port",
]
