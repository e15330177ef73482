"""Who may call, over what: TLS on the gRPC port, callers' identities, access rules, the audit log.

- ``section``: the security settings as the supervisor publishes them to
  every worker (in the routing table), with a serial that moves on every
  start and accepted reload so that files are re-read (rotation);
- ``runtime``: a worker's live state built from a section (the TLS context,
  the identity checks and the compiled access rules), rebuilt when the
  serial moves, the previous one kept if the new files do not load;
- ``tls``: the server's ``ssl.SSLContext`` (certificate chain, minimum
  version, ALPN h2, the client CA for mTLS).

Nothing here imports trio: the supervisor checks the files with the same
code before a start or a reload is accepted.
"""
