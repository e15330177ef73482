"""Routing: the shared-memory routing table, forwarding (transport and policy), connection hand-off."""
