"""``NodeRegistry``: the typed handle over the registry-and-staking contract."""

from __future__ import annotations

from eth_typing import ChecksumAddress
from web3 import Web3

from ledger._errors import ChainError, InvalidChainInput
from ledger._handle import ContractHandle
from ledger._types import NodeInfo, Role, TxReceipt, Wei, WithdrawalReceipts, check_bytes32, check_uint, checksum
from planetserve import InvalidValue, ModelId

_CONTRACT = "NodeRegistry"
_ZERO32 = bytes(32)


def _model_id_bytes32(value: ModelId | None) -> bytes:
    """The ABI ``bytes32`` of a model id (all zero for ``None``: relays): the chain edge of :class:`ModelId`."""
    if value is None:
        return _ZERO32
    try:
        return ModelId.parse(value, param="model_id").to_bytes()
    except InvalidValue as exc:
        raise InvalidChainInput(exc.param, exc.value, exc.reason) from None


class NodeRegistry(ContractHandle):
    """One deployed ``NodeRegistry``. Reads need no account; writes are signed by ``account``.

    Writes return a :class:`TxReceipt`; a revert raises the contract's custom error as a
    :class:`~ledger.ContractRevert` subclass with its decoded arguments; a transaction without a receipt in time
    raises :class:`~ledger.TransactionOutcomeUnknown` (never a revert).
    """

    CONTRACT = _CONTRACT

    #: ``keccak256("SLASHER_ROLE")``: the role allowed to slash (the attestation and payment contracts).
    SLASHER_ROLE: bytes = bytes(Web3.keccak(text="SLASHER_ROLE"))
    #: OpenZeppelin's default admin role (all zero): grants and revokes the slasher role.
    DEFAULT_ADMIN_ROLE: bytes = bytes(32)

    # -- reads -------------------------------------------------------------------------------------------------

    def get_node(self, operator: str) -> NodeInfo | None:
        """The node of ``operator``, or None when it has none."""
        address = checksum(operator, param="operator")
        raw = self._call(self._contract.functions.getNode(address))
        stake, key, mid, price, registered_at, unbonding_ends_at, role, jailed, endpoint = raw
        if registered_at == 0:
            return None
        return NodeInfo(
            operator=address,
            role=Role(role),
            stake=Wei(stake),
            x25519_public_key=bytes(key),
            model_id=ModelId(bytes(mid)),
            price_per_1k_tokens=Wei(price),
            registered_at=registered_at,
            unbonding_ends_at=unbonding_ends_at,
            endpoint=endpoint,
            active=self.is_active(address),
            jailed=bool(jailed),
        )

    def is_active(self, operator: str) -> bool:
        """Whether ``operator``'s node may be routed to."""
        return bool(self._call(self._contract.functions.isActive(checksum(operator, param="operator"))))

    def is_jailed(self, operator: str) -> bool:
        """Whether ``operator``'s node is jailed (slashed, not yet unjailed); False when it has no node."""
        return bool(self._call(self._contract.functions.isJailed(checksum(operator, param="operator"))))

    def stake_of(self, operator: str) -> Wei:
        """The bonded stake of ``operator`` in wei."""
        return Wei(self._call(self._contract.functions.stakeOf(checksum(operator, param="operator"))))

    def minimum_stake(self, role: Role) -> Wei:
        """The minimum stake of ``role`` in wei."""
        return Wei(self._call(self._contract.functions.minimumStake(int(role))))

    def unbonding_delay(self) -> int:
        """The unbonding delay in seconds."""
        return int(self._call(self._contract.functions.unbondingDelay()))

    def pending_withdrawal(self, account: str) -> Wei:
        """What ``account`` can withdraw now, in wei."""
        return Wei(self._call(self._contract.functions.pendingWithdrawal(checksum(account, param="account"))))

    def verification_window(self) -> int:
        """Seconds from an answer to the verifiers' verdict (the unbonding delay is at least this)."""
        return int(self._call(self._contract.functions.verificationWindow()))

    def has_role(self, role: bytes, account: str) -> bool:
        """Whether ``account`` holds ``role`` (32 bytes, e.g. :attr:`SLASHER_ROLE`)."""
        fn = self._contract.functions.hasRole(check_bytes32(role, "role"), checksum(account, param="account"))
        return bool(self._call(fn))

    def is_slasher(self, account: str) -> bool:
        """Whether ``account`` may slash."""
        return self.has_role(self.SLASHER_ROLE, account)

    def admin(self) -> ChecksumAddress | None:
        """The default admin (grants the slasher role), or None after it renounced."""
        value = checksum(self._call(self._contract.functions.defaultAdmin()))
        return None if int(value, 16) == 0 else value

    def owner(self) -> ChecksumAddress:
        """The default admin under OpenZeppelin's ``owner()`` name (zero address after a renounce)."""
        return checksum(self._call(self._contract.functions.owner()))

    def pending_admin(self) -> tuple[ChecksumAddress | None, int]:
        """The admin a transfer is waiting for and the Unix time from which it may accept; ``(None, 0)`` if none."""
        new_admin, schedule = self._call(self._contract.functions.pendingDefaultAdmin())
        address = checksum(new_admin)
        return (None, 0) if int(address, 16) == 0 else (address, int(schedule))

    def admin_transfer_delay(self) -> int:
        """Seconds between ``begin_admin_transfer`` and the earliest ``accept_admin_transfer``."""
        return int(self._call(self._contract.functions.defaultAdminDelay()))

    def treasury(self) -> ChecksumAddress:
        """The treasury account."""
        return checksum(self._call(self._contract.functions.treasury()))

    def treasury_balance(self) -> Wei:
        """Slashed funds not yet withdrawn, in wei."""
        return Wei(self._call(self._contract.functions.treasuryBalance()))

    def total_staked(self) -> Wei:
        """The sum of bonded stakes, in wei."""
        return Wei(self._call(self._contract.functions.totalStaked()))

    def total_pending_withdrawals(self) -> Wei:
        """The sum of pending withdrawals, in wei."""
        return Wei(self._call(self._contract.functions.totalPendingWithdrawals()))

    # -- writes ------------------------------------------------------------------------------------------------

    def register(
        self,
        *,
        role: Role,
        endpoint: str,
        x25519_public_key: bytes,
        model_id: ModelId | None,
        price_per_1k_tokens: int,
        stake: int,
    ) -> TxReceipt:
        """Register the signer's node with ``stake`` wei. Relays pass ``model_id=None``."""
        fn = self._contract.functions.register(
            int(Role(role)),
            endpoint,
            check_bytes32(x25519_public_key, "x25519_public_key"),
            _model_id_bytes32(model_id),
            check_uint(price_per_1k_tokens, "price"),
        )
        return self._send(fn, value=check_uint(stake, "stake"))

    def add_stake(self, amount: int) -> TxReceipt:
        """Add ``amount`` wei to the signer's stake."""
        return self._send(self._contract.functions.addStake(), value=check_uint(amount, "amount"))

    def update(self, *, endpoint: str, x25519_public_key: bytes, price_per_1k_tokens: int) -> TxReceipt:
        """Replace the signer's endpoint, X25519 key and price."""
        fn = self._contract.functions.update(
            endpoint, check_bytes32(x25519_public_key, "x25519_public_key"), check_uint(price_per_1k_tokens, "price")
        )
        return self._send(fn)

    def request_unbond(self) -> TxReceipt:
        """Stop being routed to and start the unbonding delay."""
        return self._send(self._contract.functions.requestUnbond())

    def deregister(self) -> TxReceipt:
        """After the delay: remove the node and credit its stake to pending withdrawals."""
        return self._send(self._contract.functions.deregister())

    def rebond(self) -> TxReceipt:
        """Cancel the signer's unbonding: bonded (and routable unless jailed or below the minimum) again."""
        return self._send(self._contract.functions.rebond())

    def unjail(self) -> TxReceipt:
        """Leave jail after a slash; the stake must be back at or above the role's minimum (``add_stake`` first)."""
        return self._send(self._contract.functions.unjail())

    def withdraw(self) -> TxReceipt:
        """Pull the signer's pending withdrawals."""
        return self._send(self._contract.functions.withdraw())

    def deregister_and_withdraw(self) -> WithdrawalReceipts:
        """Deregister the signer's node if it still exists, then withdraw: up to two transactions, each reported.

        If ``withdraw`` fails after ``deregister`` was mined, the raised error's ``completed`` holds the
        ``deregister`` receipt (that transaction happened: the stake now waits in the pending withdrawal).
        """
        signer = self._signer().address
        deregistered = self.deregister() if self.get_node(signer) is not None else None
        done = () if deregistered is None else (deregistered,)
        try:
            amount = self.pending_withdrawal(signer)
            withdrawn = self.withdraw()
        except ChainError as exc:
            exc.completed = (*exc.completed, *done)
            raise
        return WithdrawalReceipts(deregister=deregistered, withdraw=withdrawn, amount=amount)

    def slash(self, operator: str, amount: int, evidence_hash: bytes) -> TxReceipt:
        """Slash ``operator`` by up to ``amount`` wei and jail it (the signer must hold the slasher role).

        An operator without a node is skipped, not reverted: the receipt's events are ``("SlashSkipped",)``.
        """
        fn = self._contract.functions.slash(
            checksum(operator, param="operator"),
            check_uint(amount, "amount"),
            check_bytes32(evidence_hash, "evidence_hash"),
        )
        return self._send(fn)

    def grant_slasher(self, account: str) -> TxReceipt:
        """Let ``account`` slash (default admin only). Granting it again is a no-op transaction without events."""
        fn = self._contract.functions.grantRole(self.SLASHER_ROLE, checksum(account, param="slasher"))
        return self._send(fn)

    def revoke_slasher(self, account: str) -> TxReceipt:
        """Stop ``account`` from slashing (default admin only)."""
        fn = self._contract.functions.revokeRole(self.SLASHER_ROLE, checksum(account, param="slasher"))
        return self._send(fn)

    def begin_admin_transfer(self, new_admin: str) -> TxReceipt:
        """Step 1 of 2 of handing the admin role to ``new_admin`` (current admin only)."""
        fn = self._contract.functions.beginDefaultAdminTransfer(checksum(new_admin, param="new_admin"))
        return self._send(fn)

    def accept_admin_transfer(self) -> TxReceipt:
        """Step 2 of 2: the pending admin (the signer) takes the role, once the admin delay has passed."""
        return self._send(self._contract.functions.acceptDefaultAdminTransfer())

    def cancel_admin_transfer(self) -> TxReceipt:
        """Withdraw a pending admin transfer (current admin only)."""
        return self._send(self._contract.functions.cancelDefaultAdminTransfer())

    def withdraw_treasury(self) -> TxReceipt:
        """Pay the treasury balance to the treasury (treasury only)."""
        return self._send(self._contract.functions.withdrawTreasury())

    # -- internals ---------------------------------------------------------------------------------------------
