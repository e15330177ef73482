"""PostgreSQL's error table: what each driver error tells the client.

SQLSTATE classes that mean "the database cannot serve now" (connection
exceptions 08, insufficient resources 53, operator intervention 57P such as
a shutdown, transaction rollback 40 such as a serialization failure or
deadlock) and 57014 (statement cancelled, e.g. by ``statement_timeout``) are
UNAVAILABLE: the client may retry. Any other server error is a fault in our
SQL or the schema: INTERNAL, with the SQLSTATE but not the server's text
(which may quote data). A failure with no SQLSTATE is the connection's
(cannot connect, lost, pool closed): UNAVAILABLE with the driver's text.
Except, in class 53, 53100 disk_full: RESOURCE_EXHAUSTED, as for SQLite (gRPC's
status codes name a full file system so).
"""

from __future__ import annotations

from prism.backends.errors import map_exceptions
from prism.drivers import pg
from prism.errors import Internal, PrismError, ResourceExhausted, Unavailable

UNAVAILABLE_CLASSES = ("08", "53", "57P", "40")
QUERY_CANCELED = "57014"
DISK_FULL = "53100"


def database_error(exc: pg.PgError) -> PrismError:
    """The gateway error for a server error or a connection failure."""
    state = exc.sqlstate
    if state is None:
        return Unavailable(str(exc))
    if state == DISK_FULL:
        return ResourceExhausted(f"postgres: disk is full (SQLSTATE {state})")
    if state.startswith(UNAVAILABLE_CLASSES) or state == QUERY_CANCELED:
        return Unavailable(f"postgres: database unavailable (SQLSTATE {state})")
    return Internal(f"postgres: database error (SQLSTATE {state})")


ERRORS = map_exceptions({pg.PoolTimeout: ResourceExhausted, pg.PgError: database_error})
