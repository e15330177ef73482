"""Access rules, compiled once per config section into a lookup a call pays a dict probe for.

A rule allows its actions (read, write) on its namespaces to its principals;
a call is allowed when one rule names its principal, its namespace and its
action, and denied otherwise. A pattern is exact, or ends in one ``*`` that
matches any rest (the empty one too).

Compiled, each rule is one bit. Per action, each side (principals,
namespaces) is an index: a dict from exact names to the bits of the rules
naming them, and a short list of (prefix, bits) for the globs, one entry
per distinct prefix. A call is allowed when the bits of its principal and
the bits of its namespace share one. That costs a dict probe and a walk of
the globs; the answer is then remembered by (principal, namespace, action)
in a bounded memo, so the calls of a steady workload cost one dict probe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prism.config.security import ACTIONS, AccessRule

# Decisions remembered; the oldest goes first when full.
MEMO_ENTRIES: Final = 16_384
# Longer names are decided afresh each time, not remembered: namespaces come
# from requests (a valid one has at most 128 characters, but any string
# reaches this check) and would otherwise let a client fill memory.
MEMO_MAX_NAME_CHARS: Final = 256


class _Index:
    """Names (exact, or a prefix for a glob) to the bits of the rules naming them."""

    __slots__ = ("_globs", "exact", "prefixes")

    def __init__(self) -> None:
        self.exact: dict[str, int] = {}
        self._globs: dict[str, int] = {}  # prefix -> bits, while rules are added
        self.prefixes: tuple[tuple[str, int], ...] = ()

    def add(self, patterns: Iterable[str], bit: int) -> None:
        for pattern in patterns:
            if pattern.endswith("*"):
                prefix = pattern[:-1]
                self._globs[prefix] = self._globs.get(prefix, 0) | bit
            else:
                self.exact[pattern] = self.exact.get(pattern, 0) | bit

    def seal(self) -> None:
        """Done adding: the globs become the list a lookup walks."""
        self.prefixes = tuple(self._globs.items())

    def bits(self, name: str) -> int:
        bits = self.exact.get(name, 0)
        for prefix, more in self.prefixes:
            if name.startswith(prefix):
                bits |= more
        return bits


class AccessRules:
    """The compiled rules of one config section: ``allows`` decides a call."""

    def __init__(self, rules: Iterable[AccessRule], *, memo_entries: int = MEMO_ENTRIES) -> None:
        self._indexes = {action: (_Index(), _Index()) for action in ACTIONS}
        for n, rule in enumerate(rules):
            bit = 1 << n
            for action in set(rule.allow):
                principals, namespaces = self._indexes[action]
                principals.add(rule.principals, bit)
                namespaces.add(rule.namespaces, bit)
        for index in self._indexes.values():
            for side in index:
                side.seal()
        self._memo: dict[tuple[str, str, str], bool] = {}
        self._memo_entries = memo_entries

    def allows(self, principal: str, namespace: str, action: str) -> bool:
        """Whether a rule allows ``action`` on ``namespace`` to ``principal``."""
        key = (principal, namespace, action)
        allowed = self._memo.get(key)
        if allowed is not None:
            return allowed
        principals, namespaces = self._indexes[action]
        allowed = bool(principals.bits(principal) & namespaces.bits(namespace))
        if len(namespace) <= MEMO_MAX_NAME_CHARS and len(principal) <= MEMO_MAX_NAME_CHARS:
            memo = self._memo
            if len(memo) >= self._memo_entries:
                del memo[next(iter(memo))]
            memo[key] = allowed
        return allowed
