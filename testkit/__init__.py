"""Client-side code that tests/ and bench/ share: frame builders, a raw WebTransport client,
a TLS context for self-signed nodes, free ports.

Two rules keep it honest. It never imports ``tests`` (bench runs without pytest and its
fixtures), and never imports ``node``: a client built on the server's own parsers would
carry their bugs to both ends of every test.
"""
