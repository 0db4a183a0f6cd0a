"""Independent implementations of parts of ``docs/protocol.md``, written from the spec text alone (no ``node``)."""
