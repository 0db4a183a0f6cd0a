"""What every typed contract handle shares: the web3 contract, its revert decoder, signing, and typed receipts.

``NodeRegistry``, ``PaymentChannels`` and ``Attestations`` subclass :class:`ContractHandle` and add only their domain
methods, so each concept (reading, sending, decoding a revert, naming a receipt's events) lives once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.types import TxReceipt as Web3Receipt

from ledger._artifacts import load_artifact
from ledger._errors import InvalidChainInput, OperatorKeyError
from ledger._reverts import RevertDecoder
from ledger._tx import RECEIPT_TIMEOUT, map_call_errors, send_transaction
from ledger._types import TxReceipt, Wei, checksum


def event_signature(item: Mapping[str, Any]) -> str:
    """``Name(type,type,...)`` of an ABI event entry (what its topic 0 hashes)."""
    return f"{item['name']}({','.join(p['type'] for p in item['inputs'])})"


class ContractHandle:
    """One deployed contract. Reads need no account; writes are signed by ``account``.

    Writes return a :class:`TxReceipt` naming the contract's own events; a revert raises the contract's custom error
    (or one of ``DECODES_ALSO``'s, for contracts that call others) as a :class:`~ledger.ContractRevert` subclass with
    its decoded arguments; a transaction without a receipt in time raises ``TransactionOutcomeUnknown``.
    """

    #: The compiled artifact's name.
    CONTRACT: ClassVar[str]
    #: Artifacts whose custom errors this contract's calls can bubble up.
    DECODES_ALSO: ClassVar[Sequence[str]] = ()

    def __init__(
        self,
        w3: Web3,
        address: str,
        account: LocalAccount | None = None,
        *,
        receipt_timeout: float = RECEIPT_TIMEOUT,
    ) -> None:
        """``receipt_timeout``: seconds each write waits for its receipt before ``TransactionOutcomeUnknown``."""
        if not receipt_timeout > 0:
            raise InvalidChainInput("receipt_timeout", receipt_timeout, "must be a positive number of seconds")
        artifact = load_artifact(self.CONTRACT)
        self._w3 = w3
        self._address = checksum(address, param=f"{self.CONTRACT} address")
        self._account = account
        self._receipt_timeout = receipt_timeout
        self._contract: Contract = w3.eth.contract(address=self._address, abi=list(artifact.abi))
        self._decoder = RevertDecoder([artifact.abi, *(load_artifact(name).abi for name in self.DECODES_ALSO)])
        self._events_by_topic = {
            bytes(Web3.keccak(text=event_signature(item))): str(item["name"])
            for item in artifact.abi
            if item.get("type") == "event"
        }

    @property
    def address(self) -> ChecksumAddress:
        """The contract's checksummed address."""
        return self._address

    @property
    def w3(self) -> Web3:
        """The ``Web3`` the handle talks through."""
        return self._w3

    @property
    def contract(self) -> Contract:
        """The raw web3 contract (for the indexer's log decoding; callers use the domain methods)."""
        return self._contract

    @property
    def decoder(self) -> RevertDecoder:
        """The revert decoder for this contract's errors."""
        return self._decoder

    @property
    def account(self) -> ChecksumAddress:
        """The signing account's address; ``OperatorKeyError`` when the handle is read-only."""
        return self._signer().address

    def with_account(self, account: LocalAccount) -> Self:
        """The same contract, signing with ``account`` (same receipt timeout)."""
        return type(self)(self._w3, self._address, account, receipt_timeout=self._receipt_timeout)

    def balance(self) -> Wei:
        """The contract's ETH balance, in wei."""
        return Wei(self._w3.eth.get_balance(self._address))

    # -- internals ---------------------------------------------------------------------------------------------

    def _signer(self) -> LocalAccount:
        if self._account is None:
            raise OperatorKeyError("this operation needs the account's key: set PS_PRIVATE_KEY or pass --keystore")
        return self._account

    def _call(self, fn: ContractFunction) -> Any:
        return map_call_errors(self._decoder, None, fn.call)

    def _send(self, fn: ContractFunction, *, value: int = 0, gas_floor: int = 0) -> TxReceipt:
        receipt = send_transaction(
            self._w3,
            self._signer(),
            fn,
            self._decoder,
            value=value,
            receipt_timeout=self._receipt_timeout,
            gas_floor=gas_floor,
        )
        return self._typed_receipt(receipt)

    def _typed_receipt(self, receipt: Web3Receipt) -> TxReceipt:
        events = tuple(
            self._events_by_topic[bytes(log["topics"][0])]
            for log in receipt["logs"]
            if log["address"] == self._address and log["topics"] and bytes(log["topics"][0]) in self._events_by_topic
        )
        return TxReceipt(
            tx_hash=receipt["transactionHash"].to_0x_hex(),
            block_number=receipt["blockNumber"],
            gas_used=receipt["gasUsed"],
            effective_gas_price=Wei(receipt.get("effectiveGasPrice", 0)),
            events=events,
        )
