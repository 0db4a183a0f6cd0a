"""The model node's payment gate (``docs/protocol.md`` §10.4): no valid voucher, no inference.

Why a gate in front of the engine rather than a check inside it: the rule is about money, not about generation, and
it must hold before a single token is computed. :class:`PaymentGate` counts the prompt's tokens with the engine's own
tokenizer (so the client's bound and the node's count agree), asks the durable :class:`ledger.VoucherStore` to accept
the voucher (committed before it returns), and after the answer charges what was used. The store's calls (a chain
read and a SQLite commit) and the tokenizer run in worker threads: the event loop keeps serving other requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ledger import AcceptedVoucher, InvalidChainInput, PriceRule, Voucher, VoucherRejected, VoucherStore, Wei

if TYPE_CHECKING:
    from node.overlay._completion import CompletionRequest

log = logging.getLogger(__name__)


class PaymentRefused(Exception):
    """The request is not paid for; ``code`` is its error line's code (``payment_required`` or a ``voucher_*``)."""

    def __init__(self, code: str, message: str, param: str | None = "voucher") -> None:
        self.code = code
        self.message = message
        self.param = param
        super().__init__(f"{code}: {message}")


class PaymentGate:
    """Checks each request's voucher against ``store`` at the node's registered ``price_per_1k_tokens``.

    ``tokenize`` is the engine's tokenizer (``TorchEngine.tokenize``): the prompt count the reservation is priced on.
    """

    def __init__(
        self, store: VoucherStore, *, price_per_1k_tokens: int, tokenize: Callable[[str], Sequence[int]]
    ) -> None:
        if not isinstance(price_per_1k_tokens, int) or price_per_1k_tokens <= 0:
            raise InvalidChainInput("price_per_1k_tokens", price_per_1k_tokens, "a paying node's price is > 0 wei")
        self.store = store
        self.price_per_1k_tokens = Wei(price_per_1k_tokens)
        self._tokenize = tokenize

    async def admit(self, request: CompletionRequest) -> AcceptedVoucher:
        """Accept ``request``'s voucher (durably) or raise :class:`PaymentRefused`; the engine may run only after."""
        if request.voucher is None:
            raise PaymentRefused("payment_required", "this model node serves only requests carrying a voucher (v2)")
        try:
            voucher = Voucher.from_json(request.voucher.to_json())
        except InvalidChainInput as exc:
            raise PaymentRefused("invalid_request", "the voucher is malformed") from exc
        prompt_tokens = len(await asyncio.to_thread(self._tokenize, request.prompt))
        price = PriceRule(
            price_per_1k_tokens=self.price_per_1k_tokens, prompt_tokens=prompt_tokens, max_tokens=request.max_tokens
        )
        try:
            return await asyncio.to_thread(self.store.accept, voucher, price)
        except VoucherRejected as exc:
            # The message names the rule, not the values: the node's book is its own business.
            raise PaymentRefused(exc.code, f"the voucher was refused ({exc.code.removeprefix('voucher_')})") from exc

    async def settle(self, accepted: AcceptedVoucher, *, prompt_tokens: int, completion_tokens: int) -> Wei:
        """Charge the request by the counts of the last delta sent (capped at its reservation); returns the cost."""
        limit = accepted.price.prompt_tokens + accepted.price.max_tokens
        used = min(limit, max(0, prompt_tokens) + max(0, completion_tokens))
        return await asyncio.to_thread(self.store.settle, accepted, used)


class Payments(Protocol):
    """What ``completion_handler`` needs from a paying node: admit a request's voucher (None: this request is free)
    and settle it after serving."""

    async def admit(self, request: CompletionRequest) -> AcceptedVoucher | None:
        """Accept the voucher durably, raise :class:`PaymentRefused`, or None when the node serves for free now."""
        ...

    async def settle(self, accepted: AcceptedVoucher, *, prompt_tokens: int, completion_tokens: int) -> Wei:
        """Charge what was used."""
        ...


class RegistryPricedGate:
    """A :class:`PaymentGate` at the price the node has **registered on chain**, read through ``price`` (blocking;
    run in a thread, cached for ``refresh_s``). While the price is 0 or the node is not registered yet, requests are
    served free; once it is registered with a price, every request must carry a valid voucher. This lets
    ``ps-node serve`` start before ``ps-node register`` (which checks that the endpoint answers)."""

    def __init__(
        self,
        *,
        store: Callable[[], VoucherStore],
        price: Callable[[], int],
        tokenize: Callable[[str], Sequence[int]],
        refresh_s: float = 15.0,
    ) -> None:
        self._open_store = store
        self._price = price
        self._tokenize = tokenize
        self._refresh_s = refresh_s
        self._checked_at = -float("inf")
        self._gate: PaymentGate | None = None
        self._lock = asyncio.Lock()

    async def _current(self) -> PaymentGate | None:
        async with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= self._refresh_s:
                price = await asyncio.to_thread(self._price)
                self._checked_at = now
                if price <= 0:
                    self._gate = None
                elif self._gate is None or self._gate.price_per_1k_tokens != price:
                    store = self._gate.store if self._gate is not None else await asyncio.to_thread(self._open_store)
                    self._gate = PaymentGate(store, price_per_1k_tokens=price, tokenize=self._tokenize)
            return self._gate

    async def admit(self, request: CompletionRequest) -> AcceptedVoucher | None:
        gate = await self._current()
        return None if gate is None else await gate.admit(request)

    async def settle(self, accepted: AcceptedVoucher, *, prompt_tokens: int, completion_tokens: int) -> Wei:
        gate = self._gate
        if gate is None:  # the price went to 0 mid-request: the reservation still settles in the store it came from
            gate = PaymentGate(
                await asyncio.to_thread(self._open_store),
                price_per_1k_tokens=accepted.price.price_per_1k_tokens or 1,
                tokenize=self._tokenize,
            )
        return await gate.settle(accepted, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
