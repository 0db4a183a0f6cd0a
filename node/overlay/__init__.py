"""node.overlay (being built)."""

__all__: list[str] = []
