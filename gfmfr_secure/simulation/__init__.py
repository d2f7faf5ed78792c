"""The round runner: wires clients, aggregation backend and server together."""
