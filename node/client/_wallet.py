"""The client's wallet: one payment channel per model node, and a voucher for every request (protocol §10.4).

Why the client keeps its own book rather than asking the node: the voucher must be signed *before* the answer, for
the cumulative amount the node will accept, and the only honest source of "what I owe" is what the client itself
saw served. Vouchers on one channel must reach the node in the order they were signed, so the wallet admits one
request per channel at a time: the next waits until the node answered the previous (its first delta) or it ended.
The wallet follows the spec's rule: the next voucher on a channel is
``max(last + 1, owed + in_flight + reservation)``; after a final delta ``owed`` grows by what that delta says was
used, and after a reply that broke once the node had the request, by the whole reservation (the node may have
charged that much). A try that failed before any path answered releases its reservation: the node never saw it.

The book is durable (:mod:`node.client._wallet_store`, one SQLite file in the client's state directory): every
voucher's amount is committed before the voucher is signed, every deposit is recorded as pending before its
transaction leaves, and the channels are reconciled with the chain when the wallet opens (deposit, redeemed amount,
closing, settled; a pending deposit is found again by its ``ChannelOpened`` event). Several processes of one client
share it: the database serialises each read-modify-write (``BEGIN IMMEDIATE``) and a per-node file lock keeps
one voucher per channel in transit at a time, across processes. Reservations left by a process that died are
counted as spent by the next process that finds itself alone (the node may have charged them).

Channels are opened on demand (``deposit_wei`` each, more when one request needs more) and topped up the same way,
while the wei held in channels (deposits not yet redeemed, open and closing, plus pending) stays within
``budget_wei``. Chain calls run in worker threads.

Every read and write of the book runs on one ordered worker thread (:mod:`node.client._book_queue`): off the event
loop (a commit is an fsync, ~12 ms, longer while another process holds the book's write lock), and in the order they
were asked for, so a voucher signed after a request finished always sees that request settled. :meth:`Wallet.finish`
stays synchronous for its callers: it queues the settle and returns. :meth:`Wallet.close` drains the queue (with a
timeout) and raises ``BookWriteFailed`` when a queued write failed (each failure is also logged when it happens).

Fresh addresses (``fresh=True`` on :meth:`Wallet.deposit`, or ``fresh_addresses``): a channel paid from a key
derived from the client's key (HKDF-SHA256 over the key, the chain, the contract, the node and an index), funded by a
plain transfer from the main address. Nodes and chain observers no longer see one client address across channels;
the funding transfer still links them on chain (docs/threat-model.md). A new fresh channel takes the index one above
the highest the book used.

A lost book (:meth:`Wallet.recover`, ``ps-client recover``): since every paying key derives from the main key, the
channels are found again by their ``ChannelOpened`` events (fresh indices walked up to a gap limit), recorded as
``recovered`` (what was signed on them is unknown, so they are never paid on again) and closed; ``reclaim`` returns
what the node did not redeem.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3

from ledger import (
    ChannelInfo,
    InvalidChainInput,
    PaymentChannels,
    TransactionOutcomeUnknown,
    TxReceipt,
    Voucher,
    VoucherDomain,
    Wei,
    checksum,
    sign_voucher,
)
from node.client._bill import bill_payment, bill_spent
from node.client._book_queue import DRAIN_TIMEOUT_S, BookQueue
from node.client._errors import ClientError
from node.client._wallet_store import (
    CLOSING,
    GONE,
    LOCK_POLL_S,
    OPEN,
    SETTLED,
    ChannelLocks,
    ChannelState,
    WalletStore,
)
from node.overlay import CompletionRequest, ModelNode

log = logging.getLogger(__name__)
#: Tokens added to a prompt bound that was not counted with the node's tokenizer (UTF-8 bytes bound tokens of byte
#: level tokenizers; a SentencePiece dummy prefix or similar adds a few).
BYTES_BOUND_MARGIN = 8


#: Longest a request waits for the previous request on the same channel to be admitted, seconds.
ADMISSION_WAIT_S = 60.0


class PaymentBusy(ClientError):
    """The previous request on this node's channel was not admitted in time (the node is stuck or very slow)."""

    code = "payment_channel_busy"

    def __init__(self, node: str, seconds: float) -> None:
        self.node = node
        super().__init__(f"the channel to {node} admitted no request within {seconds:g} s")


class BookWriteFailed(ClientError):
    """A book write queued by :meth:`Wallet.finish` (a settle, or the release of an unsent voucher) failed, or was
    still queued when the wallet closed: that request's reservation may still count as in flight (later vouchers on
    its channel are that much higher than needed until a lone process folds it in)."""

    code = "payment_book_write_failed"

    def __init__(self, failed: int, first: BaseException | None) -> None:
        self.failed = failed
        self.first = first
        cause = f" (first: {type(first).__name__}: {first})" if first is not None else ""
        super().__init__(f"{failed} queued write(s) of the wallet's book did not complete{cause}")


class WalletExhausted(ClientError):
    """Paying for a request would spend beyond the wallet's budget."""

    code = "payment_budget_exhausted"

    def __init__(self, needed: int, left: int) -> None:
        self.needed = needed
        self.left = left
        super().__init__(f"paying needs {needed} wei more on chain, but only {left} wei of budget is left")


def cost(price_per_1k_tokens: int, tokens: int) -> Wei:
    """``ceil(price × tokens / 1000)`` wei: the spec's charge for ``tokens`` tokens."""
    return Wei(-(-price_per_1k_tokens * tokens // 1000))


@dataclass(frozen=True, slots=True, kw_only=True)
class Payment:
    """One request's voucher: hand it back to :meth:`Wallet.finish` exactly once."""

    node: str
    """The destination's operator."""
    channel_id: int
    """The channel paid on."""
    amount: int
    """The voucher's cumulative amount, wei."""
    reservation: int
    """The most this request may cost, wei."""
    price_per_1k_tokens: int
    """The destination's registered price."""
    progress: _Progress = field(default_factory=lambda: _Progress(), repr=False, compare=False)
    """Mutable: whether it was finished, and the admission lock it holds."""


@dataclass(slots=True)
class _Progress:
    finished: bool = False
    admission: asyncio.Lock | None = None
    """The channel's admission lock while the request holds it (until its first delta or its end)."""


#: Gas a fresh address is funded with beyond its deposit: opening a channel, closing it, finishing the close and
#: withdrawing (about 250,000 gas measured in bench/gas.py), with room.
FRESH_GAS_UNITS = 400_000
#: Seconds to wait for the receipt of a fresh address's funding transfer (then ``TransactionOutcomeUnknown``).
FUND_RECEIPT_TIMEOUT_S = 60.0
#: Seconds between two chain reads of a channel before paying on it (``Wallet.chain_check_s``).
CHAIN_CHECK_S = 30.0
#: HKDF salt of fresh channel keys (a label: changing it changes every derived address).
FRESH_KEY_SALT = b"planetserve/client/channel-key/v1"
#: Consecutive fresh-address indices without any channel after which :meth:`Wallet.recover` stops looking.
RECOVERY_GAP_LIMIT = 20
#: Most blocks one ``eth_getLogs`` call of :meth:`Wallet.recover` spans (RPC providers cap the range).
LOG_CHUNK_BLOCKS = 5_000
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class UnknownChannel(ClientError):
    """No channel of this wallet matches (an unknown node or channel id)."""

    code = "payment_unknown_channel"

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"this wallet has no {what}; `ps-client channels` lists them")


def derive_channel_account(
    account: LocalAccount, *, chain_id: int, contract: str, node: str, index: int
) -> LocalAccount:
    """The fresh key of the ``index``-th unlinkable channel to ``node``: HKDF-SHA256 of the client's key, reduced
    into secp256k1's range. Deterministic: the main key alone re-derives every fresh key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = f"{chain_id}:{checksum(contract)}:{checksum(node)}:{index}".encode()
    raw = HKDF(algorithm=hashes.SHA256(), length=48, salt=FRESH_KEY_SALT, info=info).derive(bytes(account.key))
    secret = int.from_bytes(raw, "big") % (_SECP256K1_N - 1) + 1  # 384 bits reduced: bias below 2**-128
    derived: LocalAccount = Account.from_key(secret.to_bytes(32, "big"))
    return derived


@dataclass(frozen=True, slots=True, kw_only=True)
class Reclaimed:
    """The outcome of :meth:`Wallet.reclaim`."""

    settled: tuple[int, ...]
    """Channels whose close was finished now (their unredeemed rest credited to their client)."""
    withdrawn_wei: int
    """Wei withdrawn to the paying addresses (main and fresh ones)."""
    receipts: tuple[TxReceipt, ...]
    """The mined transactions, in order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovered:
    """The outcome of :meth:`Wallet.recover`."""

    found: tuple[ChannelState, ...]
    """Channels of this client found on chain that the book did not have, now in it as ``recovered``."""
    known: int
    """Channels of this client found on chain that the book already had (left as they were)."""
    closing: tuple[tuple[ChannelState, TxReceipt], ...]
    """Recovered channels whose close was started now (``reclaim`` after their deadline returns the rest)."""
    fresh_indices: int
    """Fresh-address derivation indices looked at (0 up to the last used one plus the gap limit)."""
    from_block: int
    """First block whose ``ChannelOpened`` events were read."""
    to_block: int
    """Last block read."""


def _state_name(info: Any) -> str:
    return SETTLED if info.settled else CLOSING if info.closing else OPEN


class Wallet:
    """Pays model nodes from ``account`` on the ``channels`` contract, keeping at most ``budget_wei`` in channels.

    ``state_dir`` holds the durable book (``wallet-<chainId>.sqlite``) and its locks; without one the book lives in
    a temporary folder removed with the wallet (one process, as before persistence).
    """

    def __init__(
        self,
        channels: PaymentChannels,
        account: LocalAccount,
        *,
        budget_wei: int,
        deposit_wei: int,
        state_dir: Path | None = None,
        fresh_addresses: bool = False,
        chain_check_s: float = CHAIN_CHECK_S,
    ) -> None:
        if budget_wei < 0 or deposit_wei <= 0:
            raise ValueError("budget_wei must be >= 0 and deposit_wei > 0")
        self._reader = channels
        self._pay = channels.with_account(account)
        self._account = account
        self._domain = self._pay.domain()
        self.budget_wei = budget_wei
        self.deposit_wei = deposit_wei
        self.fresh_addresses = fresh_addresses
        self.chain_check_s = chain_check_s
        """Seconds between two chain reads of a channel before paying on it (another process may have closed it)."""
        self._checked: dict[int, float] = {}
        self.spent_wei = 0
        """Wei this wallet object deposited on its own (opens and top-ups for requests)."""
        temporary = state_dir is None
        if state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix="ps-wallet-"))
        genesis = "0x" + bytes(channels.w3.eth.get_block(0)["hash"]).hex()
        self.store = WalletStore(
            state_dir / f"wallet-{self._domain.chain_id}.sqlite",
            genesis=genesis,
            contract=self._domain.contract,
            client=account.address,
        )
        prefix = hashlib.sha256(f"{genesis}:{self._domain.contract}:{account.address}".encode()).hexdigest()[:16]
        self._locks = ChannelLocks(state_dir / "locks", prefix)
        self._lock = asyncio.Lock()
        self._admission: dict[str, asyncio.Lock] = {}
        self._book = threading.Lock()
        self._keys: dict[str, LocalAccount] = {}
        self._books = BookQueue(f"ps-wallet-book-{account.address[:10]}")
        self._finalizer = weakref.finalize(
            self, _release, self._books, self._locks, self.store, state_dir if temporary else None
        )
        # No other process of this client is alive: their reservations are spent (folded before another can join).
        self._locks.join(on_alone=lambda: self._write(self.store.fold_in_flight))
        self.reconcile()

    def __repr__(self) -> str:
        return f"Wallet(address={self._account.address}, store={self.store.path})"

    def close(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Run the book writes still queued (up to ``timeout`` seconds), then release the book and the locks (also
        done, without raising, when the wallet is collected or the process exits). ``BookWriteFailed`` when a queued
        write failed or did not run in time: the caller learns that the book may be behind."""
        if not self._finalizer.alive:
            return
        drained = self._books.close(timeout)
        self._finalizer()
        failed, errors = self._books.failures()
        if failed or not drained:
            raise BookWriteFailed(failed + (0 if drained else 1), errors[0] if errors else None)

    async def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Wait, without blocking the event loop, until every book write queued so far ran; ``BookWriteFailed``
        when one of the queued ones failed since the last check (or they did not finish within ``timeout``)."""
        drained = await self._books.adrain(timeout)
        failed, errors = self._books.failures()
        if failed or not drained:
            raise BookWriteFailed(failed + (0 if drained else 1), errors[0] if errors else None)

    def _write(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a book read or write on the book's thread, in order, and wait for it (callers off the event loop,
        or synchronous commands)."""
        return self._books.call(call, *args, **kwargs)

    @property
    def address(self) -> str:
        """The main paying address (the client of every channel not on a fresh address)."""
        return str(self._account.address)

    @property
    def domain(self) -> VoucherDomain:
        """The voucher domain (chain id and contract) this wallet pays on."""
        return self._domain

    def channels(self, *, include_closed: bool = False) -> list[ChannelState]:
        """Copies of the wallet's channels (open and closing; settled and gone ones too with ``include_closed``),
        after every book write queued before (a blocking wait: on an event loop, ``await drain()`` first)."""
        result: list[ChannelState] = self._write(self.store.channels, include_closed=include_closed)
        return result

    def channel(self, node: str) -> ChannelState | None:
        """The channel requests to ``node`` are paid on (a copy), or None (after the writes queued before)."""
        result: ChannelState | None = self._write(self.store.active, node)
        return result

    def signer_address(self, state: ChannelState) -> str:
        """The address that pays on (and signs for) ``state``'s channel: the main one, or its fresh one."""
        return str(self._signer(state).address)

    # -- chain reconciliation ----------------------------------------------------------------------------------

    def _signer(self, state: ChannelState) -> LocalAccount:
        if not state.key_index:
            return self._account
        return self._fresh_key(state.node, int(state.key_index))

    def _fresh_key(self, node: str, index: int) -> LocalAccount:
        key = f"{node}:{index}"
        if key not in self._keys:
            self._keys[key] = derive_channel_account(
                self._account, chain_id=self._domain.chain_id, contract=self._domain.contract, node=node, index=index
            )
        return self._keys[key]

    def _store_info(self, channel_id: int, info: ChannelInfo) -> None:
        """Copy the chain's view of a channel (deposit, redeemed, close deadline, state) into the book."""
        self._write(
            self.store.refresh,
            channel_id,
            deposit=info.deposit,
            redeemed=info.redeemed,
            closes_at=info.closes_at,
            state=_state_name(info),
        )

    def _reread(self, channel_id: int) -> ChannelState:
        """Read a channel of ours again after a transaction on it, store it, and return the book's row."""
        info = self._reader.channel(channel_id)
        assert info is not None
        self._store_info(channel_id, info)
        after: ChannelState | None = self._write(self.store.get, channel_id)
        assert after is not None
        return after

    def reconcile(self) -> None:
        """Bring the book in line with the chain: find pending deposits' channels by their events, and refresh
        every channel's deposit, redeemed amount and state (``gone`` when the chain has no such channel of ours)."""
        for pending in self._write(self.store.pending):
            payer = self._fresh_key(pending.node, int(pending.key_index)) if pending.key_index else self._account
            for channel_id in self._opened_ids(payer.address, pending.node, pending.from_block):
                if self._write(self.store.get, channel_id) is None:
                    info = self._reader.channel(channel_id)
                    if info is not None:
                        self._record_from_chain(channel_id, info, pending.key_index)
            assert pending.id is not None
            self._write(self.store.drop_pending, pending.id)
        for state in self._write(self.store.channels):
            info = self._reader.channel(state.channel_id)
            if info is None or info.client != self._signer(state).address or info.node != state.node:
                self._write(self.store.mark, state.channel_id, GONE)
                continue
            self._store_info(state.channel_id, info)
            self._checked[state.channel_id] = time.monotonic()

    async def _current(self, node: str) -> ChannelState | None:
        """The open channel to pay ``node`` on, re-read from the chain when last read over ``chain_check_s`` ago:
        a channel another process of this client closed (or the chain forgot) is skipped, not paid on (the node
        would refuse it, ``voucher_channel_closing``)."""
        for _ in range(8):  # each pass retires one channel; a client has few per node
            # In the book's order: after every settle queued before (a finished request's reservation is gone).
            state = await self._books.run(self.store.active, node)
            if state is None or time.monotonic() - self._checked.get(state.channel_id, 0.0) < self.chain_check_s:
                return state
            info = await asyncio.to_thread(self._reader.channel, state.channel_id)
            self._checked[state.channel_id] = time.monotonic()
            if info is None or info.client != self._signer(state).address or info.node != state.node:
                await self._books.run(self.store.mark, state.channel_id, GONE)
                continue
            await asyncio.to_thread(self._store_info, state.channel_id, info)
            if _state_name(info) == OPEN:
                return await self._books.run(self.store.get, state.channel_id)
        return None

    # -- recovery of a lost book ------------------------------------------------------------------------------

    def _all_opened(self, from_block: int, to_block: int) -> list[tuple[int, str, str]]:
        """Every ``ChannelOpened`` of the contract in the range, as (channel id, client, node), in chunks."""
        topic = Web3.keccak(text="ChannelOpened(uint256,address,address,uint256)")
        opened: list[tuple[int, str, str]] = []
        start = from_block
        while start <= to_block:
            end = min(to_block, start + LOG_CHUNK_BLOCKS - 1)
            logs = self._reader.w3.eth.get_logs(
                {"address": self._reader.address, "fromBlock": start, "toBlock": end, "topics": [topic]}
            )
            for entry in logs:
                channel, client, node = (bytes(t) for t in entry["topics"][1:4])
                opened.append(
                    (
                        int.from_bytes(channel, "big"),
                        checksum("0x" + client[12:].hex()),
                        checksum("0x" + node[12:].hex()),
                    )
                )
            start = end + 1
        return opened

    def recover(self, *, from_block: int = 0, gap_limit: int = RECOVERY_GAP_LIMIT, close: bool = True) -> Recovered:
        """Rebuild the book's channels from the chain after the state directory was lost (or restored from an old
        copy), and start closing the ones that are still open.

        Channels are found by their ``ChannelOpened`` events from ``from_block`` (the deployment's block): those of
        the main address, and those of fresh addresses re-derived from the main key (:func:`derive_channel_account`)
        for every node that has a channel, index by index, until ``gap_limit`` consecutive indices have none. A
        channel the book lacks is recorded ``recovered``: its deposit, redeemed amount and state come from the chain,
        but what was signed on it is not known, so nothing is ever signed on it again (a new voucher could be below
        one the node holds; its ``last`` is the deposit) and, with ``close``, its close is started at once: the node
        may redeem its latest voucher until the dispute delay ends, and then :meth:`reclaim` returns the rest.
        Recovered channels already in the book that are still open are closed too (a recovery interrupted earlier).
        """
        if gap_limit < 1:
            raise InvalidChainInput("gap_limit", gap_limit, "must be at least 1")
        to_block = int(self._reader.w3.eth.block_number)
        opened = self._all_opened(from_block, to_block)
        by_pair: dict[tuple[str, str], list[int]] = {}
        for channel_id, client, node in opened:
            by_pair.setdefault((client, node), []).append(channel_id)
        ours = [(cid, "") for (client, _node), ids in by_pair.items() if client == self._account.address for cid in ids]
        nodes = sorted({node for _cid, _client, node in opened})
        index, last_hit = 0, -1
        while index <= last_hit + gap_limit:
            for node in nodes:
                derived = derive_channel_account(
                    self._account,
                    chain_id=self._domain.chain_id,
                    contract=self._domain.contract,
                    node=node,
                    index=index,
                )
                hits = by_pair.get((derived.address, node), [])
                if hits:
                    last_hit = index
                    self._keys[f"{node}:{index}"] = derived
                    ours += [(cid, str(index)) for cid in hits]
            index += 1
        found: list[ChannelState] = []
        known = 0
        for channel_id, key_index in sorted(ours):
            if self._write(self.store.get, channel_id) is not None:
                known += 1
                continue
            info = self._reader.channel(channel_id)
            if info is None:
                continue  # the logs and the state disagree (a reorg): nothing to recover from it
            found.append(self._record_from_chain(channel_id, info, key_index, recovered=True))
            self._checked[channel_id] = time.monotonic()
        closing: list[tuple[ChannelState, TxReceipt]] = []
        if close:
            for state in self.channels():
                if state.recovered and state.state == OPEN:
                    receipt = self._reader.with_account(self._signer(state)).start_close(state.channel_id)
                    closing.append((self._reread(state.channel_id), receipt))
        return Recovered(
            found=tuple(found),
            known=known,
            closing=tuple(closing),
            fresh_indices=index,
            from_block=from_block,
            to_block=to_block,
        )

    def _opened_ids(self, client: str, node: str, from_block: int) -> list[int]:
        topic = Web3.keccak(text="ChannelOpened(uint256,address,address,uint256)")
        logs = self._reader.w3.eth.get_logs(
            {
                "address": self._reader.address,
                "fromBlock": from_block,
                "toBlock": "latest",
                "topics": [topic, None, _address_topic(client), _address_topic(node)],
            }
        )
        return [int.from_bytes(bytes(log["topics"][1]), "big") for log in logs]

    # -- deposits (sync: the CLI's, and the request path's through worker threads) ----------------------------

    def _fund(self, payer: LocalAccount, amount: int) -> None:
        """Send ``amount`` wei plus gas for its channel's life from the main address to a fresh ``payer``.

        Through the ledger's per-key nonce manager, so it never collides with the main key's other transactions.
        """
        from ledger import transfer

        w3 = self._reader.w3
        gas_price = 2 * int(w3.eth.gas_price)
        # A missing receipt is TransactionOutcomeUnknown (the transfer may still be mined), as for any send.
        transfer(
            w3,
            self._account,
            payer.address,
            amount + FRESH_GAS_UNITS * gas_price,
            gas_price=gas_price,
            receipt_timeout=FUND_RECEIPT_TIMEOUT_S,
        )

    def _next_fresh_index(self) -> int:
        """The derivation index of the next fresh address: one above every index the book used (channels and pending
        deposits), so an index lost to a failed open, or left out by a recovery, is never handed out twice."""
        used = [int(c.key_index) for c in self.store.channels(include_closed=True) if c.key_index]
        used += [int(p.key_index) for p in self.store.pending() if p.key_index]
        return max(used, default=-1) + 1

    def _reserve_fresh(
        self, node: str, amount: int, *, from_block: int, budget: int | None, fresh: bool
    ) -> tuple[int | None, str]:
        """On the book's thread: pick the key index (fresh ones) and record the pending deposit in one job, so two
        opens of this process never take the same index."""
        key_index = str(self._next_fresh_index()) if fresh else ""
        pending = self.store.reserve_deposit(node, amount, from_block=from_block, budget=budget, key_index=key_index)
        return pending, key_index

    def _exhausted(self, needed: int) -> WalletExhausted:
        committed: int = self._write(self.store.committed_deposits)
        return WalletExhausted(needed, max(0, self.budget_wei - committed))

    def _open_sync(self, node: str, amount: int, *, budget: int | None, fresh: bool) -> ChannelState:
        node = checksum(node, param="node")
        from_block = int(self._reader.w3.eth.block_number)
        pending, key_index = self._write(
            self._reserve_fresh, node, amount, from_block=from_block, budget=budget, fresh=fresh
        )
        if pending is None:
            raise self._exhausted(amount)
        payer = self._fresh_key(node, int(key_index)) if key_index else self._account
        try:
            if fresh:
                self._fund(payer, amount)
            opened = self._reader.with_account(payer).open_channel(node, amount)
        except TransactionOutcomeUnknown:
            raise  # it may be mined: the pending row stays until reconcile() finds (or does not find) the channel
        except BaseException:
            self._write(self.store.drop_pending, pending)
            raise
        recorded: ChannelState = self._write(
            self.store.record_channel,
            channel_id=opened.channel_id,
            node=node,
            deposit=amount,
            key_index=key_index,
            pending_id=pending,
        )
        return recorded

    def _record_from_chain(
        self, channel_id: int, info: Any, key_index: str, *, recovered: bool = False
    ) -> ChannelState:
        """Record a channel the book lacks as the contract shows it (``info``: its on-chain state)."""
        recorded: ChannelState = self._write(
            self.store.record_channel,
            channel_id=channel_id,
            node=info.node,
            deposit=info.deposit,
            redeemed=info.redeemed,
            closes_at=info.closes_at,
            state=_state_name(info),
            key_index=key_index,
            recovered=recovered,
        )
        return recorded

    def _top_up_sync(self, state: ChannelState, amount: int, *, budget: int | None) -> ChannelState:
        pending = self._write(
            self.store.reserve_deposit,
            state.node,
            amount,
            from_block=int(self._reader.w3.eth.block_number),
            budget=budget,
            key_index=state.key_index,
        )
        if pending is None:
            raise self._exhausted(amount)
        try:
            self._reader.with_account(self._signer(state)).top_up(state.channel_id, amount)
        except TransactionOutcomeUnknown:
            raise
        except BaseException:
            self._write(self.store.drop_pending, pending)
            raise
        info = self._reader.channel(state.channel_id)
        assert info is not None
        self._write(self.store.drop_pending, pending)
        self._store_info(state.channel_id, info)
        refreshed: ChannelState | None = self._write(self.store.get, state.channel_id)
        assert refreshed is not None
        return refreshed

    def deposit(self, node: str, amount_wei: int, *, fresh: bool | None = None) -> ChannelState:
        """Top up the open channel to ``node`` by ``amount_wei``, or open one with it (outside the budget: an
        explicit deposit is the user's own choice). ``fresh`` opens a new channel from a fresh address."""
        if amount_wei <= 0:
            raise InvalidChainInput("amount", amount_wei, "must be at least 1 wei")
        node = checksum(node, param="node")
        use_fresh = self.fresh_addresses if fresh is None else fresh
        state = None if fresh else self.channel(node)
        if state is None:
            return self._open_sync(node, amount_wei, budget=None, fresh=use_fresh)
        if state.key_index:
            self._fund(self._signer(state), amount_wei)
        return self._top_up_sync(state, amount_wei, budget=None)

    def _find(self, *, node: str | None = None, channel_id: int | None = None) -> list[ChannelState]:
        states = self.channels()
        if channel_id is not None:
            found = [c for c in states if c.channel_id == channel_id]
            if not found:
                raise UnknownChannel(f"channel {channel_id}")
            return found
        if node is not None:
            wanted = checksum(node, param="node")
            found = [c for c in states if c.node == wanted]
            if not found:
                raise UnknownChannel(f"channel to {wanted}")
            return found
        return states

    def start_close(self, *, node: str | None = None) -> list[tuple[ChannelState, TxReceipt]]:
        """Start closing the open channels to ``node`` (every open one when None): the node may still redeem until
        each one's ``closes_at``; then :meth:`reclaim` returns the rest."""
        closed = []
        for state in self._find(node=node):
            if state.state != OPEN:
                continue
            receipt = self._reader.with_account(self._signer(state)).start_close(state.channel_id)
            closed.append((self._reread(state.channel_id), receipt))
        return closed

    def reclaim(self, now: int) -> Reclaimed:
        """Finish every close whose dispute delay ended by ``now`` (chain time) and withdraw what the paying
        addresses may withdraw. A fresh address's refund is withdrawn to that address (sweeping it to the main
        address would link the channels again; do that yourself if you accept it)."""
        settled: list[int] = []
        receipts: list[TxReceipt] = []
        payers: dict[str, LocalAccount] = {self._account.address: self._account}
        for state in self.channels(include_closed=True):  # settled ones too: a recovered refund may wait there
            payer = self._signer(state)
            payers[payer.address] = payer
            if state.state == CLOSING and state.closes_at <= now:
                receipts.append(self._reader.with_account(payer).finish_close(state.channel_id))
                settled.append(state.channel_id)
                self._reread(state.channel_id)
        withdrawn = 0
        for payer in payers.values():
            available = self._reader.balances(payer.address).withdrawable
            if available > 0:
                receipts.append(self._reader.with_account(payer).withdraw())
                withdrawn += available
        return Reclaimed(settled=tuple(settled), withdrawn_wei=withdrawn, receipts=tuple(receipts))

    # -- the request path --------------------------------------------------------------------------------------

    async def pay(
        self, destination: ModelNode, request: CompletionRequest, prompt_tokens: int | None
    ) -> tuple[CompletionRequest, Payment | None]:
        """``request`` with a voucher for ``destination`` (v2), and the payment to finish; unchanged for a free node.

        ``prompt_tokens`` is the prompt counted with the node's tokenizer, or None to bound it from the UTF-8 bytes.
        """
        price = destination.price_per_1k_tokens
        if price == 0:
            return request, None
        tokens = prompt_tokens if prompt_tokens is not None else len(request.prompt.encode()) + BYTES_BOUND_MARGIN
        reservation = cost(price, tokens + request.max_tokens)
        node = checksum(destination.operator, param="node")
        admission = self._admission.setdefault(node, asyncio.Lock())
        deadline = time.monotonic() + ADMISSION_WAIT_S
        try:
            # Vouchers on a channel must reach the node in the order they were signed (a lower one after a higher
            # one is stale): one request per channel is admitted at a time, until the node answered it.
            await asyncio.wait_for(admission.acquire(), ADMISSION_WAIT_S)
        except TimeoutError:
            raise PaymentBusy(node, ADMISSION_WAIT_S) from None
        try:
            # ... and across this client's processes: the node's file lock, until the same moment.
            while not self._locks.try_acquire(node):
                if time.monotonic() >= deadline:
                    raise PaymentBusy(node, ADMISSION_WAIT_S)
                await asyncio.sleep(LOCK_POLL_S)
            try:
                paid, payment = await self._sign(node, request, price, reservation)
            except BaseException:
                self._locks.release(node)
                raise
        except BaseException:
            admission.release()
            raise
        payment.progress.admission = admission
        bill_payment()
        return paid, payment

    async def _sign(
        self, node: str, request: CompletionRequest, price: int, reservation: int
    ) -> tuple[CompletionRequest, Payment]:
        async with self._lock:
            state = await self._current(node)
            if state is None:
                state = await self._open(node, max(1, reservation))
                self._checked[state.channel_id] = time.monotonic()
            signed = await self._reserve_and_sign(state, reservation)
            for _ in range(3):
                if signed is not None:
                    break
                needed = await self._books.run(self.store.next_amount, state.channel_id, reservation)
                state = await self._top_up(state, needed - state.deposit)
                signed = await self._reserve_and_sign(state, reservation)
            if signed is None:
                raise await asyncio.to_thread(self._exhausted, reservation)
            amount, voucher = signed
        payment = Payment(
            node=node,
            channel_id=state.channel_id,
            amount=amount,
            reservation=reservation,
            price_per_1k_tokens=price,
        )
        return request.with_voucher(voucher.to_json()), payment

    async def _reserve_and_sign(self, state: ChannelState, reservation: int) -> tuple[int, Voucher] | None:
        """Commit the next amount on ``state``'s channel (before the voucher exists) and sign it, on the book's
        thread: after every settle queued before it, and off the event loop (the commit waits for the book's write
        lock, up to ``BUSY_TIMEOUT_S`` while another process writes, and fsyncs). None when the deposit does not
        cover it (nothing committed).

        A caller cancelled meanwhile (a request timeout) never sends the voucher: the job still runs to its end,
        and a reservation it committed is released then (queued after it), or every later voucher on the channel
        would be that much too high.
        """
        job = asyncio.wrap_future(self._books.submit(self._reserve_and_sign_sync, state, reservation))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(lambda done: self._release_unsent(done, state.channel_id, reservation))
            raise

    def _reserve_and_sign_sync(self, state: ChannelState, reservation: int) -> tuple[int, Voucher] | None:
        amount = self.store.sign_amount(state.channel_id, reservation)  # committed before the voucher exists
        if amount is None:
            return None
        try:
            return amount, sign_voucher(self._signer(state), self._domain, state.channel_id, amount)
        except BaseException:
            self.store.settle(state.channel_id, reservation, 0)  # no voucher: the node never sees this request
            raise

    def _release_unsent(
        self, done: asyncio.Future[tuple[int, Voucher] | None], channel_id: int, reservation: int
    ) -> None:
        if done.cancelled() or done.exception() is not None or done.result() is None:
            return  # nothing was committed (or the job released it itself)
        self._books.post(
            f"release of an unsent voucher on channel {channel_id}", self.store.settle, channel_id, reservation, 0
        )

    def admitted(self, payment: Payment) -> None:
        """The node answered ``payment``'s request (its voucher was accepted): the next one may be sent."""
        lock, payment.progress.admission = payment.progress.admission, None
        if lock is not None:
            self._locks.release(payment.node)
            lock.release()

    def finish(self, payment: Payment, used_tokens: int | None) -> None:
        """Close ``payment``'s books: ``used_tokens`` from the last delta seen (0: the node never had the request),
        or None when the reply broke after the node had it (the whole reservation counts as spent).

        Returns at once: the settle is queued on the book's thread, ahead of any voucher asked for afterwards (which
        therefore sees it). A failing settle is logged and raised by :meth:`drain` or :meth:`close`."""
        self.admitted(payment)
        with self._book:
            if payment.progress.finished:
                return
            payment.progress.finished = True
        spent = payment.reservation if used_tokens is None else cost(payment.price_per_1k_tokens, used_tokens)
        spent = min(spent, payment.reservation)
        self._books.post(
            f"settle of a request on channel {payment.channel_id}",
            self.store.settle,
            payment.channel_id,
            payment.reservation,
            spent,
        )
        bill_spent(spent, payment.price_per_1k_tokens if used_tokens != 0 else None)

    async def _open(self, node: str, needed: int) -> ChannelState:
        def opening() -> tuple[ChannelState, int]:
            amount = self._auto_amount(needed)
            return self._open_sync(node, amount, budget=self.budget_wei, fresh=self.fresh_addresses), amount

        state, amount = await asyncio.to_thread(opening)
        self.spent_wei += amount
        return state

    async def _top_up(self, state: ChannelState, shortfall: int) -> ChannelState:
        def topping() -> tuple[ChannelState, int]:
            amount = self._auto_amount(shortfall)
            if state.key_index:
                self._fund(self._signer(state), amount)
            return self._top_up_sync(state, amount, budget=self.budget_wei), amount

        refreshed, amount = await asyncio.to_thread(topping)
        self.spent_wei += amount
        return refreshed

    def _auto_amount(self, needed: int) -> int:
        """``deposit_wei`` (or ``needed`` when more), cut to the budget left; ``WalletExhausted`` when even
        ``needed`` does not fit. Off the event loop (it reads the book)."""
        left = self.budget_wei - int(self._write(self.store.committed_deposits))
        if needed > left:
            raise WalletExhausted(needed, max(0, left))
        return min(max(self.deposit_wei, needed), left)


def _release(books: BookQueue, locks: ChannelLocks, store: WalletStore, temporary: Path | None) -> None:
    """Drain the book's queue (no raise: this also runs when the wallet is collected or at exit), then let go."""
    if books.on_thread():  # collected during one of its own book jobs: wait for the queue from another thread
        threading.Thread(target=_release, args=(books, locks, store, temporary), daemon=True).start()
        return
    if not books.close():
        log.error("wallet book: closed with writes still queued or running")
    locks.close()
    store.close()
    if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)


def _address_topic(address: str) -> HexBytes:
    return HexBytes(bytes(12) + bytes.fromhex(checksum(address)[2:]))
