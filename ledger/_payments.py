"""``PaymentChannels``: the typed handle over the payment-channel contract, and the records it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3

from ledger._artifacts import load_artifact
from ledger._errors import ChainError, InvalidChainInput
from ledger._handle import ContractHandle
from ledger._reverts import RevertDecoder
from ledger._tx import RECEIPT_TIMEOUT, send_transaction
from ledger._types import TxReceipt, Wei, check_bytes32, check_uint, checksum
from ledger._vouchers import DOMAIN_NAME, DOMAIN_VERSION, Voucher, VoucherDomain

_CONTRACT = "PaymentChannels"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelInfo:
    """One channel as the contract reports it."""

    #: The channel id (>= 1).
    channel_id: int
    #: The paying account (signs vouchers, receives the refund).
    client: ChecksumAddress
    #: The model node's operator (the only one who redeems).
    node: ChecksumAddress
    #: Everything deposited so far, in wei.
    deposit: Wei
    #: Cumulative amount already paid to the node, in wei (<= deposit).
    redeemed: Wei
    #: Unix time from which the node can no longer redeem; 0 while open.
    closes_at: int
    #: Whether the rest was credited back to the client (the channel is over).
    settled: bool

    @property
    def remaining(self) -> Wei:
        """Deposit not yet redeemed, in wei (what further vouchers can still be paid from)."""
        return Wei(self.deposit - self.redeemed)

    @property
    def closing(self) -> bool:
        """Whether the client started closing the channel."""
        return self.closes_at != 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelBalances:
    """What one account has on the payment contract now."""

    #: Earnings still locked for verification (slashable), in wei.
    locked: Wei
    #: What ``withdraw`` pays now (released earnings, refunds, slashed funds for the treasury), in wei.
    withdrawable: Wei
    #: Unix time when everything locked now is released; 0 when nothing is locked.
    locked_until: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenedChannel:
    """The outcome of ``open_channel``: the new id and the transaction."""

    #: The new channel's id.
    channel_id: int
    #: The mined transaction.
    receipt: TxReceipt


#: The contract's ``MAX_BATCH``: the most vouchers one ``redeem_batch`` takes.
MAX_BATCH = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentParams:
    """Constructor parameters of ``PaymentChannels`` (immutable once deployed); validated on construction."""

    #: Seconds from a client's ``start_close`` until the node can no longer redeem, in [0, 2**63).
    dispute_delay: int = 3_600
    #: Seconds of one lock epoch, in [1, 2**32): redeemed earnings stay locked between one and two of them.
    verification_window: int = 3_600
    #: Seconds a default-admin transfer must wait, in [0, 2**48).
    admin_transfer_delay: int = 86_400
    #: Receives slashed earnings; None means the deployer.
    treasury: ChecksumAddress | None = None
    #: Accounts granted ``SLASHER_ROLE`` at deployment (the attestation contract; a dev account in tests).
    slashers: tuple[ChecksumAddress, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.dispute_delay, int) or not 0 <= self.dispute_delay < 2**63:
            raise InvalidChainInput("dispute_delay", self.dispute_delay, "must be seconds in [0, 2**63)")
        if not isinstance(self.verification_window, int) or not 1 <= self.verification_window < 2**32:
            raise InvalidChainInput("verification_window", self.verification_window, "must be seconds in [1, 2**32)")
        if not isinstance(self.admin_transfer_delay, int) or not 0 <= self.admin_transfer_delay < 2**48:
            raise InvalidChainInput("admin_transfer_delay", self.admin_transfer_delay, "must be seconds in [0, 2**48)")
        if self.treasury is not None:
            object.__setattr__(self, "treasury", checksum(self.treasury, param="treasury"))
        object.__setattr__(self, "slashers", tuple(checksum(a, param="slasher") for a in self.slashers))


def deploy_payments(
    w3: Web3, deployer: LocalAccount, *, registry: str, params: PaymentParams
) -> tuple[ChecksumAddress, int]:
    """Deploy ``PaymentChannels`` against ``registry`` (admin: the deployer) and grant ``params.slashers``.

    Returns the address and the deployment block.
    """
    artifact = load_artifact(_CONTRACT)
    factory = w3.eth.contract(abi=list(artifact.abi), bytecode=artifact.bytecode)
    constructor = factory.constructor(
        deployer.address,
        params.admin_transfer_delay,
        params.treasury or deployer.address,
        checksum(registry, param="registry"),
        params.dispute_delay,
        params.verification_window,
    )
    receipt = send_transaction(w3, deployer, constructor, RevertDecoder([artifact.abi]))
    address = receipt["contractAddress"]
    if address is None:
        raise ChainError("the PaymentChannels deployment receipt carries no contract address")
    handle = PaymentChannels(w3, address, deployer)
    for slasher in params.slashers:
        handle.grant_slasher(slasher)
    return handle.address, int(receipt["blockNumber"])


class PaymentChannels(ContractHandle):
    """One deployed ``PaymentChannels``. Reads need no account; writes are signed by ``account``.

    Writes return a :class:`TxReceipt`; a revert raises the contract's custom error as a
    :class:`~ledger.ContractRevert` subclass with its decoded arguments.
    """

    CONTRACT = _CONTRACT

    #: ``keccak256("SLASHER_ROLE")``: may take locked earnings (the attestation contract).
    SLASHER_ROLE: bytes = bytes(Web3.keccak(text="SLASHER_ROLE"))

    def __init__(
        self,
        w3: Web3,
        address: str,
        account: LocalAccount | None = None,
        *,
        receipt_timeout: float = RECEIPT_TIMEOUT,
    ) -> None:
        super().__init__(w3, address, account, receipt_timeout=receipt_timeout)
        self._opened_topic = bytes(Web3.keccak(text="ChannelOpened(uint256,address,address,uint256)"))
        self._domain: VoucherDomain | None = None

    # -- reads -------------------------------------------------------------------------------------------------

    def domain(self) -> VoucherDomain:
        """The EIP-712 domain vouchers for this contract are signed under (read once from ``eip712Domain()``).

        The contract's own name and version are checked against the ones :mod:`ledger._vouchers` signs with,
        so a contract built with another domain fails here instead of refusing every voucher later.
        """
        if self._domain is None:
            raw = self._call(self._contract.functions.eip712Domain())
            _fields, name, version, chain_id, contract, _salt, _extensions = raw
            if (name, version) != (DOMAIN_NAME, DOMAIN_VERSION):
                raise ChainError(f"PaymentChannels at {self._address} signs as {name!r} v{version!r}, not ours")
            self._domain = VoucherDomain(chain_id=int(chain_id), contract=checksum(contract))
        return self._domain

    def channel(self, channel_id: int) -> ChannelInfo | None:
        """Channel ``channel_id``, or None when no such channel was opened."""
        raw = self._call(self._contract.functions.getChannel(check_uint(channel_id, "channel_id")))
        client, deposit, node, redeemed, closes_at, settled = raw
        client = checksum(client)
        if int(client, 16) == 0:
            return None
        return ChannelInfo(
            channel_id=channel_id,
            client=client,
            node=checksum(node),
            deposit=Wei(deposit),
            redeemed=Wei(redeemed),
            closes_at=int(closes_at),
            settled=bool(settled),
        )

    def balances(self, account: str) -> ChannelBalances:
        """Locked and withdrawable amounts of ``account`` (node, client or treasury) at the latest block."""
        locked, withdrawable, until = self._call(
            self._contract.functions.balancesOf(checksum(account, param="account"))
        )
        return ChannelBalances(locked=Wei(locked), withdrawable=Wei(withdrawable), locked_until=int(until))

    def voucher_digest(self, channel_id: int, cumulative_amount: int) -> bytes:
        """The EIP-712 digest the contract computes for a voucher."""
        fn = self._contract.functions.voucherDigest(
            check_uint(channel_id, "channel_id"), check_uint(cumulative_amount, "cumulative_amount")
        )
        return bytes(self._call(fn))

    def voucher_signer(self, voucher: Voucher) -> ChecksumAddress | None:
        """The signer the contract recovers for ``voucher`` on this contract (None where it would refuse)."""
        fn = self._contract.functions.voucherSigner(voucher.channel_id, voucher.cumulative_amount, voucher.signature)
        signer = checksum(self._call(fn))
        return None if int(signer, 16) == 0 else signer

    def next_channel_id(self) -> int:
        """The id the next opened channel gets."""
        return int(self._call(self._contract.functions.nextChannelId()))

    def dispute_delay(self) -> int:
        """Seconds from ``start_close`` until the node can no longer redeem."""
        return int(self._call(self._contract.functions.disputeDelay()))

    def verification_window(self) -> int:
        """Seconds of one lock epoch (earnings stay locked between one and two of them)."""
        return int(self._call(self._contract.functions.verificationWindow()))

    def max_batch(self) -> int:
        """The most vouchers one ``redeem_batch`` takes."""
        return int(self._call(self._contract.functions.MAX_BATCH()))

    def registry(self) -> ChecksumAddress:
        """The registry consulted for jailed nodes."""
        return checksum(self._call(self._contract.functions.registry()))

    def treasury(self) -> ChecksumAddress:
        """Who receives slashed earnings."""
        return checksum(self._call(self._contract.functions.treasury()))

    def has_role(self, role: bytes, account: str) -> bool:
        """Whether ``account`` holds ``role`` (32 bytes, e.g. :attr:`SLASHER_ROLE`)."""
        fn = self._contract.functions.hasRole(check_bytes32(role, "role"), checksum(account, param="account"))
        return bool(self._call(fn))

    # -- writes ------------------------------------------------------------------------------------------------

    def open_channel(self, node: str, deposit: int) -> OpenedChannel:
        """Open a channel from the signer to ``node`` with ``deposit`` wei; returns its id."""
        fn = self._contract.functions.open(checksum(node, param="node"))
        receipt = send_transaction(
            self._w3, self._signer(), fn, self._decoder, value=check_uint(deposit, "deposit", low=1)
        )
        ids = [
            int.from_bytes(bytes(log["topics"][1]), "big")
            for log in receipt["logs"]
            if log["address"] == self._address and log["topics"] and bytes(log["topics"][0]) == self._opened_topic
        ]
        if len(ids) != 1:
            raise ChainError(f"open transaction emitted {len(ids)} ChannelOpened events, expected 1")
        return OpenedChannel(channel_id=ids[0], receipt=self._typed_receipt(receipt))

    def top_up(self, channel_id: int, amount: int) -> TxReceipt:
        """Add ``amount`` wei to the signer's open channel."""
        fn = self._contract.functions.topUp(check_uint(channel_id, "channel_id"))
        return self._send(fn, value=check_uint(amount, "amount", low=1))

    def redeem(self, voucher: Voucher) -> TxReceipt:
        """Redeem ``voucher`` (the signer must be the channel's node)."""
        self._check_domain(voucher)
        fn = self._contract.functions.redeem(voucher.channel_id, voucher.cumulative_amount, voucher.signature)
        return self._send(fn)

    def redeem_batch(self, vouchers: Sequence[Voucher]) -> TxReceipt:
        """Redeem one voucher per channel in one transaction (1..``max_batch()`` of them, all or nothing)."""
        for voucher in vouchers:
            self._check_domain(voucher)
        items = [(v.channel_id, v.cumulative_amount, v.signature) for v in vouchers]
        return self._send(self._contract.functions.redeemBatch(items))

    def start_close(self, channel_id: int) -> TxReceipt:
        """Start closing the signer's channel; the node may redeem for ``dispute_delay()`` more seconds."""
        return self._send(self._contract.functions.startClose(check_uint(channel_id, "channel_id")))

    def finish_close(self, channel_id: int) -> TxReceipt:
        """After the dispute delay, credit the channel's unredeemed rest to its client (anyone may call)."""
        return self._send(self._contract.functions.finishClose(check_uint(channel_id, "channel_id")))

    def withdraw(self) -> TxReceipt:
        """Pull everything the signer may withdraw."""
        return self._send(self._contract.functions.withdraw())

    def slash(self, node: str, amount: int, evidence_hash: bytes) -> TxReceipt:
        """Take up to ``amount`` wei of ``node``'s locked earnings (the signer must hold the slasher role)."""
        fn = self._contract.functions.slash(
            checksum(node, param="node"), check_uint(amount, "amount"), check_bytes32(evidence_hash, "evidence_hash")
        )
        return self._send(fn)

    def grant_slasher(self, account: str) -> TxReceipt:
        """Grant ``account`` the slasher role (the signer must be the default admin)."""
        fn = self._contract.functions.grantRole(self.SLASHER_ROLE, checksum(account, param="account"))
        return self._send(fn)

    # -- internals ---------------------------------------------------------------------------------------------

    def _check_domain(self, voucher: Voucher) -> None:
        """Refuse, before any gas is spent, a voucher made for another chain or contract."""
        domain = self.domain()
        if voucher.domain != domain:
            raise InvalidChainInput("voucher", f"channel {voucher.channel_id}", "is for another chain or contract")
