"""The client's wallet: one payment channel per model node, and a voucher for every request (protocol §10.4).

Why the client keeps its own book rather than asking the node: the voucher must be signed *before* the answer, for
the cumulative amount the node will accept, and the only honest source of "what I owe" is what the client itself
saw served. Vouchers on one channel must reach the node in the order they were signed, so the wallet admits one
request per channel at a time: the next waits until the node answered the previous (its first delta) or it ended.
The wallet follows the spec's rule: the next voucher on a channel is
``max(last + 1, owed + in_flight + reservation)``; after a final delta ``owed`` grows by what that delta says was
used, and after a reply that broke once the node had the request, by the whole reservation (the node may have
charged that much). A try that failed before any path answered releases its reservation: the node never saw it.

Channels are opened on demand from a budget (``deposit_wei`` each, more when one request needs more) and topped up
the same way; nothing is ever spent beyond ``budget_wei``. Chain calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from eth_account.signers.local import LocalAccount

from ledger import PaymentChannels, Wei, sign_voucher
from node.client._errors import ClientError
from node.overlay import CompletionRequest, ModelNode

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


@dataclass(slots=True, kw_only=True)
class ChannelState:
    """What the wallet knows of one of its channels."""

    channel_id: int
    """On-chain id."""
    node: str
    """The model node's operator address."""
    deposit: int
    """Wei deposited so far."""
    last: int = 0
    """The highest cumulative amount signed on it, wei."""
    owed: int = 0
    """What the client believes its finished requests cost, wei."""
    in_flight: int = 0
    """Reservations of requests still streaming, wei."""


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


class Wallet:
    """Pays model nodes from ``account`` on the ``channels`` contract, within ``budget_wei`` of deposits in all."""

    def __init__(self, channels: PaymentChannels, account: LocalAccount, *, budget_wei: int, deposit_wei: int) -> None:
        if budget_wei < 0 or deposit_wei <= 0:
            raise ValueError("budget_wei must be >= 0 and deposit_wei > 0")
        self._pay = channels.with_account(account)
        self._account = account
        self._domain = self._pay.domain()
        self.budget_wei = budget_wei
        self.deposit_wei = deposit_wei
        self.spent_wei = 0
        self._channels: dict[str, ChannelState] = {}
        self._lock = asyncio.Lock()
        self._admission: dict[str, asyncio.Lock] = {}
        self._book = threading.Lock()  # finish() may run from a generator's finally: no await there

    def __repr__(self) -> str:
        return f"Wallet(address={self._account.address}, channels={len(self._channels)}, spent={self.spent_wei})"

    @property
    def address(self) -> str:
        """The paying address (every channel's client)."""
        return str(self._account.address)

    def channels(self) -> list[ChannelState]:
        """Copies of the wallet's channels."""
        with self._book:
            return [ChannelState(**{k: getattr(c, k) for k in ChannelState.__slots__}) for c in self._channels.values()]

    def channel(self, node: str) -> ChannelState | None:
        """The channel to ``node`` (a copy), or None."""
        return next((c for c in self.channels() if c.node == node), None)

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
        admission = self._admission.setdefault(destination.operator, asyncio.Lock())
        try:
            # Vouchers on a channel must reach the node in the order they were signed (a lower one after a higher
            # one is stale): one request per channel is admitted at a time, until the node answered it.
            await asyncio.wait_for(admission.acquire(), ADMISSION_WAIT_S)
        except TimeoutError:
            raise PaymentBusy(destination.operator, ADMISSION_WAIT_S) from None
        try:
            paid, payment = await self._sign(destination, request, price, reservation)
        except BaseException:
            admission.release()
            raise
        payment.progress.admission = admission
        return paid, payment

    async def _sign(
        self, destination: ModelNode, request: CompletionRequest, price: int, reservation: int
    ) -> tuple[CompletionRequest, Payment]:
        async with self._lock:
            state = self._channels.get(destination.operator)
            with self._book:
                last, base = (state.last, state.owed + state.in_flight) if state is not None else (0, 0)
            amount = max(last + 1, base + reservation)
            if state is None:
                state = await self._open(destination.operator, amount)
            elif amount > state.deposit:
                await self._top_up(state, amount - state.deposit)
            voucher = await asyncio.to_thread(sign_voucher, self._account, self._domain, state.channel_id, amount)
            with self._book:
                state.last = amount
                state.in_flight += reservation
        payment = Payment(
            node=destination.operator,
            channel_id=state.channel_id,
            amount=amount,
            reservation=reservation,
            price_per_1k_tokens=price,
        )
        return request.with_voucher(voucher.to_json()), payment

    def admitted(self, payment: Payment) -> None:
        """The node answered ``payment``'s request (its voucher was accepted): the next one may be sent."""
        lock, payment.progress.admission = payment.progress.admission, None
        if lock is not None:
            lock.release()

    def finish(self, payment: Payment, used_tokens: int | None) -> None:
        """Close ``payment``'s books: ``used_tokens`` from the last delta seen (0: the node never had the request),
        or None when the reply broke after the node had it (the whole reservation counts as spent)."""
        self.admitted(payment)
        with self._book:
            if payment.progress.finished:
                return
            payment.progress.finished = True
            state = self._channels[payment.node]
            state.in_flight = max(0, state.in_flight - payment.reservation)
            spent = payment.reservation if used_tokens is None else cost(payment.price_per_1k_tokens, used_tokens)
            state.owed += spent

    async def _open(self, node: str, needed: int) -> ChannelState:
        deposit = self._take(needed)
        try:
            opened = await asyncio.to_thread(self._pay.open_channel, node, deposit)
        except BaseException:
            self.spent_wei -= deposit
            raise
        state = ChannelState(channel_id=opened.channel_id, node=node, deposit=deposit)
        with self._book:
            self._channels[node] = state
        return state

    async def _top_up(self, state: ChannelState, shortfall: int) -> None:
        amount = self._take(shortfall)
        try:
            await asyncio.to_thread(self._pay.top_up, state.channel_id, amount)
        except BaseException:
            self.spent_wei -= amount
            raise
        with self._book:
            state.deposit += amount

    def _take(self, needed: int) -> int:
        """Reserve ``deposit_wei`` (or ``needed`` when more) of the budget, or at least ``needed`` when less is left."""
        left = self.budget_wei - self.spent_wei
        if needed > left:
            raise WalletExhausted(needed, left)
        amount = min(max(self.deposit_wei, needed), left)
        self.spent_wei += amount
        return amount
