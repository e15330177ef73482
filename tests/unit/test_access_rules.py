"""The access rule compiler: its lookup decides as the rules read, memo or not."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from prism.config.security import AccessRule
from prism.security.access import MEMO_MAX_NAME_CHARS, AccessRules

EXAMPLE = (
    AccessRule(("spiffe://corp/svc/payments", "alice", "team-*"), ("ledger", "orders-*"), ("read", "write")),
    AccessRule(("bob",), ("ledger",), ("read",)),
    AccessRule(("*",), ("public",), ("read",)),
)


def test_exact_and_glob_patterns_on_both_sides() -> None:
    rules = AccessRules(EXAMPLE)
    assert rules.allows("alice", "ledger", "write")
    assert rules.allows("team-a", "orders-2024", "write")
    assert rules.allows("team-", "orders-", "read")  # a * matches the empty rest too
    assert rules.allows("spiffe://corp/svc/payments", "orders-x", "read")
    assert rules.allows("bob", "ledger", "read")
    assert not rules.allows("bob", "ledger", "write")  # bob's rule allows read only
    assert not rules.allows("bob", "orders-1", "read")
    assert not rules.allows("team", "ledger", "read")  # "team-*" needs the dash
    assert not rules.allows("alice", "orders", "read")
    assert not rules.allows("Alice", "ledger", "read")  # exact means exact
    assert rules.allows("anyone", "public", "read")
    assert not rules.allows("anyone", "public", "write")


def test_no_rules_allow_nothing() -> None:
    rules = AccessRules(())
    assert not rules.allows("alice", "ledger", "read")
    assert not rules.allows("", "", "write")


def test_one_rule_must_name_principal_namespace_and_action_together() -> None:
    # alice may read a, and write b: that is not a licence to write a.
    rules = AccessRules(
        (AccessRule(("alice",), ("a",), ("read",)), AccessRule(("alice",), ("b",), ("write",)))
    )
    assert rules.allows("alice", "a", "read") and rules.allows("alice", "b", "write")
    assert not rules.allows("alice", "a", "write") and not rules.allows("alice", "b", "read")


def test_the_memo_is_bounded_and_forgets_the_oldest() -> None:
    rules = AccessRules(EXAMPLE, memo_entries=4)
    for n in range(10):
        assert rules.allows("alice", f"orders-{n}", "read")
    assert len(rules._memo) == 4
    assert ("alice", "orders-9", "read") in rules._memo
    assert ("alice", "orders-0", "read") not in rules._memo


def test_long_names_are_decided_but_not_remembered() -> None:
    rules = AccessRules(EXAMPLE)
    long_namespace = "orders-" + "x" * MEMO_MAX_NAME_CHARS
    assert rules.allows("alice", long_namespace, "read")
    assert not rules.allows("alice", "y" * (MEMO_MAX_NAME_CHARS + 1), "read")
    assert not rules.allows("team-" + "z" * MEMO_MAX_NAME_CHARS, "ledger-no", "read")
    assert rules._memo == {}


# Few letters, so that random rules and names collide often.
_NAMES = st.text("ab-", max_size=4)
_PATTERNS = st.builds(lambda name, glob: name + "*" if glob else name or "a", _NAMES, st.booleans())
_RULES = st.lists(
    st.builds(
        AccessRule,
        st.lists(_PATTERNS, min_size=1, max_size=3).map(tuple),
        st.lists(_PATTERNS, min_size=1, max_size=3).map(tuple),
        st.lists(st.sampled_from(["read", "write"]), min_size=1, max_size=2).map(tuple),
    ),
    max_size=6,
)


def _matches(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def _reference(rules: list[AccessRule], principal: str, namespace: str, action: str) -> bool:
    """The rules as the README words them, one by one."""
    return any(
        action in rule.allow
        and any(_matches(p, principal) for p in rule.principals)
        and any(_matches(n, namespace) for n in rule.namespaces)
        for rule in rules
    )


@settings(max_examples=300, deadline=None)
@given(_RULES, st.lists(st.tuples(_NAMES, _NAMES, st.sampled_from(["read", "write"])), max_size=20))
def test_the_compiled_lookup_agrees_with_the_rules_read_one_by_one(
    rules: list[AccessRule], calls: list[tuple[str, str, str]]
) -> None:
    compiled = AccessRules(rules, memo_entries=3)  # a small memo: hits, misses and evictions
    for principal, namespace, action in calls + calls:
        assert compiled.allows(principal, namespace, action) == _reference(
            rules, principal, namespace, action
        )
