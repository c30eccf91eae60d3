"""How nodes reach each other: the bus, the source / stream-function bridge, liveness."""
