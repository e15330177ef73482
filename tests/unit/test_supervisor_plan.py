"""The supervisor's decisions from configs alone: CPU planning and what a reload changes."""

from __future__ import annotations

import msgspec

from prism.config import CacheTableConfig, NamespaceConfig, ServerConfig, TenantConfig
from prism.config.security import AdminConfig, AdminTlsConfig
from prism.config.tracing import TracingConfig
from prism.workers.plan import (
    RESTART_ONLY_FIELDS,
    Handover,
    keep_restart_only_fields,
    plan_cpus,
    plan_reload,
)
from prism.workers.slot import Slot, SlotState


def tenant(
    name: str, workers: int = 1, cpus: tuple[int, ...] = (), namespaces: tuple[str, ...] = ()
) -> TenantConfig:
    return TenantConfig(
        name,
        workers=workers,
        cpus=cpus,
        namespaces=tuple(NamespaceConfig(n, backend="sqlite") for n in namespaces),
    )


# -- CPUs ----------------------------------------------------------------------


def test_a_tenants_own_cpus_are_used_in_turn() -> None:
    assert plan_cpus([tenant("a", workers=3, cpus=(2, 5))], allowed=[0, 1, 2, 3, 4, 5]) == [
        ("a", 2),
        ("a", 5),
        ("a", 2),
    ]


def test_tenants_without_cpus_share_the_allowed_ones_round_robin() -> None:
    tenants = [tenant("a", workers=2), tenant("pinned", workers=2, cpus=(7,)), tenant("b", workers=3)]
    assert plan_cpus(tenants, allowed=[1, 3]) == [
        ("a", 1),
        ("a", 3),
        ("pinned", 7),
        ("pinned", 7),
        # The round robin goes on where a left off; pinned tenants do not move it.
        ("b", 1),
        ("b", 3),
        ("b", 1),
    ]


def test_no_allowed_cpu_means_no_pinning() -> None:
    assert plan_cpus([tenant("a", workers=2), tenant("b", cpus=(4,))], allowed=[]) == [
        ("a", None),
        ("a", None),
        ("b", 4),
    ]


def test_a_tenant_with_no_workers_gets_none() -> None:
    assert plan_cpus([tenant("a", workers=0), tenant("b")], allowed=[0]) == [("b", 0)]


# -- reload ----------------------------------------------------------------------


def test_a_reload_that_changes_nothing_touches_no_worker() -> None:
    tenants = [tenant("a", workers=2, namespaces=("x",))]
    plan = plan_reload(tenants, tenants, {0: "a", 1: "a"})
    assert (plan.added, plan.replaced, plan.removed, plan.start, plan.retire) == ((), (), (), (), frozenset())


def test_namespace_changes_alone_keep_a_tenants_workers() -> None:
    """The running workers follow the routing table: no new process for a new namespace."""
    old = [tenant("a", namespaces=("x",))]
    new = [tenant("a", namespaces=("x", "y"))]
    plan = plan_reload(old, new, {0: "a"})
    assert plan.start == () and plan.retire == frozenset()


def test_a_changed_worker_count_or_cpu_set_replaces_the_tenants_workers() -> None:
    old = [tenant("a", workers=1), tenant("b", cpus=(0,)), tenant("c")]
    new = [tenant("a", workers=2), tenant("b", cpus=(1,)), tenant("c")]
    slots = {0: "a", 1: "b", 2: "c"}
    plan = plan_reload(old, new, slots)
    assert plan.replaced == ("a", "b")
    assert plan.added == () and plan.removed == ()
    assert [t.name for t in plan.start] == ["a", "b"]
    assert plan.start[0].workers == 2  # the new config's tenant
    # The running workers serve until the new ones do.
    assert plan.superseded == {"a": frozenset({0}), "b": frozenset({1})}
    assert plan.retire == frozenset()


def test_an_added_tenant_starts_with_nothing_to_supersede() -> None:
    plan = plan_reload([tenant("a")], [tenant("a"), tenant("new", workers=2)], {0: "a"})
    assert plan.added == ("new",)
    assert [(t.name, t.workers) for t in plan.start] == [("new", 2)]
    assert plan.superseded == {"new": frozenset()}


def test_a_removed_tenants_workers_retire_at_once() -> None:
    plan = plan_reload(
        [tenant("a"), tenant("gone", workers=2)], [tenant("a")], {0: "a", 1: "gone", 2: "gone"}
    )
    assert plan.removed == ("gone",)
    assert plan.retire == frozenset({1, 2})
    assert plan.start == () and plan.superseded == {}


def test_a_reload_supersedes_only_the_running_slots_it_is_given() -> None:
    """A second reload while the first one's workers start: both generations are superseded."""
    old = [tenant("a", workers=2)]
    new = [tenant("a", workers=3)]
    plan = plan_reload(old, new, {0: "a", 4: "a", 5: "a", 9: "b"})
    assert plan.superseded == {"a": frozenset({0, 4, 5})}


def test_the_new_workers_start_in_the_new_configs_order() -> None:
    old = [tenant("b"), tenant("a")]
    new = [tenant("z"), tenant("a", workers=2), tenant("b", workers=2)]
    plan = plan_reload(old, new, {0: "b", 1: "a"})
    assert [t.name for t in plan.start] == ["z", "a", "b"]
    assert plan.added == ("z",) and plan.replaced == ("a", "b")


def test_fields_a_reload_cannot_change_keep_their_running_values() -> None:
    running = ServerConfig(listen="127.0.0.1:1", data_dir="/srv/a")
    new = ServerConfig(
        listen="127.0.0.1:2",
        data_dir="/srv/b",
        cache=CacheTableConfig(total_bytes=1 << 20),
        log_level="debug",
    )
    kept, changed = keep_restart_only_fields(running, new)
    assert [name for name, _ in changed] == ["listen", "data_dir", "cache"]
    assert dict(changed)["listen"] == "127.0.0.1:1"
    for name in RESTART_ONLY_FIELDS:
        assert getattr(kept, name) == getattr(running, name)
    assert kept.log_level == "debug"  # the rest is the new config's


def test_a_reload_that_leaves_those_fields_alone_keeps_the_new_config_as_it_is() -> None:
    running = ServerConfig(log_level="info")
    new = msgspec.structs.replace(running, log_level="debug")
    kept, changed = keep_restart_only_fields(running, new)
    assert changed == [] and kept is new


def test_the_admin_token_and_certificate_change_only_at_restart() -> None:
    running = ServerConfig(admin_token_file="/etc/prism/admin.token")
    new = ServerConfig(
        admin_token_file="/etc/prism/other.token",
        admin=AdminConfig(tls=AdminTlsConfig("/etc/prism/admin.pem", "/etc/prism/admin.key")),
    )
    kept, changed = keep_restart_only_fields(running, new)
    assert [name for name, _ in changed] == ["admin_token_file", "admin"]
    assert kept.admin_token_file == "/etc/prism/admin.token"
    assert kept.admin.tls is None


def test_tracing_changes_only_at_restart() -> None:
    running = ServerConfig()
    tracing = TracingConfig(otlp_endpoint="http://collector:4318/v1/traces", access_log=True)
    new = ServerConfig(tracing=tracing)
    kept, changed = keep_restart_only_fields(running, new)
    assert changed == [("tracing", TracingConfig())]
    assert not kept.tracing.enabled


def _slot(slot_id: int, state: SlotState) -> Slot:
    slot = Slot(slot_id, "t", None)
    slot.state = state
    return slot


def test_superseded_workers_retire_once_every_replacement_serves() -> None:
    slots = {
        1: _slot(1, SlotState.SERVING),  # old
        2: _slot(2, SlotState.SERVING),  # new, serving
        3: _slot(3, SlotState.BOOTING),  # new, still booting
        4: _slot(4, SlotState.SERVING),  # old of another handover
        5: _slot(5, SlotState.SERVING),  # its replacement
    }
    waiting = Handover(frozenset({1}), frozenset({2, 3}))
    ready = Handover(frozenset({4}), frozenset({5}))
    retire, pending = Handover.settle([waiting, ready], slots)
    assert ([s.id for s in retire], pending) == ([4], [waiting])
    slots[3].state = SlotState.SERVING
    retire, pending = Handover.settle(pending, slots)
    assert ([s.id for s in retire], pending) == ([1], [])


def test_a_slot_is_silent_past_the_timeout_of_its_state() -> None:
    booting, serving, waiting = (
        _slot(1, SlotState.BOOTING),
        _slot(2, SlotState.SERVING),
        _slot(3, SlotState.WAITING),
    )
    for slot in (booting, serving, waiting):
        slot.last_beat = 100.0
    assert [s.silent_past(105.5, 60.0, 5.0) for s in (booting, serving, waiting)] == [None, 5.0, None]
    assert booting.silent_past(160.5, 60.0, 5.0) == 60.0
