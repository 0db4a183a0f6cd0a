"""Named exit codes shared by every PlanetServe command.

Scripts branch on these, so they are stable: never renumber one, only add.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit status of a ``ps-*`` command."""

    OK = 0
    #: Any PlanetServe error without a more specific code.
    FAILURE = 1
    #: Bad command-line usage (typer/click's own code).
    USAGE = 2
    #: Invalid input value (e.g. unknown role, stake below minimum checked locally).
    INVALID_INPUT = 3
    #: No chain at the RPC URL, wrong chain id, or a missing deployment file.
    CHAIN_UNAVAILABLE = 4
    #: A transaction reverted on chain (the custom error is printed).
    TX_REVERTED = 5
    #: The account cannot pay for the transaction or the value sent.
    INSUFFICIENT_FUNDS = 6
    #: A key, keystore or secret is missing or unreadable.
    KEY_ERROR = 7
    #: A model folder is missing or corrupt, or an engine cannot start.
    MODEL_ERROR = 8
    #: A peer, relay or model node could not be reached or answered badly.
    NETWORK_ERROR = 9
    #: A port the command was told to listen on is taken (by a running chain or another program).
    PORT_IN_USE = 10
    #: A transaction was sent but its receipt did not arrive in time: it may still be mined. Check before resending.
    TX_OUTCOME_UNKNOWN = 11
    #: A record asked for by its name (an evidence hash) is not in the store.
    NOT_FOUND = 12
    #: A stored record failed its integrity check (it no longer hashes to its name): changed on disk.
    TAMPERED = 13
    #: Interrupted by the user (Ctrl-C).
    INTERRUPTED = 130
