"""node.privacy (being built)."""

__all__: list[str] = []
