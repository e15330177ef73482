"""Routing: the shared-memory routing table, the shared cache, the nng bus and forwarding."""
