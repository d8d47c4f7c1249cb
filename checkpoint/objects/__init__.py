"""One module per kind of process state, each with its dump and restore."""
