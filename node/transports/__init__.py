"""Transport adapters: they turn sockets into calls on :class:`node.server.Node`."""
