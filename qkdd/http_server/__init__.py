"""The daemon's HTTP/1.1 server, whatever the routes it serves (the ETSI GS QKD 014 API, the
message, key-event and admin routes, SKIP, the metrics listener).

`exchange` holds the request, caller and answer types and the error answers, without I/O;
`serving` answers requests on one connection (h11, deadlines, keep-alive, deferred and
streamed answers), with `plain_http` as its fast path for the plainest requests;
`unix_socket` and `tls` are the listeners, `accept` and `limits` keep their connections below
the file-descriptor limit; `paths` names the daemon's own routes for the server and clients.

Nothing is imported here: the light client imports `paths` and must not pay for Trio or h11.
"""
