"""node.inference (being built)."""

__all__: list[str] = []
