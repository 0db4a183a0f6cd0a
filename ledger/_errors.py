"""The chain layer's error tree: one base, ``ChainError``, and a leaf per thing that goes wrong.

Each ``code`` starts with a prefix the CLI maps to a named exit code (see ``cli/_main.py``): ``chain_unavailable``,
``tx_reverted``, ``tx_unknown``, ``insufficient_funds``, ``invalid``, ``key``. Every Solidity custom error of our
contracts has its own leaf under :class:`ContractRevert` (see ``ledger/_reverts.py``), carrying the decoded
arguments as attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from planetserve import InvalidValue, PlanetServeError

if TYPE_CHECKING:
    from ledger._types import TxReceipt


class ChainError(PlanetServeError):
    """Base of every chain-layer error.

    ``completed`` holds the receipts of transactions that the same operation already got mined before this error
    (e.g. ``deregister`` before a failing ``withdraw``), so that a caller can report every one of them: those
    transactions happened and must not be sent again.
    """

    code = "chain_error"
    #: Receipts of this operation's earlier transactions that were mined before the failure, in order.
    completed: tuple[TxReceipt, ...] = ()


class ArtifactsMissing(ChainError):
    """Compiled contract artefacts are missing: the contracts were never compiled here."""

    code = "chain_artifacts_missing"

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"compiled contract {path} not found; run `make bootstrap` (it compiles the contracts)")


class ChainUnavailable(ChainError):
    """No usable chain: nothing answers at the RPC URL, or the deployment does not match it."""

    code = "chain_unavailable"


class ChainNotReachable(ChainUnavailable):
    """Nothing answers JSON-RPC at ``rpc_url``."""

    def __init__(self, rpc_url: str, detail: str = "") -> None:
        self.rpc_url = rpc_url
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"no chain answers at {rpc_url}{suffix}; start one with `ps-chain up` or set PS_RPC_URL")


class WrongChainId(ChainUnavailable):
    """The chain at the RPC URL is not the one the deployment was made on."""

    code = "chain_unavailable_wrong_chain_id"

    def __init__(self, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"wrong chain id: the deployment is for chain {expected}, the RPC URL serves chain {actual}")


class DeploymentNotFound(ChainUnavailable):
    """The deployment file is missing, unreadable, or its contracts have no code on the chain."""

    code = "chain_unavailable_no_deployment"

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"deployment {path}: {reason}; run `ps-chain up` or set PS_DEPLOYMENT")


class TransactionFailed(ChainError):
    """A transaction was mined and failed (or could not be sent). A missing receipt is not this: it is
    :class:`TransactionOutcomeUnknown`, because the transaction may still succeed."""

    code = "tx_reverted"

    def __init__(self, message: str, *, tx_hash: str | None = None) -> None:
        self.tx_hash = tx_hash
        super().__init__(message)


class TransactionOutcomeUnknown(ChainError):
    """A transaction was sent but no receipt arrived in time: it may still be mined, or may never be.

    Never a revert: retrying blindly could, for example, stake twice. Look ``tx_hash`` up (or wait) before
    resending; a resend from the same key with the same nonce replaces it at most.
    """

    code = "tx_unknown"

    def __init__(self, tx_hash: str, timeout_s: float) -> None:
        self.tx_hash = tx_hash
        self.timeout_s = timeout_s
        super().__init__(
            f"sent, outcome unknown, transaction {tx_hash}: no receipt within {timeout_s:g} s; "
            "check it on the chain before sending again"
        )


class InsufficientFunds(ChainError):
    """The sending account cannot pay the value plus gas."""

    code = "insufficient_funds"

    def __init__(self, account: str, detail: str = "") -> None:
        self.account = account
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"account {account} has insufficient funds for this transaction{suffix}")


class InvalidChainInput(ChainError, InvalidValue):
    """A value given to the chain layer is invalid; ``param`` names it.

    Also the kernel's :class:`~planetserve.InvalidValue`: the chain layer's parsers (``parse_eth``, ``checksum``,
    ``model_id``) are the kernel's, re-raised as this leaf, so one ``except`` catches bad input from either layer.
    """

    code = "invalid_input"

    def __init__(self, param: str, value: object, reason: str) -> None:
        InvalidValue.__init__(self, param, value, reason)


class OperatorKeyError(ChainError):
    """The operator's secret key is missing or its keystore cannot be opened (the key itself is never shown)."""

    code = "key_error"
