"""The supervisor's side of live migrations (``prism.migrate``): the one writer of their states.

The admin process posts requests (``prism.migrate.requests``) and sends
SIGUSR1; the supervisor's loop calls ``Migrations.turn`` every turn, which

- takes the requests and checks each against the running config (the
  namespace exists, is KeyValue, on which backend with which options) and
  the state on disk (``prism.migrate.state``'s tables: ``start``,
  ``command``, ``set_rate``), saves the new state and answers the request in
  the routing table (``Routes.migration_answers``: the serial to wait for,
  or the one-line reason nothing changed);
- tells, for each migration, which workers of its tenant have not yet
  reported (heartbeat) the routing generation that first carried its serial
  (``MigrationEntry.lagging``): the admin process answers a command once
  none lags, and the automatic moves wait for it too: DUAL_WRITE ->
  BACKFILL once every worker writes to both backends (else a write taken by
  a worker still on the source alone could be missed by the copy), BACKFILL
  -> SHADOW_READ once the backfill's progress says done;
- goes back to the phase a command left when a worker could not apply the
  new one (writes it acknowledged were not on the backend that would
  answer: its counters say so, ``barrier``), and answers that command 409;
- ends a migration once every worker applied its end: an aborted one is
  removed (its namespace back on the source alone); a finished one first
  has the config file rewritten to name the target (``prism.config.rewrite``),
  then is removed, and the supervisor reloads (the same as SIGHUP).

The states travel to the workers in their tenant's own table (the target's
options may hold a password); the routing table carries ``MigrationEntry``,
which has none. Every phase change is one log line. No trio here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import msgspec

from prism.backends import catalog
from prism.backends.options import OptionError
from prism.config import NamespaceConfig, ServerConfig
from prism.config.rewrite import RewriteError, retarget
from prism.config.store import replace_file
from prism.errors import ConfigError
from prism.migrate import state as mstate
from prism.migrate.requests import MigrationRequest, RequestBox, clear_worker_stats, read_worker_stats
from prism.migrate.state import Endpoint, MigrationError, MigrationState, MigrationStore, Phase
from prism.redact import redact
from prism.router.table import MigrationEntry
from prism.validation import one_line
from prism.workers.slot import ACTIVE, Slot

__all__ = ["Migrations"]

log = logging.getLogger("prism.migrate")

MAX_ANSWERS: Final = 64
STATS_FRESH_S: Final = 5.0  # a worker's counters older than this are a gone worker's
PROGRESS_POLL_S: Final = 0.5
_UNPUBLISHED: Final = 1 << 62  # an ended entry's generation until the table that carries it
DEFAULT_RATE: Final = 1000
DEFAULT_SHADOW_FRACTION: Final = 0.1


class Refused(MigrationError):
    """A request that changes nothing; ``code`` is the HTTP status the admin process answers."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


def _now_ms() -> int:
    return int(time.time() * 1000)


class Migrations:
    """Every migration under way, as the supervisor holds them."""

    def __init__(self, data_dir: Path | str, config_file: str) -> None:
        self.store = MigrationStore(Path(data_dir))
        self.box = RequestBox(data_dir)
        self.data_dir = Path(data_dir)
        self.config_file = config_file
        self.states: dict[str, MigrationState] = {}
        self.ended: dict[str, MigrationEntry] = {}  # the last finished or aborted, until a new start
        self.answers: dict[str, tuple[int, int, str]] = {}  # id -> (serial, HTTP status, error)
        self.requested = True  # SIGUSR1 (and at start): look for requests this turn
        self._first: dict[str, tuple[int, int]] = {}  # namespace -> (serial, generation that carried it)
        self._lagging: dict[str, tuple[int, ...]] = {}
        self._next_poll = 0.0
        self._slots: list[Slot] = []  # as of this turn
        self._tenants: dict[str, str] = {}
        self._asked: dict[str, str] = {}  # namespace -> id of the request that made its state

    # -- boot ------------------------------------------------------------------

    def boot(self, config: ServerConfig) -> None:
        """Read the states on disk: migrations resume where they were."""
        try:
            states = self.store.all()
        except MigrationError as exc:
            log.error("migrations: %s", exc)
            return
        for st in states:
            ns = _find(config, st.namespace)
            if ns is None or ns.abstraction != "keyvalue":
                log.error(
                    "migration of %r ignored: the config has no KeyValue namespace of that name", st.namespace
                )
                continue
            if st.phase is Phase.FINISHED and Endpoint(ns.backend, ns.options) == st.target:
                self._remove(st)  # the config was rewritten, the state not yet removed
                continue
            self.states[st.namespace] = st
            log.info("migration of %s resumes in phase %s (serial %d)", st.namespace, st.phase, st.serial)

    # -- what the tables carry -------------------------------------------------

    def by_tenant(self, config: ServerConfig, cpus: int) -> dict[str, tuple[MigrationState, ...]]:
        """Each tenant's migrations, for its own table (options included)."""
        out: dict[str, tuple[MigrationState, ...]] = {}
        for tenant in config.effective_tenants(cpus):
            names = {ns.name for ns in tenant.namespaces}
            out[tenant.name] = tuple(s for n, s in sorted(self.states.items()) if n in names)
        return out

    def entries(
        self, generation: int, config: ServerConfig, cpus: int, slots: Iterable[Slot]
    ) -> dict[str, MigrationEntry]:
        """The routing table's view, as published in ``generation``."""
        owners = _owners(config, cpus)
        slots = list(slots)
        out = dict(self.ended)
        for name, st in self.states.items():
            first = self._first.get(name)
            if first is None or first[0] != st.serial:
                self._first[name] = first = (st.serial, generation)
            tenant = owners.get(name, "")
            lagging = _lagging(slots, tenant, first[1])
            self._lagging[name] = lagging
            out[name] = _entry(st, tenant, first[1], lagging)
        for name, entry in self.ended.items():
            if entry.generation == _UNPUBLISHED:
                entry = msgspec.structs.replace(entry, generation=generation)
            lagging = _lagging(slots, entry.tenant, entry.generation)
            out[name] = self.ended[name] = msgspec.structs.replace(entry, lagging=lagging)
        return out

    def table_answers(self) -> dict[str, tuple[int, int, str]]:
        return dict(self.answers)

    def moved(self, slots: Iterable[Slot], config: ServerConfig, cpus: int) -> bool:
        """Whether a migration's lagging workers changed since the last publish."""
        owners = _owners(config, cpus)
        slots = list(slots)
        for name in self.states:
            first = self._first.get(name)
            if first is not None and _lagging(slots, owners.get(name, ""), first[1]) != self._lagging.get(
                name
            ):
                return True
        return any(_lagging(slots, e.tenant, e.generation) != e.lagging for e in self.ended.values())

    # -- the loop's turn -------------------------------------------------------

    def turn(
        self, config: ServerConfig, cpus: int, slots: Iterable[Slot], reload: Callable[[], bool]
    ) -> bool:
        """Take requests and make the automatic moves; True if the tables must be published
        (a state changed, or which workers lag did).
        ``reload`` reloads the config file (a finished migration's rewrite): True if accepted."""
        changed = False
        now = time.monotonic()
        due = self.requested or now >= self._next_poll
        if not due and not self.states and not any(e.lagging for e in self.ended.values()):
            return False  # nothing under way: a turn of the loop costs nothing
        self._slots, self._tenants = list(slots), _owners(config, cpus)
        if due:
            self.requested = False
            self._next_poll = now + PROGRESS_POLL_S
            changed |= self._take(config, cpus)
            changed |= self._refused()
            changed |= self._advance()
        changed |= self._end(config, cpus, reload)
        return changed or self.moved(self._slots, config, cpus)

    def _take(self, config: ServerConfig, cpus: int) -> bool:
        requests, bad = self.box.take()
        for line in bad:
            log.warning("%s", line)
        changed = False
        for request in requests:
            try:
                self._apply(request, config)
                self._answer(request.id, self.states[request.namespace].serial, 200, "")
                self._asked[request.namespace] = request.id
                changed = True
            except MigrationError as exc:
                code = exc.code if isinstance(exc, Refused) else 500
                self._answer(request.id, 0, code, redact(one_line(str(exc))))
                log.warning("migration request refused: %s", redact(one_line(str(exc))))
                changed = True  # the answer is published
        return changed

    def _answer(self, request_id: str, serial: int, code: int, error: str) -> None:
        self.answers[request_id] = (serial, code, error)
        while len(self.answers) > MAX_ANSWERS:
            del self.answers[next(iter(self.answers))]

    def _apply(self, request: MigrationRequest, config: ServerConfig) -> None:
        current = self.states.get(request.namespace)
        try:
            new = self._decide(request, current, config)
        except Refused:
            raise
        except MigrationError as exc:  # the state machine's refusals: a bad value, or not in this phase
            raise Refused(422 if request.command in ("start", "rate") else 409, str(exc)) from None
        self._save(new, current)

    def _decide(
        self, request: MigrationRequest, current: MigrationState | None, config: ServerConfig
    ) -> MigrationState:
        name = request.namespace
        ns = _find(config, name)
        if ns is None:
            raise Refused(404, f"unknown namespace {name!r}")
        if ns.abstraction != "keyvalue":
            raise Refused(422, f"namespace {name!r} is {ns.abstraction}: only KeyValue namespaces migrate")
        now = _now_ms()
        if request.command == "start":
            if current is not None:
                raise Refused(
                    409,
                    f"namespace {name!r} is migrating already (phase {current.phase}): finish or abort it",
                )
            return self._start(request, ns, now)
        if current is None:
            raise Refused(409, f"no migration of {name!r} is under way: start one first")
        if request.command == "rate":
            return mstate.set_rate(current, mstate.check_rate(request.rate), now)
        if request.command not in mstate.COMMANDS:
            raise Refused(400, f"unknown migration command {request.command!r}")
        # The backfill's progress and every worker's queues (stats files, a second old at most).
        progress = mstate.merge_progress(
            self.store.load_progress(name), read_worker_stats(self.data_dir, name, fresh_s=STATS_FRESH_S)
        )
        new = mstate.command(current, progress, request.command, now)
        if request.command == "finish":
            self._rewritten(new)  # the file can be rewritten: checked before anything changes
        return new

    def _start(self, request: MigrationRequest, ns: NamespaceConfig, now: int) -> MigrationState:
        if request.to not in mstate.MIGRATABLE_BACKENDS - {"memory"}:
            allowed = ", ".join(sorted(mstate.MIGRATABLE_BACKENDS - {"memory"}))
            raise Refused(
                422, f"cannot migrate {ns.name!r} to {request.to!r}: the target must be one of {allowed}"
            )
        try:
            catalog.check("keyvalue", request.to, request.options)
        except OptionError as exc:
            raise Refused(
                422, f"options.{exc.field}: {exc.reason}" if exc.field else f"options: {exc.reason}"
            ) from None
        except ConfigError as exc:
            raise Refused(422, str(exc)) from None
        st = mstate.start(
            ns.name,
            Endpoint(ns.backend, dict(ns.options)),
            Endpoint(request.to, dict(request.options)),
            rate=DEFAULT_RATE if request.rate is None else request.rate,
            shadow_fraction=DEFAULT_SHADOW_FRACTION
            if request.shadow_fraction is None
            else request.shadow_fraction,
            now_ms=now,
        )
        self.ended.pop(ns.name, None)
        clear_worker_stats(self.data_dir, ns.name)
        return st

    def _save(self, new: MigrationState, old: MigrationState | None) -> None:
        self.store.save(new)
        self.states[new.namespace] = new
        if old is None or old.phase != new.phase:
            log.info(
                "migration of %s: phase %s -> %s (serial %d, %s -> %s)",
                new.namespace,
                old.phase if old is not None else "none",
                new.phase,
                new.serial,
                new.source.backend,
                new.target.backend,
            )
        else:
            log.info("migration of %s: rate %d records/s (serial %d)", new.namespace, new.rate, new.serial)

    def _applied(self, name: str) -> bool:
        """Every worker of the tenant reported the generation that carried this serial."""
        first = self._first.get(name)
        st = self.states[name]
        return (
            first is not None
            and first[0] == st.serial
            and not _lagging(self._slots, self._tenants.get(name, ""), first[1])
        )

    def _refused(self) -> bool:
        """Go back to the phase a command left when a worker could not apply the new one
        (writes it acknowledged were not on the backend that would answer in time:
        ``WorkerMigrations.switch``); the command's request is answered 409 with why."""
        changed = False
        for name, st in list(self.states.items()):
            if st.previous is None or not self._lagging.get(name):
                continue
            stats = read_worker_stats(self.data_dir, name, fresh_s=STATS_FRESH_S)
            why = [p.barrier for p in stats if p.barrier_serial == st.serial and p.barrier]
            back = mstate.revert(st, _now_ms()) if why else None
            if back is None:
                continue
            self._save(back, st)
            error = (
                f"cannot move the migration of {name!r} to {st.phase}: {'; '.join(sorted(why))}; "
                f"it stays in phase {back.phase} (try again once the backend keeps up)"
            )
            log.error("migration of %s: %s", name, error)
            request = self._asked.pop(name, None)
            if request is not None:
                self._answer(request, st.serial, 409, redact(one_line(error)))
            changed = True
        return changed

    def _advance(self) -> bool:
        changed = False
        for name, st in list(self.states.items()):
            if st.phase not in (Phase.DUAL_WRITE, Phase.BACKFILL) or not self._applied(name):
                continue
            try:
                progress = self.store.load_progress(name) if st.phase is Phase.BACKFILL else None
                new = mstate.advance(st, progress, _now_ms())
                if new is not None:
                    self._save(new, st)
                    changed = True
            except MigrationError as exc:
                log.error("migration of %s: %s", name, exc)
        return changed

    def _end(self, config: ServerConfig, cpus: int, reload: Callable[[], bool]) -> bool:
        changed = False
        for name, st in list(self.states.items()):
            if st.phase not in mstate.ENDED or not self._applied(name):
                continue
            tenant = _owners(config, cpus).get(name, "")
            try:
                if st.phase is Phase.FINISHED:
                    self._finish(st, reload)
                else:
                    self._remove(st)
            except (MigrationError, OSError, RewriteError) as exc:
                log.error("migration of %s: cannot end it yet: %s", name, redact(one_line(str(exc))))
                continue
            entry = _entry(st, tenant, _UNPUBLISHED, ())
            self.ended[name] = msgspec.structs.replace(entry, final=True)
            changed = True
        return changed

    def _rewritten(self, st: MigrationState) -> tuple[bytes, bytes]:
        if not self.config_file:
            raise Refused(
                409, "cannot finish: the server was started without a config file (--config) to rewrite"
            )
        try:
            with open(self.config_file, "rb") as f:
                old = f.read()
            return old, retarget(old, st.namespace, st.target.backend, st.target.options)
        except OSError as exc:
            raise Refused(
                409, f"cannot finish: cannot read {self.config_file}: {exc.strerror or exc}"
            ) from None
        except RewriteError as exc:
            raise Refused(409, f"cannot finish: {exc}") from None

    def _finish(self, st: MigrationState, reload: Callable[[], bool]) -> None:
        """Rewrite the config, let the state go, reload: the reload's tables name the target
        alone. A rejected reload puts both back (the namespace stays on the target, FINISHED)."""
        old, new = self._rewritten(st)
        replace_file(self.config_file, new)
        self._remove(st)
        if not reload():
            replace_file(self.config_file, old)
            self.store.save(st)
            self.states[st.namespace] = st
            raise MigrationError(
                f"the rewritten {self.config_file} was rejected; the namespace stays on the target"
            )

    def _remove(self, st: MigrationState) -> None:
        self.store.remove(st.namespace)
        self.states.pop(st.namespace, None)
        self._first.pop(st.namespace, None)
        self._lagging.pop(st.namespace, None)
        log.info(
            "migration of %s ended: %s (on %s alone)",
            st.namespace,
            st.phase,
            st.target.backend if st.phase is Phase.FINISHED else st.source.backend,
        )


def _find(config: ServerConfig, name: str) -> NamespaceConfig | None:
    return next((ns for ns in config.all_namespaces() if ns.name == name), None)


def _owners(config: ServerConfig, cpus: int) -> dict[str, str]:
    return {ns.name: t.name for t in config.effective_tenants(cpus) for ns in t.namespaces}


def _lagging(slots: Iterable[Slot], tenant: str, generation: int) -> tuple[int, ...]:
    return tuple(
        sorted(s.id for s in slots if s.tenant == tenant and s.state in ACTIVE and s.generation < generation)
    )


def _entry(st: MigrationState, tenant: str, generation: int, lagging: tuple[int, ...]) -> MigrationEntry:
    return MigrationEntry(
        namespace=st.namespace,
        tenant=tenant,
        phase=str(st.phase),
        serial=st.serial,
        source_backend=st.source.backend,
        target_backend=st.target.backend,
        rate=st.rate,
        shadow_fraction=st.shadow_fraction,
        started_ms=st.started_ms,
        changed_ms=st.changed_ms,
        generation=generation,
        lagging=lagging,
    )
