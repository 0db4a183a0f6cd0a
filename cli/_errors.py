"""Errors the command-line layer raises itself: conditions only a command can see (a port it was asked to use, an
endpoint it was asked to register), each a leaf the exit-code table in ``cli/_main.py`` maps by class."""

from __future__ import annotations

from node import PlanetServeError


class CliError(PlanetServeError):
    """Base of the errors raised by ``cli``."""

    code = "cli_error"


class PortInUse(CliError):
    """The TCP port a command was told to listen on is taken; ``what`` says by what, when the command could tell."""

    code = "cli_port_in_use"

    def __init__(self, *, host: str, port: int, what: str = "another program", hint: str = "") -> None:
        self.host = host
        self.port = port
        self.what = what
        suffix = f"; {hint}" if hint else ""
        super().__init__(f"port {port} on {host} is already in use by {what}{suffix}")


class EndpointUnreachable(CliError):
    """The endpoint about to be registered did not answer its info request (so relays would find it unreachable)."""

    code = "cli_endpoint_unreachable"

    def __init__(self, *, endpoint: str, detail: str) -> None:
        self.endpoint = endpoint
        self.detail = detail
        super().__init__(
            f"endpoint {endpoint} does not answer ({detail}); start `ps-node serve` there first, "
            "or pass --no-check-endpoint"
        )


class EndpointKeyMismatch(CliError):
    """The endpoint answers, but with other onion keys than the one about to be registered (wrong ``--state-dir``?)."""

    code = "cli_endpoint_key_mismatch"

    def __init__(self, *, endpoint: str, registering: str, served: tuple[str, ...]) -> None:
        self.endpoint = endpoint
        self.registering = registering
        self.served = served
        shown = ", ".join(k[:12] + "…" for k in served) or "none"
        super().__init__(
            f"endpoint {endpoint} serves onion key(s) {shown}, not {registering[:12]}… from this state directory; "
            "pass the --state-dir the node was started with"
        )
