"""Connecting to a chain and sending signed transactions, with every failure mapped onto the error tree.

Sync ``Web3`` on purpose: the CLI, demo and bench are sequential; an aiohttp service can call the handles from a
worker thread (``asyncio.to_thread``) until an async handle is needed. Sends from one key are safe from any number
of threads (and so of asyncio tasks using worker threads): one :class:`NonceManager` per (RPC endpoint, account)
hands out nonces, so concurrent transactions never collide.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import requests
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from web3 import HTTPProvider, Web3
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import (
    ContractCustomError,
    ContractLogicError,
    ContractPanicError,
    TimeExhausted,
    TransactionNotFound,
    Web3RPCError,
)
from web3.providers.rpc.utils import ExceptionRetryConfiguration
from web3.types import Nonce, TxParams, TxReceipt, Wei

from ledger._errors import (
    ChainError,
    ChainNotReachable,
    InsufficientFunds,
    TransactionFailed,
    TransactionOutcomeUnknown,
    WrongChainId,
)
from ledger._reverts import RevertDecoder

_T = TypeVar("_T")

#: Seconds to wait for a receipt. anvil mines instantly; a real chain needs longer (callers can pass their own).
RECEIPT_TIMEOUT = 60.0


def connect(rpc_url: str, *, expected_chain_id: int | None = None, timeout: float = 10.0) -> Web3:
    """A ``Web3`` for ``rpc_url`` after checking that it answers (and serves ``expected_chain_id`` if given)."""
    if not rpc_url.startswith(("http://", "https://")):
        raise ChainNotReachable(rpc_url, "only http(s) JSON-RPC URLs are supported")
    # Two quick retries ride out a blip on a remote RPC without making "no chain here" take seconds
    # (web3's default is five with exponential backoff, about 4 s against a closed port).
    retry = ExceptionRetryConfiguration(
        errors=(requests.ConnectionError, requests.Timeout), retries=2, backoff_factor=0.05
    )
    w3 = Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=retry))
    try:
        chain_id = w3.eth.chain_id
    except (requests.RequestException, OSError, Web3RPCError, ValueError) as exc:
        raise ChainNotReachable(rpc_url, type(exc).__name__) from exc
    if expected_chain_id is not None and chain_id != expected_chain_id:
        raise WrongChainId(expected_chain_id, chain_id)
    return w3


@contextmanager
def rpc_errors(rpc_url: str) -> Iterator[None]:
    """Turn transport failures inside the block into ``ChainNotReachable``."""
    try:
        yield
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise ChainNotReachable(rpc_url, type(exc).__name__) from exc


def _is_insufficient_funds(exc: Web3RPCError) -> bool:
    return "insufficient funds" in str(exc).lower()


def map_call_errors(decoder: RevertDecoder, account: str | None, call: Callable[[], _T]) -> _T:
    """Run ``call`` (an ``eth_call``/``estimate_gas``/send), mapping reverts and funding failures."""
    try:
        return call()
    except (ContractCustomError, ContractPanicError, ContractLogicError) as exc:
        data = exc.data if isinstance(exc.data, str | bytes) else None
        raise decoder.decode(data) from exc
    except Web3RPCError as exc:
        if _is_insufficient_funds(exc):
            raise InsufficientFunds(account or "?") from exc
        raise ChainError(f"the chain rejected the request: {exc.rpc_response or exc}") from exc


class NonceManager:
    """Hands out the nonces of one account on one chain endpoint, so concurrent sends never reuse one.

    Why hold the lock from reading the nonce until the node has accepted the signed transaction (gas estimate and
    signing included), instead of only counting up: a nonce handed out and then never broadcast (the estimate
    reverted, the node refused the transaction) would leave a gap, and every later transaction of the key would
    wait behind it for ever. Under the lock nothing is handed out that is not sent. Only submission is serialised
    (milliseconds); waiting for receipts happens outside the lock, concurrently.

    The next nonce is the larger of the node's ``pending`` count and one past the highest nonce of this manager's
    transactions still in flight (sent, no receipt seen yet): load-balanced RPCs may lag, and a node may not count
    its pool. When the node's count is below that, each in-flight transaction is looked up first and forgotten if
    it was mined or the node no longer knows it (dropped, or a reset/reverted dev chain), so a stale local nonce
    never opens a gap that would stall the key. The in-flight set is bounded by the transactions a process has
    pending at once plus those whose receipt timed out and are still in the node's pool.
    """

    def __init__(self, address: ChecksumAddress) -> None:
        self._address = address
        self._lock = threading.Lock()
        self._in_flight: dict[HexBytes, int] = {}

    def submit(self, w3: Web3, send: Callable[[int], HexBytes]) -> HexBytes:
        """Call ``send(nonce)`` (estimate, sign, send; returns the hash) with the next nonce, one caller at a time."""
        with self._lock:
            chain_next = int(w3.eth.get_transaction_count(self._address, "pending"))
            if self._in_flight and max(self._in_flight.values()) >= chain_next:
                self._forget_settled(w3)
            nonce = max([chain_next, *(n + 1 for n in self._in_flight.values())])
            tx_hash = send(nonce)  # raises: nothing was sent, the nonce stays free
            self._in_flight[tx_hash] = nonce
            return tx_hash

    def settled(self, tx_hash: HexBytes) -> None:
        """The receipt of ``tx_hash`` (sent through :meth:`submit`) was seen: its nonce is spent on chain.

        A transaction whose receipt never came stays in flight: it may still be mined, and its nonce must not be
        handed out again while the node knows it.
        """
        with self._lock:
            self._in_flight.pop(tx_hash, None)

    def _forget_settled(self, w3: Web3) -> None:
        for tx_hash in list(self._in_flight):
            try:
                tx = w3.eth.get_transaction(tx_hash)
            except TransactionNotFound:
                del self._in_flight[tx_hash]
                continue
            if tx.get("blockNumber") is not None:
                del self._in_flight[tx_hash]


_MANAGERS: dict[tuple[str, str], NonceManager] = {}
_MANAGERS_LOCK = threading.Lock()


def nonce_manager(w3: Web3, address: ChecksumAddress) -> NonceManager:
    """The process-wide :class:`NonceManager` of ``address`` on ``w3``'s endpoint (created on first use).

    Keyed by the provider's endpoint URI (not the ``Web3`` object), so every handle on the same chain and key
    (``with_account`` copies, the CLI, the demo) shares one. Bounded by the number of (endpoint, key) pairs a process
    uses: a handful.
    """
    endpoint = str(getattr(w3.provider, "endpoint_uri", None) or id(w3.provider))
    key = (endpoint, address)
    with _MANAGERS_LOCK:
        manager = _MANAGERS.get(key)
        if manager is None:
            manager = _MANAGERS[key] = NonceManager(address)
        return manager


def send_transaction(
    w3: Web3,
    account: LocalAccount,
    function: ContractFunction | ContractConstructor,
    decoder: RevertDecoder,
    *,
    value: int = 0,
    receipt_timeout: float = RECEIPT_TIMEOUT,
    gas_floor: int = 0,
) -> TxReceipt:
    """Estimate, sign locally, send and wait for a successful receipt of a call or a deployment.

    ``gas_floor``: the least gas limit to send with. A call whose cost depends on other senders' transactions mined
    first (an attestation that a concurrent one turns into the quorum-reaching, slashing one) is estimated on the
    cheaper state and would run out of gas; its handle passes the worst case's cost as the floor.

    Reverts surface as the contract's custom error (decoded from the gas estimate's revert data, or by replaying
    a mined failed transaction); lack of funds as ``InsufficientFunds``; no receipt within ``receipt_timeout``
    seconds as ``TransactionOutcomeUnknown`` carrying the hash (the transaction was sent and may still be mined:
    it is never reported as reverted). Safe to call concurrently for one account (see :class:`NonceManager`).
    """
    chain_id = w3.eth.chain_id
    manager = nonce_manager(w3, account.address)

    tx: dict[str, Any] = {}

    def send(nonce: int) -> HexBytes:
        params: TxParams = {"from": account.address, "value": Wei(value), "nonce": Nonce(nonce), "chainId": chain_id}
        if gas_floor:
            estimate = map_call_errors(decoder, account.address, lambda: function.estimate_gas(params))
            params["gas"] = max(estimate, gas_floor)
        tx.update(map_call_errors(decoder, account.address, lambda: function.build_transaction(params)))
        raw = account.sign_transaction(tx).raw_transaction
        return map_call_errors(decoder, account.address, lambda: w3.eth.send_raw_transaction(raw))

    tx_hash = manager.submit(w3, send)
    receipt = _mined(w3, manager, tx_hash, receipt_timeout)
    if receipt["status"] != 1:
        _raise_for_failed(w3, tx, receipt, decoder)
    return receipt


def transfer(
    w3: Web3,
    account: LocalAccount,
    to: str,
    value: int,
    *,
    gas_price: int | None = None,
    receipt_timeout: float = RECEIPT_TIMEOUT,
) -> TxReceipt:
    """Send ``value`` wei from ``account`` to ``to`` (a plain transfer, 21,000 gas) and wait for its receipt.

    Through the account's :class:`NonceManager` (never colliding with its other transactions) and with
    :func:`send_transaction`'s error mapping: lack of funds is ``InsufficientFunds``, another refusal
    ``ChainError``, no receipt within ``receipt_timeout`` seconds ``TransactionOutcomeUnknown`` (it may still be
    mined: its nonce stays in flight), a failed receipt ``TransactionFailed``. ``gas_price``: wei per gas
    (default: the node's price).
    """
    decoder = RevertDecoder(())  # a transfer runs no contract code of ours: there is no custom error to decode
    manager = nonce_manager(w3, account.address)
    price = int(w3.eth.gas_price) if gas_price is None else gas_price
    chain_id = int(w3.eth.chain_id)

    def send(nonce: int) -> HexBytes:
        tx: dict[str, Any] = {
            "to": Web3.to_checksum_address(to),
            "value": value,
            "gas": 21_000,
            "gasPrice": price,
            "nonce": nonce,
            "chainId": chain_id,
        }
        raw = account.sign_transaction(tx).raw_transaction
        return map_call_errors(decoder, account.address, lambda: HexBytes(w3.eth.send_raw_transaction(raw)))

    tx_hash = manager.submit(w3, send)
    receipt = _mined(w3, manager, tx_hash, receipt_timeout)
    if receipt["status"] != 1:
        raise TransactionFailed("the transfer failed on chain", tx_hash=tx_hash.to_0x_hex())
    return receipt


def _mined(w3: Web3, manager: NonceManager, tx_hash: HexBytes, receipt_timeout: float) -> TxReceipt:
    """The receipt of ``tx_hash`` once mined, the key's nonce settled; ``TransactionOutcomeUnknown`` when none
    arrives within ``receipt_timeout`` (it may still be mined: the nonce stays reserved)."""
    try:
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=receipt_timeout, poll_latency=0.05)
    except TimeExhausted as exc:
        raise TransactionOutcomeUnknown(tx_hash.to_0x_hex(), receipt_timeout) from exc
    manager.settled(tx_hash)
    return receipt


def _raise_for_failed(w3: Web3, tx: dict[str, Any], receipt: TxReceipt, decoder: RevertDecoder) -> None:
    """Replay a mined failed transaction at its block's parent to recover the revert reason."""
    tx_hash = receipt["transactionHash"].to_0x_hex()
    call: TxParams = {k: v for k, v in tx.items() if k in ("from", "to", "value", "data", "gas")}  # type: ignore[assignment]
    try:
        w3.eth.call(call, receipt["blockNumber"] - 1)
    except (ContractCustomError, ContractPanicError, ContractLogicError) as exc:
        data = exc.data if isinstance(exc.data, str | bytes) else None
        raise decoder.decode(data, tx_hash=tx_hash) from exc
    except Web3RPCError as exc:  # the replay itself ran out of gas (anvil: "EVM error OutOfGas"), no revert data
        raise TransactionFailed(
            "transaction failed on chain (out of gas: its gas estimate ran on an older state)", tx_hash=tx_hash
        ) from exc
    raise TransactionFailed(
        "transaction failed on chain (out of gas or a reason the replay did not reproduce)", tx_hash=tx_hash
    )
