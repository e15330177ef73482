"""Live migrations of a KeyValue namespace from one backend to another (ADR-009).

``state`` is the phases, the commands and the files (no trio: the supervisor
and the admin process import it); ``dual`` is what a worker does with the two
backends in each phase; ``backfill`` copies the source's records to the
target; ``shadow`` compares reads; ``retry`` keeps the writes a backend
refused until it takes them.
"""
