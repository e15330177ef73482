"""The ``prism`` command: run the server, or call a running one's API.

``main`` parses the command line and runs ``serve`` and ``reload``. Each
API has its module of client commands: ``kv`` (KeyValue), ``ts``
(TimeSeries), ``pubsub`` (PubSub), all on the gRPC client plumbing and
output helpers of ``client``, and ``ns`` (``prism ns list``, from the admin
port's ``/v1/namespaces`` over HTTP) and ``apply`` (``prism apply FILE``:
``POST /v1/config``), both on ``admin_http``.

The client commands use stock grpcio and the generated stubs on purpose: it
is the same path a team's own client takes, so ``prism kv`` doubles as a
check that the server works with unmodified grpcio clients. grpcio is
imported only when a client command runs, so that ``prism serve`` does not
pay for it.

Failures are one line on stderr, never a traceback: ``prism: config error:
...`` (exit 2) for a bad configuration, ``prism: cannot reach HOST:PORT: ...``
when no server answered, ``prism: STATUS: details`` when one answered with an
error (exit 1).
"""

from prism.cli.client import DEFAULT_ENDPOINT, PageTokenLoop, display_bytes, error_line
from prism.cli.kv import (
    KeyValueStubLike,
    delete_items,
    get_items,
    item_json,
    put_item,
    render_items,
    render_records,
    scan_records,
)
from prism.cli.main import main, run

__all__ = [
    "DEFAULT_ENDPOINT",
    "KeyValueStubLike",
    "PageTokenLoop",
    "delete_items",
    "display_bytes",
    "error_line",
    "get_items",
    "item_json",
    "main",
    "put_item",
    "render_items",
    "render_records",
    "run",
    "scan_records",
]
