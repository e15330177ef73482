"""Who may call, over what: TLS on the gRPC port, callers' identities, access rules, the audit log.

- ``section``: the security settings as the supervisor publishes them to
  every worker (in the routing table), with a serial that moves on every
  start and accepted reload so that files are re-read (rotation);
- ``runtime``: a worker's live state built from a section (the TLS context,
  the identity checks and the compiled access rules), rebuilt when the
  serial moves, the previous one kept if the new files do not load; and the
  access check every call path runs;
- ``tls``: the server's ``ssl.SSLContext`` (certificate chain, minimum
  version, ALPN h2, the client CA for mTLS);
- ``identity``: bearer tokens (JWT) verified against a JWKS file, and what
  a connection remembers of the last token it sent;
- ``access``: the ``[[access]]`` rules compiled into a lookup;
- ``audit``: the audit log (denied calls, and allowed writes on request).

Nothing here imports trio: the supervisor checks the files with the same
code before a start or a reload is accepted.
"""
