"""``prism ts write|read``: the TimeSeries API of a running server.

Times on the command line (``--time``, ``--from``, ``--to``) are one of:

- ``now``, or ``now-15m`` / ``now+2h`` (units ``us``, ``ms``, ``s``, ``m``,
  ``h``, ``d``);
- an ISO 8601 / RFC 3339 time with its offset: ``2026-12-06T17:00:00Z``,
  ``2026-12-06T18:00:00.25+01:00`` (a time without one is refused: whose
  local time would it be?);
- an integer: microseconds since the epoch, the API's own unit
  (``event_time_us``), as ``ts read --json`` prints them.
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from prism.cli.client import (
    EXIT_USAGE,
    arg_bytes,
    call_options,
    display_bytes,
    display_text,
    follow_pages,
    key_value,
    pairs_to_dict,
    positive_int,
    run_calls,
    to_json,
    with_pairs,
)
from prism.proto import common_pb2, timeseries_pb2

if TYPE_CHECKING:
    import grpc

_Req = TypeVar("_Req", contravariant=True)
_Resp = TypeVar("_Resp", covariant=True)

_RELATIVE = re.compile(r"now(?:([+-])(\d+)(us|ms|s|m|h|d))?")
_UNIT_US = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A page of ReadEvents at most (the server's own cap is higher).
_PAGE_ITEMS = 1000


class _Unary(Protocol[_Req, _Resp]):
    def __call__(self, request: _Req, *, timeout: float | None = ...) -> _Resp: ...


class TimeSeriesStubLike(Protocol):
    """The part of ``timeseries_pb2_grpc.TimeSeriesStub`` the CLI calls."""

    @property
    def WriteEvents(
        self,
    ) -> _Unary[timeseries_pb2.WriteEventsRequest, timeseries_pb2.WriteEventsResponse]: ...
    @property
    def ReadEvents(
        self,
    ) -> _Unary[timeseries_pb2.ReadEventsRequest, timeseries_pb2.ReadEventsResponse]: ...


# ---------------------------------------------------------------- times


def now_us() -> int:
    return time.time_ns() // 1000


def parse_time(text: str, now: Callable[[], int] = now_us) -> int:
    """A command-line time as microseconds since the epoch (see the module's doc)."""
    text = text.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        sign, amount, unit = relative.groups()
        offset = int(amount) * _UNIT_US[unit] if amount else 0
        return now() - offset if sign == "-" else now() + offset
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected now, now-15m, an ISO 8601 time like 2026-12-06T17:00:00Z, or microseconds "
            f"since the epoch; got {text!r}"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset: give one, as in 2026-12-06T17:00:00Z or ...T18:00:00+01:00"
        )
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_time(time_us: int) -> str:
    """``2026-12-06T17:00:00.000001Z``; out of datetime's range: the microseconds as they are."""
    seconds, micros = divmod(time_us, 1_000_000)
    try:
        moment = datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
    except (OverflowError, OSError, ValueError):
        return str(time_us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------- calls


def write_event(
    stub: TimeSeriesStubLike, namespace: str, event: timeseries_pb2.Event, timeout_s: float
) -> None:
    stub.WriteEvents(
        timeseries_pb2.WriteEventsRequest(namespace=namespace, events=[event]), timeout=timeout_s
    )


def read_events(
    stub: TimeSeriesStubLike,
    namespace: str,
    series_id: str,
    start_us: int,
    end_us: int,
    timeout_s: float,
    *,
    reverse: bool = False,
    limit: int = 0,
) -> Iterator[timeseries_pb2.Event]:
    """Events of one series in ``[start_us, end_us)`` (0: unbounded), all pages or ``limit`` events."""
    page_items = min(limit, _PAGE_ITEMS) if limit else _PAGE_ITEMS
    selection = common_pb2.Selection(limit_items=page_items, reverse=reverse)

    def fetch(token: str) -> timeseries_pb2.ReadEventsResponse:
        request = timeseries_pb2.ReadEventsRequest(
            namespace=namespace,
            series_id=series_id,
            start_time_us=start_us,
            end_time_us=end_us,
            selection=selection,
            page_token=token,
        )
        return stub.ReadEvents(request, timeout=timeout_s)

    def events() -> Iterator[timeseries_pb2.Event]:
        for page in follow_pages(fetch):
            yield from page.events

    return islice(events(), limit) if limit else events()


# ---------------------------------------------------------------- output


def event_json(event: timeseries_pb2.Event) -> dict[str, Any]:
    """An event for JSON output: the payload as text where UTF-8, else base64 under ``payload_b64``."""
    out: dict[str, Any] = {
        "series_id": event.series_id,
        "event_time_us": event.event_time_us,
        "time": format_time(event.event_time_us),
        "event_id": event.event_id,
    }
    try:
        out["payload"] = event.payload.decode("utf-8")
    except UnicodeDecodeError:
        out["payload_b64"] = base64.b64encode(event.payload).decode("ascii")
    out["tags"] = dict(sorted(event.tags.items()))
    return out


def render_events(events: Iterable[timeseries_pb2.Event], as_json: bool) -> Iterator[str]:
    """Lines for ``ts read``: ``TIME EVENT_ID = PAYLOAD [k=v ...]``, or one JSON object per event."""
    for event in events:
        if as_json:
            yield to_json(event_json(event))
            continue
        when, event_id = format_time(event.event_time_us), display_text(event.event_id)
        yield with_pairs(f"{when} {event_id} = {display_bytes(event.payload)}", event.tags)


# ---------------------------------------------------------------- commands


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ts = commands.add_parser("ts", help="call the TimeSeries API of a running server")
    ops = ts.add_subparsers(dest="ts_command", required=True, metavar="OP")
    common = call_options()

    write = ops.add_parser("write", parents=[common], help="write one event")
    write.add_argument("namespace", metavar="NAMESPACE")
    write.add_argument("series_id", metavar="SERIES")
    write.add_argument("payload", metavar="PAYLOAD")
    write.add_argument("--time", type=parse_time, metavar="TIME", help="the event's time (default: now)")
    write.add_argument(
        "--id", dest="event_id", metavar="EVENT_ID", help="the event's id (default: a new UUID)"
    )
    write.add_argument(
        "--tag", type=key_value, action="append", default=[], metavar="KEY=VALUE", help="a tag (repeatable)"
    )
    write.set_defaults(handler=_cmd_write)

    read = ops.add_parser("read", parents=[common], help="read the events of one series, oldest first")
    read.add_argument("namespace", metavar="NAMESPACE")
    read.add_argument("series_id", metavar="SERIES")
    read.add_argument(
        "--from", dest="start", type=parse_time, metavar="TIME", help="inclusive (default: the first)"
    )
    read.add_argument(
        "--to", dest="end", type=parse_time, metavar="TIME", help="exclusive (default: the last)"
    )
    read.add_argument("--reverse", action="store_true", help="newest first")
    read.add_argument("--limit", type=positive_int, default=0, metavar="N", help="at most N events")
    read.set_defaults(handler=_cmd_read)


def _stub(channel: grpc.Channel) -> TimeSeriesStubLike:
    from prism.proto import timeseries_pb2_grpc

    make_stub: Callable[[grpc.Channel], TimeSeriesStubLike] = timeseries_pb2_grpc.TimeSeriesStub
    return make_stub(channel)


def _usage(message: str) -> int:
    print(message, file=sys.stderr)
    return EXIT_USAGE


def _cmd_write(args: argparse.Namespace) -> int:
    try:
        tags = pairs_to_dict("--tag", args.tag)
    except ValueError as exc:
        return _usage(str(exc))
    if args.event_id == "":
        return _usage("prism: --id must not be empty")
    event = timeseries_pb2.Event(
        series_id=args.series_id,
        event_time_us=now_us() if args.time is None else args.time,
        event_id=args.event_id or uuid.uuid4().hex,
        payload=arg_bytes(args.payload),
        tags=tags,
    )

    def lines(channel: grpc.Channel) -> Iterator[str]:
        write_event(_stub(channel), args.namespace, event, args.timeout)
        if args.json:
            yield to_json({"ok": True, **event_json(event)})
        else:
            yield f"ok time={format_time(event.event_time_us)} id={display_text(event.event_id)}"

    return run_calls(args, lines)


def _cmd_read(args: argparse.Namespace) -> int:
    # 0 is "unbounded" in the API: a bound the user gave that is exactly the
    # epoch would silently mean no bound at all.
    for flag, value in (("--from", args.start), ("--to", args.end)):
        if value == 0:
            return _usage(f"prism: {flag} 0 (the epoch) means no bound to the server: give 1 or leave it out")

    def lines(channel: grpc.Channel) -> Iterator[str]:
        events = read_events(
            _stub(channel),
            args.namespace,
            args.series_id,
            args.start or 0,
            args.end or 0,
            args.timeout,
            reverse=args.reverse,
            limit=args.limit,
        )
        return render_events(events, args.json)

    return run_calls(args, lines)
