"""Everything one serving process needs, built from the config.

``open_app`` opens each namespace's backend and builds the method table
(KeyValue, Health, reflection); ``App.aclose`` closes the backends.
"""

from __future__ import annotations

from pathlib import Path

from prism.api import health, keyvalue, reflection
from prism.api.pagetoken import PageTokens, load_or_create_key
from prism.backends import registry
from prism.backends.base import KeyValueBackend
from prism.config import ServerConfig
from prism.rpc.methods import MethodTable
from prism.rpc.server import ServerSettings

# Room for the response's own framing around a page of items.
_PAGE_OVERHEAD_BYTES = 64 * 1024


class App:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.backends: dict[str, KeyValueBackend] = {}
        self.health = health.HealthState()
        self.methods = MethodTable()
        self.settings = ServerSettings(
            self.methods,
            max_message_bytes=config.max_message_bytes,
            max_concurrent_streams=config.max_concurrent_streams,
        )

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()
        self.backends.clear()


async def open_app(config: ServerConfig) -> App:
    """Open every namespace's backend and register the services."""
    app = App(config)
    data_dir = Path(config.data_dir)
    try:
        for ns in config.namespaces:
            backend = registry.create(ns.backend, ns.options, data_dir=data_dir, namespace=ns.name)
            await backend.open()
            app.backends[ns.name] = backend
            app.health.set(ns.name, health.SERVING)
    except BaseException:
        await app.aclose()
        raise
    tokens = PageTokens(load_or_create_key(data_dir))
    max_page = max(1024, config.max_message_bytes - _PAGE_OVERHEAD_BYTES)
    kv = keyvalue.KeyValue(app.backends, tokens, max_limit_bytes=max_page)
    app.methods.add_service(keyvalue.SERVICE, kv)
    app.methods.add_service(health.SERVICE, health.Health(app.health))
    names = [*app.methods.service_names, reflection.SERVICE.full_name]
    app.methods.add_service(reflection.SERVICE, reflection.Reflection(names))
    return app
