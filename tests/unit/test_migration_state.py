"""A migration's phases and commands (``prism/migrate/state.py``): every allowed and
refused command, the automatic moves, bad inputs, and the files on disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec
import pytest

from prism.migrate.state import (
    COMMANDS,
    Endpoint,
    MigrationError,
    MigrationState,
    MigrationStore,
    Phase,
    Progress,
    advance,
    command,
    merge_progress,
    set_rate,
    start,
)

SQLITE = Endpoint("sqlite", {"path": "/data/a.sqlite3"})
PG = Endpoint("postgres", {"dsn": "postgresql://127.0.0.1/app"})


def new(**kw: object) -> MigrationState:
    args: dict[str, object] = {"rate": 1000, "shadow_fraction": 0.1, "now_ms": 5}
    args.update(kw)
    return start("profiles", SQLITE, PG, **args)  # type: ignore[arg-type]


def at(phase: Phase) -> MigrationState:
    return msgspec.structs.replace(new(), phase=phase, serial=7)


def test_start_is_dual_write_with_serial_1() -> None:
    s = new()
    assert (s.phase, s.serial, s.started_ms, s.changed_ms, s.rate) == (Phase.DUAL_WRITE, 1, 5, 5, 1000)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"rate": 0}, "rate must be an integer from 1 to 1000000"),
        ({"rate": 1_000_001}, "rate must be"),
        ({"rate": 2.5}, "rate must be"),
        ({"rate": True}, "rate must be"),
        ({"shadow_fraction": -0.1}, "shadow_fraction must be a number from 0 to 1"),
        ({"shadow_fraction": 1.5}, "shadow_fraction must be"),
        ({"shadow_fraction": float("nan")}, "shadow_fraction must be"),
        ({"shadow_fraction": "0.5"}, "shadow_fraction must be"),
    ],
)
def test_start_refuses_bad_numbers(kw: dict[str, object], message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        new(**kw)


def test_start_refuses_the_same_backend_and_options() -> None:
    with pytest.raises(MigrationError, match="cannot migrate 'profiles' to sqlite with the same options"):
        start(
            "profiles",
            SQLITE,
            Endpoint("sqlite", {"path": "/data/a.sqlite3"}),
            rate=1,
            shadow_fraction=0,
            now_ms=0,
        )
    # the same engine elsewhere is a migration
    other = Endpoint("sqlite", {"path": "/data/b.sqlite3"})
    assert start("profiles", SQLITE, other, rate=1, shadow_fraction=0, now_ms=0).target == other


@pytest.mark.parametrize("backend", ["nats", "", "mysql"])
def test_start_refuses_a_backend_that_cannot_hold_keyvalue(backend: str) -> None:
    with pytest.raises(MigrationError, match=f"target backend '{backend}' is not one of memory, postgres"):
        start("profiles", SQLITE, Endpoint(backend), rate=1, shadow_fraction=0, now_ms=0)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x" * 129, "é"])
def test_start_refuses_a_bad_namespace_name(name: str) -> None:
    with pytest.raises(MigrationError, match="must be 1-128 characters"):
        start(name, SQLITE, PG, rate=1, shadow_fraction=0, now_ms=0)


ALLOWED = {
    ("promote", Phase.SHADOW_READ): Phase.PROMOTED,
    ("finish", Phase.PROMOTED): Phase.FINISHED,
    ("abort", Phase.DUAL_WRITE): Phase.ABORTED,
    ("abort", Phase.BACKFILL): Phase.ABORTED,
    ("abort", Phase.SHADOW_READ): Phase.ABORTED,
    ("abort", Phase.PROMOTED): Phase.ABORTED,
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("phase", list(Phase))
def test_every_command_in_every_phase(name: str, phase: Phase) -> None:
    state = at(phase)
    done = Progress(copied=10, done=True)
    if (name, phase) in ALLOWED:
        moved = command(state, done, name, now_ms=99)
        assert (moved.phase, moved.serial, moved.changed_ms) == (ALLOWED[name, phase], 8, 99)
        assert state.phase is phase  # the old state is not changed
    else:
        with pytest.raises(
            MigrationError, match=f"cannot {name} the migration of 'profiles' in phase {phase}"
        ):
            command(state, done, name, now_ms=99)


def test_a_refusal_says_what_is_allowed() -> None:
    with pytest.raises(MigrationError) as e:
        command(at(Phase.BACKFILL), Progress(copied=42), "promote", now_ms=0)
    assert str(e.value) == (
        "cannot promote the migration of 'profiles' in phase backfill; the backfill is not done "
        "(42 records copied) (allowed now: abort)"
    )
    with pytest.raises(MigrationError, match=r"phase finished \(the migration is over\)"):
        command(at(Phase.FINISHED), None, "abort", now_ms=0)


@pytest.mark.parametrize("name", ["", "PROMOTE", "start", "rollback"])
def test_unknown_command(name: str) -> None:
    with pytest.raises(
        MigrationError, match=f"unknown migration command {name!r}: use one of promote, finish"
    ):
        command(at(Phase.SHADOW_READ), None, name, now_ms=0)


def test_promote_refused_when_dual_writes_were_dropped() -> None:
    with pytest.raises(MigrationError, match="3 writes to the target were dropped"):
        command(at(Phase.SHADOW_READ), Progress(done=True, dropped=3), "promote", now_ms=0)


def test_promote_refused_while_writes_wait_for_the_target() -> None:
    with pytest.raises(MigrationError, match="cannot promote 'profiles' yet: 2 writes wait for the target"):
        command(at(Phase.SHADOW_READ), Progress(done=True, queued=2), "promote", now_ms=0)
    # abort is never refused for it
    assert command(at(Phase.SHADOW_READ), Progress(queued=2), "abort", now_ms=0).phase is Phase.ABORTED


def test_advance() -> None:
    dual = at(Phase.DUAL_WRITE)
    moved = advance(dual, None, now_ms=10)
    assert moved is not None and (moved.phase, moved.serial) == (Phase.BACKFILL, 8)
    back = at(Phase.BACKFILL)
    assert advance(back, None, now_ms=10) is None
    assert advance(back, Progress(copied=5, done=False), now_ms=10) is None
    moved = advance(back, Progress(copied=5, done=True), now_ms=10)
    assert moved is not None and moved.phase is Phase.SHADOW_READ
    for phase in (Phase.SHADOW_READ, Phase.PROMOTED, Phase.FINISHED, Phase.ABORTED):
        assert advance(at(phase), Progress(done=True), now_ms=10) is None


def test_set_rate() -> None:
    moved = set_rate(at(Phase.BACKFILL), 50, now_ms=3)
    assert (moved.rate, moved.serial) == (50, 8)
    with pytest.raises(MigrationError, match="rate must be"):
        set_rate(at(Phase.BACKFILL), 0, now_ms=3)
    with pytest.raises(MigrationError, match="is aborted: no rate to change"):
        set_rate(at(Phase.ABORTED), 5, now_ms=3)


def test_merge_progress_sums_the_workers_counters() -> None:
    backfill = Progress(cursor="k9", copied=9, records_per_s=3.0, mismatches={"value": 1})
    merged = merge_progress(
        backfill,
        [
            Progress(
                target_failures=2,
                queued=1,
                shadow_reads=4,
                mismatches={"missing": 2},
                mismatched_reads=1,
                updated_ms=7,
            ),
            Progress(target_failures=1, dropped=5, mismatches={"value": 1}, updated_ms=3),
        ],
    )
    assert (merged.cursor, merged.copied, merged.target_failures, merged.queued, merged.dropped) == (
        "k9",
        9,
        3,
        1,
        5,
    )
    assert merged.mismatches == {"value": 2, "missing": 2} and merged.mismatched_reads == 1
    assert merged.updated_ms == 7
    assert backfill.mismatches == {"value": 1}  # not changed
    assert merge_progress(None, []) == Progress()


# --- the files ---------------------------------------------------------------


def test_store_round_trip_and_modes(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    assert store.load("profiles") is None and store.all() == [] and store.load_progress("profiles") is None
    s = new()
    store.save(s)
    store.save_progress("profiles", Progress(cursor="u1", copied=1))
    assert store.load("profiles") == s
    assert store.load_progress("profiles") == Progress(cursor="u1", copied=1)
    assert store.all() == [s]
    root = tmp_path / "migrations"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "profiles.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "progress" / "profiles.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in root.iterdir()) == ["profiles.json", "progress"]  # no temporary left


def test_store_lists_only_state_files(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    s = new()
    store.save(s)
    store.save_progress("profiles", Progress())
    store.save(
        command(start("gone", SQLITE, PG, rate=1, shadow_fraction=0, now_ms=0), None, "abort", now_ms=1)
    )
    store.remove("gone")
    (tmp_path / "migrations" / ".tmp-x1y2.part").write_bytes(b"half a file")  # a crash mid-save
    (tmp_path / "migrations" / "notes.txt").write_bytes(b"x")
    assert store.all() == [s]


def test_store_namespaces_with_dots_do_not_collide(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    a = new()
    b = start("profiles.progress", SQLITE, PG, rate=1, shadow_fraction=0, now_ms=0)
    store.save(a)
    store.save(b)
    store.save_progress("profiles", Progress(copied=3))
    assert [s.namespace for s in store.all()] == ["profiles", "profiles.progress"]
    assert store.load("profiles.progress") == b


def test_store_replaces_whole_and_keeps_the_newest(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    s = new()
    store.save(s)
    inode = (tmp_path / "migrations" / "profiles.json").stat().st_ino
    moved = command(msgspec.structs.replace(s, phase=Phase.SHADOW_READ), None, "promote", now_ms=1)
    store.save(moved)
    assert (tmp_path / "migrations" / "profiles.json").stat().st_ino != inode  # a new file, renamed over
    assert store.load("profiles") == moved


def test_store_remove_keeps_the_last_state(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    s = command(new(), None, "abort", now_ms=9)
    store.save(s)
    store.save_progress("profiles", Progress(copied=3))
    store.remove("profiles")
    assert store.load("profiles") is None and store.load_progress("profiles") is None and store.all() == []
    assert store.last("profiles") == s
    store.remove("profiles")  # nothing left: no error


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b'{"namespace": "profiles"}', b'{"namespace": "profiles", "x": 1}', b"[1]"],
)
def test_a_corrupt_state_file_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    store = MigrationStore(tmp_path)
    store.save(new())
    (tmp_path / "migrations" / "profiles.json").write_bytes(content)
    for call in (lambda: store.load("profiles"), store.all):
        with pytest.raises(MigrationError) as e:
            call()
        text = str(e.value)
        assert text.startswith(f"migration state {tmp_path}/migrations/profiles.json: corrupt (")
        assert "\n" not in text and text.endswith("remove it or fix it")


def test_a_corrupt_progress_file_is_one_clear_error(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    store.save_progress("profiles", Progress())
    (tmp_path / "migrations" / "progress" / "profiles.json").write_bytes(b'{"copied": "many"}')
    with pytest.raises(MigrationError, match=r"progress/profiles\.json: corrupt"):
        store.load_progress("profiles")


def test_a_state_file_naming_another_namespace(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    store.save(new())
    os.rename(tmp_path / "migrations" / "profiles.json", tmp_path / "migrations" / "other.json")
    with pytest.raises(MigrationError, match="names namespace 'profiles', not its file's"):
        store.load("other")


def test_a_huge_file_is_refused_unread(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    store.save(new())
    (tmp_path / "migrations" / "profiles.json").write_bytes(b" " * (2 << 20))
    with pytest.raises(MigrationError, match="larger than 1048576 bytes"):
        store.load("profiles")


def test_store_refuses_a_path_for_a_bad_name(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    with pytest.raises(MigrationError, match="must be 1-128 characters"):
        store.load("../etc/passwd")
    with pytest.raises(MigrationError, match="must be 1-128 characters"):
        store.save_progress("a/b", Progress())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")
def test_store_cannot_write_is_one_error_and_keeps_the_old_file(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    s = new()
    store.save(s)
    (tmp_path / "migrations").chmod(0o500)
    try:
        with pytest.raises(MigrationError, match=r"profiles\.json: cannot write: Permission denied"):
            store.save(command(s, None, "abort", now_ms=1))
    finally:
        (tmp_path / "migrations").chmod(0o700)
    assert store.load("profiles") == s


def test_store_cannot_write_where_the_data_dir_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "migrations").write_bytes(b"x")
    store = MigrationStore(tmp_path)
    with pytest.raises(MigrationError, match="cannot write"):
        store.save(new())
    with pytest.raises(MigrationError, match="cannot list"):
        store.all()


def test_the_state_module_loads_no_trio() -> None:
    # The supervisor and the admin process import it; neither may load trio.
    import subprocess
    import sys

    code = (
        "import sys, prism.migrate.state; print(sorted(m for m in sys.modules if m.split('.')[0] == 'trio'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
