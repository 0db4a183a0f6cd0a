// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

import {AccessControlDefaultAdminRules} from
    "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {INodeRegistryView} from "./interfaces/INodeRegistryView.sol";

/// @title PaymentChannels
/// @notice Unidirectional payment channels from clients to model nodes, paid per request with off-chain EIP-712
/// vouchers for the cumulative amount owed, redeemed in one transaction for any number of requests (or channels),
/// with earnings locked for the verification window so that a slash can still take them.
///
/// A client opens a channel to a node with a deposit (and may top it up). With each request it signs
/// `Voucher(uint256 channelId,uint256 cumulativeAmount)` under this contract's EIP-712 domain
/// (name "PlanetServe PaymentChannels", version "1", the chain id, this address). The node redeems the latest
/// voucher whenever it likes: it is paid `cumulativeAmount - redeemed`, so a voucher can never pay twice and an
/// older one is worthless once a newer one is redeemed. The client may start closing; the node can still redeem
/// during `disputeDelay`; afterwards the client's unredeemed rest is credited back to it.
///
/// Locking: redeemed earnings go into one of two per-node buckets keyed by the epoch
/// `floor(block.timestamp / verificationWindow)`. A bucket of epoch `k` unlocks at `(k + 2) * verificationWindow`,
/// i.e. between one and two windows after the redeem, and is moved to the node's withdrawable balance lazily (on
/// its next redeem, withdraw or slash). At any moment only the current and the previous epoch can be locked, so two
/// buckets in one storage slot suffice: no array grows with the number of redeems.
/// @dev Money leaves only through `withdraw` (pull payment, nonReentrant, checks-effects-interactions).
/// Nothing loops over storage a caller can grow; `redeemBatch` loops over its calldata, at most `MAX_BATCH` items.
/// Invariant: address(this).balance == sum over unsettled channels of (deposit - redeemed)
///   + sum over nodes of both buckets + sum over accounts of withdrawable balances.
contract PaymentChannels is AccessControlDefaultAdminRules, EIP712, ReentrancyGuardTransient {
    /// @notice A channel as returned by `getChannel`.
    /// @dev Three storage slots: (client, deposit), (node, redeemed), (closesAt, settled). Amounts are uint96
    /// (2^96 wei is about 79 billion ether, far above the ether supply).
    /// @param client The paying account; it signs the vouchers and receives the refund.
    /// @param deposit Everything deposited so far, in wei.
    /// @param node The model node's operator; only it redeems.
    /// @param redeemed The cumulative amount already paid to the node, in wei.
    /// @param closesAt Zero while open; otherwise the time from which the node can no longer redeem.
    /// @param settled Whether the unredeemed rest was credited back to the client (the channel is over).
    struct Channel {
        address client;
        uint96 deposit;
        address node;
        uint96 redeemed;
        uint64 closesAt;
        bool settled;
    }

    /// @notice One voucher of a batch redemption.
    /// @param channelId The channel.
    /// @param cumulativeAmount The total amount owed on the channel, in wei.
    /// @param signature The client's 65-byte EIP-712 signature (r, s, v).
    struct SignedVoucher {
        uint256 channelId;
        uint256 cumulativeAmount;
        bytes signature;
    }

    /// @dev A node's two lock buckets in one slot; bucket `epoch % 2` holds the earnings redeemed in `epoch`.
    /// Epochs fit uint32 because block.timestamp < 2^32 until the year 2106 and the window is at least 1 s.
    struct Earnings {
        uint96 amount0;
        uint32 epoch0;
        uint96 amount1;
        uint32 epoch1;
    }

    /// @notice The role allowed to take locked earnings (the attestation contract).
    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");
    /// @notice The EIP-712 type hash of `Voucher(uint256 channelId,uint256 cumulativeAmount)`.
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(uint256 channelId,uint256 cumulativeAmount)");
    /// @notice The most vouchers one `redeemBatch` accepts.
    uint256 public constant MAX_BATCH = 64;

    INodeRegistryView private immutable _registry;
    address private immutable _treasury;
    uint64 private immutable _disputeDelay;
    uint64 private immutable _verificationWindow;

    mapping(uint256 channelId => Channel channel) private _channels;
    mapping(address node => Earnings earnings) private _earnings;
    mapping(address account => uint256 amount) private _withdrawable;
    uint256 private _nextChannelId = 1;

    /// @notice `client` opened channel `channelId` to `node` with `deposit` wei.
    /// @param channelId The new channel's id.
    /// @param client The paying account.
    /// @param node The model node's operator.
    /// @param deposit The initial deposit in wei.
    event ChannelOpened(uint256 indexed channelId, address indexed client, address indexed node, uint256 deposit);

    /// @notice The client added `amount` wei to channel `channelId`, bringing its deposit to `deposit`.
    /// @param channelId The channel.
    /// @param amount The added amount in wei.
    /// @param deposit The deposit after the top-up, in wei.
    event ChannelToppedUp(uint256 indexed channelId, uint256 amount, uint256 deposit);

    /// @notice The node redeemed a voucher for `cumulativeAmount` on `channelId` and was credited `paid` wei,
    /// locked until `unlocksAt`.
    /// @param channelId The channel.
    /// @param node The node's operator.
    /// @param cumulativeAmount The voucher's cumulative amount (now the channel's `redeemed`), in wei.
    /// @param paid The newly paid amount, in wei.
    /// @param unlocksAt When the paid amount becomes withdrawable (Unix seconds).
    event VoucherRedeemed(
        uint256 indexed channelId, address indexed node, uint256 cumulativeAmount, uint256 paid, uint64 unlocksAt
    );

    /// @notice `node`'s earnings of a past epoch (`amount` wei) passed their lock and became withdrawable.
    /// @param node The node's operator.
    /// @param amount The released amount in wei.
    event EarningsReleased(address indexed node, uint256 amount);

    /// @notice The client of `channelId` started closing it; the node may redeem until `closesAt`.
    /// @param channelId The channel.
    /// @param client The client.
    /// @param closesAt The end of the dispute delay (Unix seconds).
    event ChannelCloseStarted(uint256 indexed channelId, address indexed client, uint64 closesAt);

    /// @notice Channel `channelId` ended and its unredeemed `refund` was credited to `client`.
    /// @param channelId The channel.
    /// @param client The client.
    /// @param refund The amount credited to the client's withdrawable balance, in wei.
    event ChannelSettled(uint256 indexed channelId, address indexed client, uint256 refund);

    /// @notice `slasher` moved `amount` wei of `node`'s locked earnings to the treasury.
    /// @param node The slashed node's operator.
    /// @param slasher The caller holding `SLASHER_ROLE`.
    /// @param amount The amount taken, in wei (capped at what was locked).
    /// @param remainingLocked The node's earnings still locked afterwards, in wei.
    /// @param evidenceHash keccak256 of the off-chain evidence.
    event EarningsSlashed(
        address indexed node, address indexed slasher, uint256 amount, uint256 remainingLocked, bytes32 evidenceHash
    );

    /// @notice `account` withdrew `amount` wei.
    /// @param account The receiving account.
    /// @param amount The amount paid, in wei.
    event Withdrawn(address indexed account, uint256 amount);

    /// @notice A payable call carried no value, or a slash asked for zero.
    /// @param caller The caller.
    error PaymentChannelsZeroAmount(address caller);
    /// @notice A deposit would exceed the largest representable one.
    /// @param channelId The channel (zero when opening).
    /// @param deposit The deposit it would reach, in wei.
    /// @param maximum The largest deposit, in wei.
    error PaymentChannelsDepositTooLarge(uint256 channelId, uint256 deposit, uint256 maximum);
    /// @notice `node` cannot be paid through a channel (zero, or the client itself).
    /// @param node The rejected node address.
    error PaymentChannelsInvalidNode(address node);
    /// @notice No channel has id `channelId`.
    /// @param channelId The channel id.
    error PaymentChannelsUnknownChannel(uint256 channelId);
    /// @notice Only the channel's client may do this.
    /// @param channelId The channel.
    /// @param caller The caller.
    /// @param client The channel's client.
    error PaymentChannelsNotClient(uint256 channelId, address caller, address client);
    /// @notice Only the channel's node may redeem on it.
    /// @param channelId The channel.
    /// @param caller The caller.
    /// @param node The channel's node.
    error PaymentChannelsNotNode(uint256 channelId, address caller, address node);
    /// @notice The channel is already closing (no top-up, no second close).
    /// @param channelId The channel.
    /// @param closesAt The end of its dispute delay.
    error PaymentChannelsChannelClosing(uint256 channelId, uint64 closesAt);
    /// @notice The channel's dispute delay is over: the node can no longer redeem.
    /// @param channelId The channel.
    /// @param closesAt The end of its dispute delay.
    /// @param currentTime The current block timestamp.
    error PaymentChannelsChannelClosed(uint256 channelId, uint64 closesAt, uint256 currentTime);
    /// @notice The channel's client has not started closing it.
    /// @param channelId The channel.
    error PaymentChannelsCloseNotStarted(uint256 channelId);
    /// @notice The dispute delay has not elapsed yet.
    /// @param channelId The channel.
    /// @param closesAt The end of its dispute delay.
    /// @param currentTime The current block timestamp.
    error PaymentChannelsDisputeNotOver(uint256 channelId, uint64 closesAt, uint256 currentTime);
    /// @notice The channel was already settled.
    /// @param channelId The channel.
    error PaymentChannelsAlreadySettled(uint256 channelId);
    /// @notice The voucher is not signed by the channel's client (or its signature is malformed or malleated).
    /// @param channelId The channel.
    /// @param signer The recovered signer (zero when the signature is unusable).
    /// @param client The channel's client.
    error PaymentChannelsInvalidSignature(uint256 channelId, address signer, address client);
    /// @notice The voucher pays nothing new: its cumulative amount is not above what was already redeemed.
    /// @param channelId The channel.
    /// @param cumulativeAmount The voucher's amount, in wei.
    /// @param redeemed The channel's redeemed amount, in wei.
    error PaymentChannelsVoucherNotAboveRedeemed(uint256 channelId, uint256 cumulativeAmount, uint256 redeemed);
    /// @notice The voucher asks for more than the channel's deposit.
    /// @param channelId The channel.
    /// @param cumulativeAmount The voucher's amount, in wei.
    /// @param deposit The channel's deposit, in wei.
    error PaymentChannelsVoucherExceedsDeposit(uint256 channelId, uint256 cumulativeAmount, uint256 deposit);
    /// @notice `node` is jailed by the registry and may not redeem.
    /// @param node The node's operator.
    error PaymentChannelsNodeJailed(address node);
    /// @notice A batch must hold 1..`maxLength` vouchers.
    /// @param length The given number of vouchers.
    /// @param maxLength `MAX_BATCH`.
    error PaymentChannelsInvalidBatchSize(uint256 length, uint256 maxLength);
    /// @notice `account` has nothing to withdraw.
    /// @param account The caller.
    error PaymentChannelsNothingToWithdraw(address account);
    /// @notice Sending `amount` wei to `to` failed.
    /// @param to The recipient.
    /// @param amount The amount in wei.
    error PaymentChannelsTransferFailed(address to, uint256 amount);
    /// @notice A constructor argument is unusable (a zero address or a zero verification window).
    /// @param registry The registry given.
    /// @param treasury The treasury given.
    /// @param verificationWindow The verification window given, in seconds.
    error PaymentChannelsInvalidConfig(address registry, address treasury, uint64 verificationWindow);

    /// @notice Deploy the payment contract.
    /// @param admin The default admin (grants `SLASHER_ROLE`; transfer is two-step with `adminDelay`).
    /// @param adminDelay Seconds a default-admin transfer must wait.
    /// @param treasury_ Who receives slashed earnings (through `withdraw`).
    /// @param registry_ The registry consulted for jailed nodes.
    /// @param disputeDelay_ Seconds between a client's `startClose` and the end of the node's right to redeem.
    /// @param verificationWindow_ Seconds of one lock epoch (non-zero); earnings stay locked one to two of them.
    constructor(
        address admin,
        uint48 adminDelay,
        address treasury_,
        INodeRegistryView registry_,
        uint64 disputeDelay_,
        uint64 verificationWindow_
    ) AccessControlDefaultAdminRules(adminDelay, admin) EIP712("PlanetServe PaymentChannels", "1") {
        if (address(registry_) == address(0) || treasury_ == address(0) || verificationWindow_ == 0) {
            revert PaymentChannelsInvalidConfig(address(registry_), treasury_, verificationWindow_);
        }
        _registry = registry_;
        _treasury = treasury_;
        _disputeDelay = disputeDelay_;
        _verificationWindow = verificationWindow_;
    }

    // ---------------------------------------------------------------------------------------------- client

    /// @notice Open a channel from the caller to `node`, depositing `msg.value`.
    /// @dev Emits {ChannelOpened}. Channel ids count up from 1 and are never reused.
    /// @param node The model node's operator (not zero, not the caller).
    /// @return channelId The new channel's id.
    function open(address node) external payable returns (uint256 channelId) {
        if (node == address(0) || node == msg.sender) revert PaymentChannelsInvalidNode(node);
        if (msg.value == 0) revert PaymentChannelsZeroAmount(msg.sender);
        if (msg.value > type(uint96).max) revert PaymentChannelsDepositTooLarge(0, msg.value, type(uint96).max);
        channelId = _nextChannelId++;
        // The cast is exact: msg.value <= type(uint96).max was checked above.
        _channels[channelId] = Channel({
            client: msg.sender,
            deposit: uint96(msg.value),
            node: node,
            redeemed: 0,
            closesAt: 0,
            settled: false
        });
        emit ChannelOpened(channelId, msg.sender, node, msg.value);
    }

    /// @notice Add `msg.value` to the deposit of the caller's open channel `channelId`.
    /// @dev Emits {ChannelToppedUp}. Not allowed once closing has started.
    /// @param channelId The channel.
    function topUp(uint256 channelId) external payable {
        Channel storage channel = _clientChannel(channelId);
        if (channel.closesAt != 0) revert PaymentChannelsChannelClosing(channelId, channel.closesAt);
        if (msg.value == 0) revert PaymentChannelsZeroAmount(msg.sender);
        uint256 deposit = uint256(channel.deposit) + msg.value;
        if (deposit > type(uint96).max) revert PaymentChannelsDepositTooLarge(channelId, deposit, type(uint96).max);
        channel.deposit = uint96(deposit);
        emit ChannelToppedUp(channelId, msg.value, deposit);
    }

    /// @notice Start closing the caller's channel: the node may still redeem for `disputeDelay` seconds.
    /// @dev Emits {ChannelCloseStarted}.
    /// @param channelId The channel.
    function startClose(uint256 channelId) external {
        Channel storage channel = _clientChannel(channelId);
        if (channel.closesAt != 0) revert PaymentChannelsChannelClosing(channelId, channel.closesAt);
        uint64 closesAt = uint64(block.timestamp) + _disputeDelay;
        channel.closesAt = closesAt;
        emit ChannelCloseStarted(channelId, msg.sender, closesAt);
    }

    /// @notice After the dispute delay, end channel `channelId` and credit its unredeemed rest to the client.
    /// @dev Emits {ChannelSettled}. Anyone may call it (the refund always goes to the client). Pays nothing:
    /// the client calls `withdraw` next.
    /// @param channelId The channel.
    function finishClose(uint256 channelId) external {
        Channel storage channel = _channels[channelId];
        address client = channel.client;
        if (client == address(0)) revert PaymentChannelsUnknownChannel(channelId);
        uint64 closesAt = channel.closesAt;
        if (closesAt == 0) revert PaymentChannelsCloseNotStarted(channelId);
        if (block.timestamp < closesAt) revert PaymentChannelsDisputeNotOver(channelId, closesAt, block.timestamp);
        if (channel.settled) revert PaymentChannelsAlreadySettled(channelId);
        uint256 refund = uint256(channel.deposit) - channel.redeemed;
        channel.settled = true;
        _withdrawable[client] += refund;
        emit ChannelSettled(channelId, client, refund);
    }

    // ------------------------------------------------------------------------------------------------ node

    /// @notice Redeem the latest voucher of one channel: the caller (its node) is paid
    /// `cumulativeAmount - redeemed`, locked for the verification window.
    /// @dev Emits {VoucherRedeemed}, and {EarningsReleased} when an older lock bucket is recycled.
    /// @param channelId The channel.
    /// @param cumulativeAmount The voucher's cumulative amount, in wei (above `redeemed`, at most `deposit`).
    /// @param signature The client's 65-byte EIP-712 signature.
    function redeem(uint256 channelId, uint256 cumulativeAmount, bytes calldata signature) external {
        _checkNotJailed(msg.sender);
        uint256 epoch = block.timestamp / _verificationWindow;
        uint64 unlocksAt = _unlockTime(epoch);
        uint256 paid = _redeem(channelId, cumulativeAmount, signature, unlocksAt);
        _lock(msg.sender, paid, epoch);
    }

    /// @notice Redeem one voucher on each of several channels of the caller in one transaction.
    /// @dev Emits {VoucherRedeemed} per voucher. All or nothing: one invalid voucher reverts the batch (check
    /// it with an `eth_call` first). A channel may appear more than once if its amounts increase.
    /// @param vouchers 1..MAX_BATCH signed vouchers.
    function redeemBatch(SignedVoucher[] calldata vouchers) external {
        uint256 length = vouchers.length;
        if (length == 0 || length > MAX_BATCH) revert PaymentChannelsInvalidBatchSize(length, MAX_BATCH);
        _checkNotJailed(msg.sender);
        uint256 epoch = block.timestamp / _verificationWindow;
        uint64 unlocksAt = _unlockTime(epoch);
        uint256 total;
        for (uint256 i; i < length; ++i) {
            SignedVoucher calldata voucher = vouchers[i];
            total += _redeem(voucher.channelId, voucher.cumulativeAmount, voucher.signature, unlocksAt);
        }
        _lock(msg.sender, total, epoch);
    }

    /// @notice Pay the caller everything it may withdraw: released earnings, refunds, or (treasury) slashes.
    /// @dev Emits {EarningsReleased} when locks expired since the last update, then {Withdrawn}. Pull payment:
    /// effects before the transfer, guarded against reentrancy.
    function withdraw() external nonReentrant {
        Earnings memory earnings = _earnings[msg.sender];
        uint256 released = _release(earnings, block.timestamp / _verificationWindow);
        if (released != 0) _earnings[msg.sender] = earnings;
        uint256 amount = _withdrawable[msg.sender] + released;
        if (amount == 0) revert PaymentChannelsNothingToWithdraw(msg.sender);
        _withdrawable[msg.sender] = 0;
        if (released != 0) emit EarningsReleased(msg.sender, released);
        emit Withdrawn(msg.sender, amount);
        (bool ok,) = payable(msg.sender).call{value: amount}("");
        if (!ok) revert PaymentChannelsTransferFailed(msg.sender, amount);
    }

    // --------------------------------------------------------------------------------------------- slasher

    /// @notice Take up to `amount` wei of `node`'s still-locked earnings into the treasury's balance.
    /// @dev Emits {EarningsReleased} when locks had expired (those are no longer slashable), then
    /// {EarningsSlashed}. Only `SLASHER_ROLE`. Capped at what is locked, so a quorum never reverts; may take 0.
    /// @param node The node's operator.
    /// @param amount The requested amount in wei (non-zero).
    /// @param evidenceHash keccak256 of the off-chain evidence.
    /// @return slashed The amount actually taken, in wei.
    function slash(address node, uint256 amount, bytes32 evidenceHash)
        external
        onlyRole(SLASHER_ROLE)
        returns (uint256 slashed)
    {
        if (amount == 0) revert PaymentChannelsZeroAmount(msg.sender);
        Earnings memory earnings = _earnings[node];
        uint256 released = _release(earnings, block.timestamp / _verificationWindow);
        // Whatever is left in a bucket is locked; take from bucket 0 first, then bucket 1.
        uint256 take0 = amount < earnings.amount0 ? amount : earnings.amount0;
        uint256 rest = amount - take0;
        uint256 take1 = rest < earnings.amount1 ? rest : earnings.amount1;
        // Both takes are at most their bucket's uint96 amount, so the casts and subtractions are exact.
        earnings.amount0 -= uint96(take0);
        earnings.amount1 -= uint96(take1);
        slashed = take0 + take1;
        _earnings[node] = earnings;
        if (released != 0) {
            _withdrawable[node] += released;
            emit EarningsReleased(node, released);
        }
        _withdrawable[_treasury] += slashed;
        emit EarningsSlashed(node, msg.sender, slashed, uint256(earnings.amount0) + earnings.amount1, evidenceHash);
    }

    // ----------------------------------------------------------------------------------------------- views

    /// @notice Channel `channelId` (all zero when it does not exist).
    /// @param channelId The channel.
    /// @return The channel.
    function getChannel(uint256 channelId) external view returns (Channel memory) {
        return _channels[channelId];
    }

    /// @notice What `account` has on this contract now: locked earnings, what it may withdraw, and when the
    /// last locked bucket unlocks.
    /// @param account A node, client or the treasury.
    /// @return locked Earnings still locked (slashable), in wei.
    /// @return withdrawable What `withdraw` would pay now, in wei.
    /// @return lockedUntil When all currently locked earnings are released (0 when nothing is locked).
    function balancesOf(address account)
        external
        view
        returns (uint256 locked, uint256 withdrawable, uint64 lockedUntil)
    {
        Earnings memory earnings = _earnings[account];
        uint256 epoch = block.timestamp / _verificationWindow;
        uint256 released = _release(earnings, epoch);
        locked = uint256(earnings.amount0) + earnings.amount1;
        withdrawable = _withdrawable[account] + released;
        if (earnings.amount0 != 0) lockedUntil = _unlockTime(earnings.epoch0);
        if (earnings.amount1 != 0 && _unlockTime(earnings.epoch1) > lockedUntil) {
            lockedUntil = _unlockTime(earnings.epoch1);
        }
    }

    /// @notice The EIP-712 digest a client signs for `(channelId, cumulativeAmount)` on this contract.
    /// @param channelId The channel.
    /// @param cumulativeAmount The cumulative amount, in wei.
    /// @return The digest.
    function voucherDigest(uint256 channelId, uint256 cumulativeAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, cumulativeAmount)));
    }

    /// @notice The signer of a voucher as `redeem` sees it; zero for a malformed or malleated (high-s) signature.
    /// @param channelId The channel.
    /// @param cumulativeAmount The cumulative amount, in wei.
    /// @param signature The 65-byte signature.
    /// @return signer The recovered address, or zero.
    function voucherSigner(uint256 channelId, uint256 cumulativeAmount, bytes calldata signature)
        external
        view
        returns (address signer)
    {
        (address recovered, ECDSA.RecoverError err,) =
            ECDSA.tryRecoverCalldata(voucherDigest(channelId, cumulativeAmount), signature);
        signer = err == ECDSA.RecoverError.NoError ? recovered : address(0);
    }

    /// @notice The EIP-712 domain separator of this contract.
    /// @return The separator.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @notice The id the next opened channel gets.
    /// @return The id.
    function nextChannelId() external view returns (uint256) {
        return _nextChannelId;
    }

    /// @notice The registry consulted for jailed nodes.
    /// @return The registry.
    function registry() external view returns (INodeRegistryView) {
        return _registry;
    }

    /// @notice The account that receives slashed earnings.
    /// @return The treasury.
    function treasury() external view returns (address) {
        return _treasury;
    }

    /// @notice Seconds from `startClose` until the node can no longer redeem.
    /// @return The delay.
    function disputeDelay() external view returns (uint64) {
        return _disputeDelay;
    }

    /// @notice Seconds of one lock epoch; earnings stay locked between one and two of them.
    /// @return The window.
    function verificationWindow() external view returns (uint64) {
        return _verificationWindow;
    }

    // ------------------------------------------------------------------------------------------- internals

    /// @dev The caller's channel `channelId`; reverts when unknown or not the caller's.
    function _clientChannel(uint256 channelId) private view returns (Channel storage channel) {
        channel = _channels[channelId];
        address client = channel.client;
        if (client == address(0)) revert PaymentChannelsUnknownChannel(channelId);
        if (client != msg.sender) revert PaymentChannelsNotClient(channelId, msg.sender, client);
    }

    /// @dev Reverts when the registry has jailed `node`.
    function _checkNotJailed(address node) private view {
        if (_registry.isJailed(node)) revert PaymentChannelsNodeJailed(node);
    }

    /// @dev Check one voucher of the caller's channel and advance its `redeemed`; returns the newly paid amount.
    function _redeem(uint256 channelId, uint256 cumulativeAmount, bytes calldata signature, uint64 unlocksAt)
        private
        returns (uint256 paid)
    {
        Channel storage channel = _channels[channelId];
        address node = channel.node;
        if (node != msg.sender) {
            if (node == address(0)) revert PaymentChannelsUnknownChannel(channelId);
            revert PaymentChannelsNotNode(channelId, msg.sender, node);
        }
        // A settled channel has closesAt in the past, so this also refuses settled channels.
        uint64 closesAt = channel.closesAt;
        if (closesAt != 0 && block.timestamp >= closesAt) {
            revert PaymentChannelsChannelClosed(channelId, closesAt, block.timestamp);
        }
        uint256 redeemed = channel.redeemed;
        if (cumulativeAmount <= redeemed) {
            revert PaymentChannelsVoucherNotAboveRedeemed(channelId, cumulativeAmount, redeemed);
        }
        uint256 deposit = channel.deposit;
        if (cumulativeAmount > deposit) revert PaymentChannelsVoucherExceedsDeposit(channelId, cumulativeAmount, deposit);
        address client = channel.client;
        (address signer, ECDSA.RecoverError err,) =
            ECDSA.tryRecoverCalldata(voucherDigest(channelId, cumulativeAmount), signature);
        if (err != ECDSA.RecoverError.NoError || signer != client) {
            revert PaymentChannelsInvalidSignature(channelId, signer, client);
        }
        // The cast is exact: cumulativeAmount <= deposit, a uint96.
        channel.redeemed = uint96(cumulativeAmount);
        paid = cumulativeAmount - redeemed;
        emit VoucherRedeemed(channelId, node, cumulativeAmount, paid, unlocksAt);
    }

    /// @dev Add `amount` to `node`'s bucket of `epoch`, first recycling buckets whose lock has expired.
    function _lock(address node, uint256 amount, uint256 epoch) private {
        Earnings memory earnings = _earnings[node];
        uint256 released = _release(earnings, epoch);
        // After _release a non-empty bucket of the same parity holds this very epoch (an older one of the same
        // parity is at least two epochs old, hence released), so adding to it keeps one epoch per bucket.
        // Sums stay below 2^96: they are bounded by the ether held here. Epoch fits uint32 (see Earnings).
        if (epoch % 2 == 0) {
            earnings.amount0 += _toUint96(amount);
            earnings.epoch0 = uint32(epoch);
        } else {
            earnings.amount1 += _toUint96(amount);
            earnings.epoch1 = uint32(epoch);
        }
        _earnings[node] = earnings;
        if (released != 0) {
            _withdrawable[node] += released;
            emit EarningsReleased(node, released);
        }
    }

    /// @dev Empty every bucket of `earnings` (in memory) whose lock has expired at `epoch`; returns their sum.
    function _release(Earnings memory earnings, uint256 epoch) private pure returns (uint256 released) {
        if (earnings.amount0 != 0 && uint256(earnings.epoch0) + 2 <= epoch) {
            released = earnings.amount0;
            earnings.amount0 = 0;
        }
        if (earnings.amount1 != 0 && uint256(earnings.epoch1) + 2 <= epoch) {
            released += earnings.amount1;
            earnings.amount1 = 0;
        }
    }

    /// @dev When earnings locked in `epoch` are released.
    function _unlockTime(uint256 epoch) private view returns (uint64) {
        return uint64((epoch + 2) * _verificationWindow);
    }

    /// @dev `value` as uint96; a batch total above it would need more ether than exists, but check anyway.
    function _toUint96(uint256 value) private pure returns (uint96) {
        if (value > type(uint96).max) revert PaymentChannelsDepositTooLarge(0, value, type(uint96).max);
        return uint96(value);
    }
}
