"""The supervisor's reload (SIGHUP, ``POST /v1/config``): ``Reloading``.

A reload reads the config file again and checks it whole (``prism serve
--check``'s rules, and that it fits this machine's CPUs) before anything
changes; a config that fails is rejected with the reason and the running one
keeps serving. An accepted one is planned by ``prism.workers.plan``: the
tenants whose workers must change get new workers, and the workers they
supersede serve until their replacements do (``Handover``); workers whose
namespaces are gone retire. Each step is noted for ``POST /v1/config``
(``ReloadNote``: pending, in effect, rejected, failed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prism.config import ServerConfig, TenantConfig
from prism.config.store import file_identity
from prism.errors import ConfigError
from prism.redact import redact
from prism.router.table import RELOAD_PENDING, RELOAD_REJECTED, ReloadNote
from prism.workers.plan import Handover, keep_restart_only_fields, plan_reload
from prism.workers.preflight import check_deployable
from prism.workers.resources import Resources
from prism.workers.sdnotify import SystemdNotifier
from prism.workers.slot import ACTIVE, Slot, SlotEvent, SlotState

log = logging.getLogger("prism.supervisor")


class Reloading:
    """The reload half of ``prism.workers.supervisor.Supervisor``, which
    holds the state declared here."""

    config: ServerConfig
    config_file: str
    _reload_config: Callable[[], ServerConfig]
    draining: bool
    notifier: SystemdNotifier
    resources: Resources
    allowed_cpus: list[int]
    slots: dict[int, Slot]
    generation: int
    security_serial: int
    reload_note: ReloadNote
    _routes_changed: bool
    _handovers: list[Handover]
    _reloaded: tuple[str, int] | None

    def _publish(self) -> None:
        raise NotImplementedError

    def _add_slots(self, tenants: tuple[TenantConfig, ...]) -> list[Slot]:
        raise NotImplementedError

    def _handle(self, slot: Slot, event: SlotEvent, detail: str = "") -> None:
        raise NotImplementedError

    def _note(self, file: str, state: str, reason: str = "", *, serial: int = 0) -> None:
        """Record what became of the latest reload (``Routes.reload``), published this turn."""
        self.reload_note = ReloadNote(serial or self.reload_note.serial, file, state, redact(reason))
        self._routes_changed = True

    def _reload(self) -> None:
        serial, file = self.reload_note.serial + 1, file_identity(self.config_file)  # before reading it
        if self.draining:
            log.warning("reload ignored: the server is draining")
            self._note(file, RELOAD_REJECTED, "the server is draining", serial=serial)
            self._publish()  # the draining loop publishes nothing itself
            return
        self.notifier.reloading()
        try:
            new = check_deployable(self._reload_config(), self.resources.routes_bytes)
            self.resources.tenants.check_fit(new, len(self.allowed_cpus))
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            self.notifier.ready("reload rejected")
            self._note(file, RELOAD_REJECTED, str(exc), serial=serial)
            return
        self._note(file, RELOAD_PENDING, serial=serial)
        new, kept = keep_restart_only_fields(self.config, new)
        self.security_serial += 1  # workers read the TLS and JWKS files again (rotation)
        for name, value in kept:
            log.warning("reload: %s changes only at restart; keeping %r", name, value)
        cpus = len(self.allowed_cpus)
        active = {s.id: s.tenant for s in self.slots.values() if s.state in ACTIVE}
        plan = plan_reload(self.config.effective_tenants(cpus), new.effective_tenants(cpus), active)
        self.config = new
        started = self._add_slots(plan.start)
        for tenant in plan.start:
            # The superseded workers serve until their replacements do.
            new_ids = frozenset(s.id for s in started if s.tenant == tenant.name)
            self._handovers.append(Handover(plan.superseded[tenant.name], new_ids))
        for slot_id in plan.retire:
            self._handle(self.slots[slot_id], SlotEvent.RETIRE)  # its namespaces are gone
        self._forget_gone()
        self._publish()  # before the new workers start: each reads the table at boot
        for slot in started:
            self._handle(slot, SlotEvent.START)
        log.info("reloaded: generation %d, %d workers", self.generation, len(self.slots))
        self._reloaded = ("reloaded", self.generation)  # READY=1 once in effect (the loop's)

    def _finish_handovers(self) -> None:
        """Retire a reload's superseded workers once their replacements serve."""
        retire, self._handovers = Handover.settle(self._handovers, self.slots)
        for slot in retire:
            self._handle(slot, SlotEvent.RETIRE)

    def _forget_gone(self) -> None:
        """Drop the slots of retired workers that have exited (the table stops listing them)."""
        for slot_id in [i for i, s in self.slots.items() if s.state is SlotState.GONE]:
            del self.slots[slot_id]
