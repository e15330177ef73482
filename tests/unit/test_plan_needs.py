"""Declared needs (prism.plan.needs): TOML and .proto files, and what each
refuses, with one line naming the need and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism.errors import ConfigError
from prism.plan.needs import Need, load_needs

TOML = """
[[needs]]
namespace = "profiles"
abstraction = "keyvalue"
read_rps = 20000
write_rps = 2000
item_bytes = 512
records = 5_000_000
p99_ms = 10
durability = "durable"
tenant = "web"

[[needs]]
namespace = "sessions"
read_rps = 500
durability = "cache"
"""


PROFILES = Need("profiles", "keyvalue", 20000, 2000, 512, 5_000_000, 10, "durable", "web")


def test_a_toml_needs_file(tmp_path: Path) -> None:
    path = tmp_path / "needs.toml"
    path.write_text(TOML)
    profiles, sessions = load_needs(path)
    assert profiles == PROFILES
    assert sessions == Need("sessions", read_rps=500, durability="cache")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[needs]]\nnamespace = "a"\nread_rps = -1\n', "need 'a': read_rps = -1.0 out of range"),
        ('[[needs]]\nnamespace = "a"\nread_rps = 5\nflavour = "x"\n', "unknown field `flavour`"),
        ('[[needs]]\nnamespace = "a"\nread_rps = 5\ndurability = "forever"\n', "durability"),
        ('[[needs]]\nnamespace = "a"\nread_rps = 5\nabstraction = "blob"\n', "abstraction"),
        ('[[needs]]\nnamespace = "a"\n', "need 'a': declares no load"),
        ('[[needs]]\nnamespace = "a b"\nread_rps = 1\n', "needs[0].namespace: 'a b' is not a namespace name"),
        ('[[needs]]\nnamespace = "a"\nread_rps = 1\np99_ms = 0\n', "need 'a': p99_ms = 0.0 out of range"),
        ('[[needs]]\nnamespace = "a"\nread_rps = 1\n' * 2, "declared twice"),
        ("", "declares no needs"),
        ("[[needs]\n", "not TOML"),
        ('[[needs]]\nnamespace = "a"\nwrite_rps = 1e12\n', "write_rps = 1000000000000.0 out of range"),
        (
            '[[needs]]\nnamespace = "a"\nread_rps = 1\nbackend = "nats"\n',
            "backend 'nats': a keyvalue namespace has memory, sqlite, postgres, redis",
        ),
        ('[[needs]]\nnamespace = "a"\nread_rps = 1\nbackend = "memory"\n', 'say durability = "cache"'),
    ],
)
def test_bad_needs_are_one_line_naming_the_field(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "needs.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_needs(path)
    text = str(err.value)
    assert message in text and "\n" not in text and str(path) in text


PROTO = """
syntax = "proto3";
package shop.v1;
import "prism/proto/options.proto";

message Profile {
  option (prism.namespace) = {
    name: "profiles" read_rps: 20000 write_rps: 2000 item_bytes: 512 records: 5000000
    p99_ms: 10 durability: "durable" tenant: "web"
  };
  string id = 1;
  message Photo {
    option (prism.namespace) = { name: "photos" read_rps: 100 item_bytes: 200000 };
  }
}

message Plain { string id = 1; }

service Ledger {
  option (prism.namespaces) = { name: "ledger" write_rps: 500 backend: "postgres" };
  option (prism.namespaces) = { name: "ledger-events" abstraction: "timeseries" write_rps: 50 };
  rpc Get (Plain) returns (Plain);
}
"""


def test_a_proto_file_with_prism_options(tmp_path: Path) -> None:
    path = tmp_path / "shop.proto"
    path.write_text(PROTO)
    needs = {n.namespace: n for n in load_needs(path)}
    assert needs["profiles"] == PROFILES
    assert needs["photos"] == Need("photos", read_rps=100, item_bytes=200000)
    assert needs["ledger"] == Need("ledger", write_rps=500, backend="postgres")
    assert needs["ledger-events"] == Need("ledger-events", "timeseries", write_rps=50)
    assert len(needs) == 4


def test_a_proto_that_does_not_compile_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.proto"
    path.write_text('syntax = "proto3";\nmessage A { strin id = 1; }\n')
    with pytest.raises(ConfigError) as err:
        load_needs(path)
    assert "protoc failed" in str(err.value) and "\n" not in str(err.value)


def test_a_proto_option_out_of_range_names_its_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.proto"
    path.write_text(
        'syntax = "proto3";\nimport "prism/proto/options.proto";\n'
        'message A { option (prism.namespace) = { name: "a" read_rps: 5 durability: "forever" }; }\n'
    )
    with pytest.raises(ConfigError) as err:
        load_needs(path)
    assert "message A" in str(err.value) and "durability" in str(err.value)


def test_a_proto_without_declarations(tmp_path: Path) -> None:
    path = tmp_path / "none.proto"
    path.write_text('syntax = "proto3";\nmessage A { string id = 1; }\n')
    with pytest.raises(ConfigError, match="declares no needs"):
        load_needs(path)
