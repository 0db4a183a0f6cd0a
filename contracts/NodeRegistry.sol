// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

import {AccessControlDefaultAdminRules} from "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {INodeSlasher} from "./interfaces/INodeSlasher.sol";

/// @title NodeRegistry
/// @notice PlanetServe's membership and staking registry: the only source of truth for who may be routed to.
/// An operator registers one node (role, endpoint, X25519 onion key, model id, price) with a stake of at least
/// its role's minimum, may add stake and update its endpoint/key/price, and leaves by requesting unbonding,
/// waiting `unbondingDelay` seconds (during which it is not routed to but can still be slashed), deregistering
/// (which credits its stake to a pull-payment balance) and withdrawing. An unbonding operator may change its mind
/// (`rebond`). Holders of `SLASHER_ROLE` (the attestation contract, the payment-channel contract) slash stake into
/// the treasury; a slashed node is jailed (not routed to) until its operator calls `unjail` with its stake back at
/// or above the minimum.
/// @dev Roles: OpenZeppelin `AccessControlDefaultAdminRules`. The default admin grants and revokes `SLASHER_ROLE`
/// and is handed over in two steps (`beginDefaultAdminTransfer`, then `acceptDefaultAdminTransfer` by the new admin
/// after the admin delay), so a typo cannot give the registry away. The admin cannot touch stakes or slash.
/// Money leaves only through `withdraw` and `withdrawTreasury` (pull payments, nonReentrant, CEI).
/// Nothing loops over caller-growable data: enumeration is done off chain by the indexer from events.
/// Invariant: address(this).balance == totalStaked + totalPendingWithdrawals + treasuryBalance.
contract NodeRegistry is INodeSlasher, AccessControlDefaultAdminRules, ReentrancyGuardTransient {
    /// @notice The role a node plays in the network.
    enum Role {
        Model,
        Relay,
        Verifier
    }

    /// @notice A registered node as returned by `getNode`.
    /// @dev Field order packs `registeredAt`, `unbondingEndsAt`, `role` and `jailed` into one storage slot.
    /// @param stake The bonded stake in wei.
    /// @param x25519PublicKey The raw 32-byte X25519 public key used for onion encryption.
    /// @param modelId keccak256 of `name@revision` for model and verifier nodes, zero for relays.
    /// @param pricePer1kTokens The price in wei per 1000 tokens.
    /// @param registeredAt The block timestamp of registration.
    /// @param unbondingEndsAt Zero while bonded; otherwise the timestamp from which `deregister` succeeds.
    /// @param role The node's role.
    /// @param jailed True from a slash until the operator's `unjail`: a jailed node is not routed to.
    /// @param endpoint The node's public URL.
    struct Node {
        uint256 stake;
        bytes32 x25519PublicKey;
        bytes32 modelId;
        uint256 pricePer1kTokens;
        uint64 registeredAt;
        uint64 unbondingEndsAt;
        Role role;
        bool jailed;
        string endpoint;
    }

    /// @notice The longest accepted endpoint, in bytes.
    uint256 public constant MAX_ENDPOINT_LENGTH = 256;
    /// @notice The longest accepted unbonding delay, in seconds (365 days): a longer one is a unit mistake
    /// (milliseconds for seconds) that would lock every stake for years.
    uint64 public constant MAX_UNBONDING_DELAY = 365 days;
    /// @notice The role allowed to `slash`; several contracts may hold it. Its admin is the default admin.
    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");

    uint256 private immutable _minimumStakeModel;
    uint256 private immutable _minimumStakeRelay;
    uint256 private immutable _minimumStakeVerifier;
    uint64 private immutable _unbondingDelay;
    uint64 private immutable _verificationWindow;
    address private immutable _treasury;

    mapping(address operator => Node node) private _nodes;
    mapping(address account => uint256 amount) private _pendingWithdrawals;
    uint256 private _totalStaked;
    uint256 private _totalPendingWithdrawals;
    uint256 private _treasuryBalance;

    /// @notice `operator` registered a node.
    /// @param operator The node operator (the registering account).
    /// @param role The node's role.
    /// @param modelId The model id (zero for relays).
    /// @param endpoint The node's public URL.
    /// @param x25519PublicKey The node's raw X25519 public key.
    /// @param pricePer1kTokens The price in wei per 1000 tokens.
    /// @param stake The initial stake in wei.
    event NodeRegistered(
        address indexed operator,
        Role indexed role,
        bytes32 indexed modelId,
        string endpoint,
        bytes32 x25519PublicKey,
        uint256 pricePer1kTokens,
        uint256 stake
    );

    /// @notice `operator` added `amount` wei, bringing its stake to `newStake`.
    /// @param operator The node operator.
    /// @param amount The added amount in wei.
    /// @param newStake The stake after the addition, in wei.
    event StakeAdded(address indexed operator, uint256 amount, uint256 newStake);

    /// @notice `operator` changed its endpoint, key or price (the new values are all given).
    /// @param operator The node operator.
    /// @param endpoint The new endpoint.
    /// @param x25519PublicKey The new X25519 public key.
    /// @param pricePer1kTokens The new price in wei per 1000 tokens.
    event NodeUpdated(address indexed operator, string endpoint, bytes32 x25519PublicKey, uint256 pricePer1kTokens);

    /// @notice `operator` stopped being routed to; its `stake` is released from `unbondingEndsAt`.
    /// @param operator The node operator.
    /// @param stake The stake at the time of the request, in wei.
    /// @param unbondingEndsAt The timestamp from which `deregister` succeeds.
    event UnbondingRequested(address indexed operator, uint256 stake, uint64 unbondingEndsAt);

    /// @notice `operator`'s node was removed and `releasedStake` wei credited to its pending withdrawals.
    /// @param operator The former node operator.
    /// @param releasedStake The stake credited for withdrawal, in wei.
    event NodeDeregistered(address indexed operator, uint256 releasedStake);

    /// @notice `account` withdrew `amount` wei of pending withdrawals.
    /// @param account The receiving account.
    /// @param amount The amount paid, in wei.
    event Withdrawn(address indexed account, uint256 amount);

    /// @notice `slasher` moved `amount` wei of `operator`'s stake to the treasury.
    /// @param operator The slashed operator.
    /// @param slasher The slashing contract (a `SLASHER_ROLE` holder).
    /// @param amount The amount slashed, in wei (capped at the stake).
    /// @param remainingStake The stake left, in wei.
    /// @param evidenceHash keccak256 of the off-chain evidence.
    event NodeSlashed(
        address indexed operator, address indexed slasher, uint256 amount, uint256 remainingStake, bytes32 evidenceHash
    );

    /// @notice `slasher` asked to slash `operator`, which has no node (never registered or already deregistered):
    /// nothing was taken. Emitted instead of reverting so that a batch of slashes never fails on one stale entry.
    /// @param operator The operator named in the call.
    /// @param slasher The slashing contract.
    /// @param requestedAmount The amount asked for, in wei.
    /// @param evidenceHash keccak256 of the off-chain evidence.
    event SlashSkipped(address indexed operator, address indexed slasher, uint256 requestedAmount, bytes32 evidenceHash);

    /// @notice `operator`'s node was jailed by a slash: it is not routed to until its operator calls `unjail`.
    /// @param operator The jailed operator.
    /// @param slasher The slashing contract.
    /// @param evidenceHash keccak256 of the off-chain evidence of the slash that jailed it.
    event NodeJailed(address indexed operator, address indexed slasher, bytes32 evidenceHash);

    /// @notice `operator` left jail (its stake was at or above its role's minimum).
    /// @param operator The operator.
    /// @param stake Its stake at that moment, in wei.
    event NodeUnjailed(address indexed operator, uint256 stake);

    /// @notice `operator` cancelled its unbonding and is bonded again.
    /// @param operator The operator.
    /// @param stake Its stake, in wei.
    /// @param cancelledUnbondingEndsAt When the cancelled unbonding would have ended.
    event UnbondingCancelled(address indexed operator, uint256 stake, uint64 cancelledUnbondingEndsAt);

    /// @notice The treasury withdrew `amount` wei of slashed funds.
    /// @param treasury The treasury account.
    /// @param amount The amount paid, in wei.
    event TreasuryWithdrawn(address indexed treasury, uint256 amount);

    /// @notice `operator` already has a node registered.
    /// @param operator The operator.
    error NodeRegistryAlreadyRegistered(address operator);
    /// @notice `operator` has no node registered.
    /// @param operator The operator.
    error NodeRegistryNotRegistered(address operator);
    /// @notice `stake` is below the `minimum` for `role`.
    /// @param operator The operator.
    /// @param role The node's role.
    /// @param stake The offered stake in wei.
    /// @param minimum The role's minimum in wei.
    error NodeRegistryStakeBelowMinimum(address operator, Role role, uint256 stake, uint256 minimum);
    /// @notice The endpoint is empty or longer than `maxLength` bytes.
    /// @param length The endpoint length in bytes.
    /// @param maxLength The longest accepted endpoint.
    error NodeRegistryInvalidEndpoint(uint256 length, uint256 maxLength);
    /// @notice The X25519 public key is zero.
    /// @param x25519PublicKey The rejected key.
    error NodeRegistryInvalidPublicKey(bytes32 x25519PublicKey);
    /// @notice Model and verifier nodes need a non-zero model id; relays must give zero.
    /// @param role The node's role.
    /// @param modelId The rejected model id.
    error NodeRegistryInvalidModelId(Role role, bytes32 modelId);
    /// @notice A payable call carried no value.
    /// @param operator The caller.
    error NodeRegistryZeroAmount(address operator);
    /// @notice `operator` is unbonding, which forbids this call.
    /// @param operator The operator.
    /// @param unbondingEndsAt When its unbonding ends.
    error NodeRegistryNodeUnbonding(address operator, uint64 unbondingEndsAt);
    /// @notice `operator` has not requested unbonding.
    /// @param operator The operator.
    error NodeRegistryNotUnbonding(address operator);
    /// @notice The unbonding delay has not elapsed yet.
    /// @param operator The operator.
    /// @param unbondingEndsAt When it ends.
    /// @param currentTime The current block timestamp.
    error NodeRegistryUnbondingNotFinished(address operator, uint64 unbondingEndsAt, uint256 currentTime);
    /// @notice `account` has nothing to withdraw.
    /// @param account The caller.
    error NodeRegistryNothingToWithdraw(address account);
    /// @notice Sending `amount` wei to `to` failed.
    /// @param to The recipient.
    /// @param amount The amount in wei.
    error NodeRegistryTransferFailed(address to, uint256 amount);
    /// @notice `operator`'s node is not jailed, so there is nothing to unjail.
    /// @param operator The operator.
    error NodeRegistryNotJailed(address operator);
    /// @notice `caller` is not the treasury.
    /// @param caller The caller.
    error NodeRegistryUnauthorizedTreasury(address caller);
    /// @notice A constructor argument is unusable (the treasury is zero).
    /// @param treasury The rejected treasury.
    error NodeRegistryInvalidTreasury(address treasury);
    /// @notice A constructor argument is unusable: `role`'s minimum stake is zero (a free identity would make
    /// Sybil relays and slashing meaningless).
    /// @param role The role.
    /// @param minimum The rejected minimum, in wei.
    error NodeRegistryInvalidMinimumStake(Role role, uint256 minimum);
    /// @notice A constructor argument is unusable: the verification window is zero.
    /// @param verificationWindow The rejected window, in seconds.
    error NodeRegistryInvalidVerificationWindow(uint64 verificationWindow);
    /// @notice A constructor argument is unusable: the unbonding delay is shorter than the verification window, so
    /// a node could leave with its stake before a verdict on its last answers.
    /// @param unbondingDelay The rejected delay, in seconds.
    /// @param verificationWindow The verification window, in seconds.
    error NodeRegistryUnbondingDelayTooShort(uint64 unbondingDelay, uint64 verificationWindow);
    /// @notice A constructor argument is unusable: the unbonding delay exceeds `maxUnbondingDelay`.
    /// @param unbondingDelay The rejected delay, in seconds.
    /// @param maxUnbondingDelay The longest accepted delay, in seconds.
    error NodeRegistryUnbondingDelayTooLong(uint64 unbondingDelay, uint64 maxUnbondingDelay);

    /// @notice Deploy a registry with fixed parameters; every bound is checked here, once.
    /// @dev Emits OpenZeppelin's {RoleGranted} for the default admin. Grants no `SLASHER_ROLE`: the admin grants it
    /// to the attestation and payment contracts once they are deployed with this registry's address.
    /// @param initialAdmin The default admin: grants and revokes `SLASHER_ROLE` (non-zero).
    /// @param adminTransferDelay Seconds a new default admin must wait before accepting a transfer.
    /// @param treasury_ The account that withdraws slashed funds (non-zero).
    /// @param minimumStakeModel_ The minimum stake of a model node, in wei (non-zero).
    /// @param minimumStakeRelay_ The minimum stake of a relay, in wei (non-zero).
    /// @param minimumStakeVerifier_ The minimum stake of a verifier, in wei (non-zero).
    /// @param verificationWindow_ Seconds from an answer to the verifiers' verdict on it (non-zero).
    /// @param unbondingDelay_ The unbonding delay in seconds, in [verificationWindow_, MAX_UNBONDING_DELAY].
    constructor(
        address initialAdmin,
        uint48 adminTransferDelay,
        address treasury_,
        uint256 minimumStakeModel_,
        uint256 minimumStakeRelay_,
        uint256 minimumStakeVerifier_,
        uint64 verificationWindow_,
        uint64 unbondingDelay_
    ) AccessControlDefaultAdminRules(adminTransferDelay, initialAdmin) {
        if (treasury_ == address(0)) revert NodeRegistryInvalidTreasury(treasury_);
        if (minimumStakeModel_ == 0) revert NodeRegistryInvalidMinimumStake(Role.Model, minimumStakeModel_);
        if (minimumStakeRelay_ == 0) revert NodeRegistryInvalidMinimumStake(Role.Relay, minimumStakeRelay_);
        if (minimumStakeVerifier_ == 0) revert NodeRegistryInvalidMinimumStake(Role.Verifier, minimumStakeVerifier_);
        if (verificationWindow_ == 0) revert NodeRegistryInvalidVerificationWindow(verificationWindow_);
        if (unbondingDelay_ < verificationWindow_) {
            revert NodeRegistryUnbondingDelayTooShort(unbondingDelay_, verificationWindow_);
        }
        if (unbondingDelay_ > MAX_UNBONDING_DELAY) {
            revert NodeRegistryUnbondingDelayTooLong(unbondingDelay_, MAX_UNBONDING_DELAY);
        }
        _treasury = treasury_;
        _minimumStakeModel = minimumStakeModel_;
        _minimumStakeRelay = minimumStakeRelay_;
        _minimumStakeVerifier = minimumStakeVerifier_;
        _verificationWindow = verificationWindow_;
        _unbondingDelay = unbondingDelay_;
    }

    /// @notice Register the caller's node, bonding `msg.value` as its stake.
    /// @dev Emits {NodeRegistered}.
    /// @param role The node's role.
    /// @param endpoint The node's public URL (1..MAX_ENDPOINT_LENGTH bytes).
    /// @param x25519PublicKey The node's raw X25519 public key (non-zero).
    /// @param modelId keccak256 of `name@revision` (non-zero for model and verifier nodes, zero for relays).
    /// @param pricePer1kTokens The price in wei per 1000 tokens.
    function register(
        Role role,
        string calldata endpoint,
        bytes32 x25519PublicKey,
        bytes32 modelId,
        uint256 pricePer1kTokens
    ) external payable {
        if (_nodes[msg.sender].registeredAt != 0) revert NodeRegistryAlreadyRegistered(msg.sender);
        _checkEndpoint(endpoint);
        if (x25519PublicKey == bytes32(0)) revert NodeRegistryInvalidPublicKey(x25519PublicKey);
        if ((role == Role.Relay) != (modelId == bytes32(0))) revert NodeRegistryInvalidModelId(role, modelId);
        uint256 minimum = minimumStake(role);
        if (msg.value < minimum) revert NodeRegistryStakeBelowMinimum(msg.sender, role, msg.value, minimum);

        _nodes[msg.sender] = Node({
            stake: msg.value,
            x25519PublicKey: x25519PublicKey,
            modelId: modelId,
            pricePer1kTokens: pricePer1kTokens,
            registeredAt: uint64(block.timestamp),
            unbondingEndsAt: 0,
            role: role,
            jailed: false,
            endpoint: endpoint
        });
        _totalStaked += msg.value;
        emit NodeRegistered(msg.sender, role, modelId, endpoint, x25519PublicKey, pricePer1kTokens, msg.value);
    }

    /// @notice Add `msg.value` to the caller's stake (e.g. to get back above the minimum after a slash, then
    /// `unjail`).
    /// @dev Emits {StakeAdded}. Not allowed while unbonding (`rebond` first). Allowed while jailed.
    function addStake() external payable {
        Node storage node = _bondedNode(msg.sender);
        if (msg.value == 0) revert NodeRegistryZeroAmount(msg.sender);
        uint256 newStake = node.stake + msg.value;
        node.stake = newStake;
        _totalStaked += msg.value;
        emit StakeAdded(msg.sender, msg.value, newStake);
    }

    /// @notice Replace the caller's endpoint, X25519 key and price. The model id cannot change: re-register.
    /// @dev Emits {NodeUpdated}. Not allowed while unbonding.
    /// @param endpoint The new public URL.
    /// @param x25519PublicKey The new raw X25519 public key (non-zero).
    /// @param pricePer1kTokens The new price in wei per 1000 tokens.
    function update(string calldata endpoint, bytes32 x25519PublicKey, uint256 pricePer1kTokens) external {
        Node storage node = _bondedNode(msg.sender);
        _checkEndpoint(endpoint);
        if (x25519PublicKey == bytes32(0)) revert NodeRegistryInvalidPublicKey(x25519PublicKey);
        node.endpoint = endpoint;
        node.x25519PublicKey = x25519PublicKey;
        node.pricePer1kTokens = pricePer1kTokens;
        emit NodeUpdated(msg.sender, endpoint, x25519PublicKey, pricePer1kTokens);
    }

    /// @notice Stop being routed to and start the unbonding delay. The stake stays slashable until deregistered.
    /// @dev Emits {UnbondingRequested}.
    function requestUnbond() external {
        Node storage node = _bondedNode(msg.sender);
        uint64 endsAt = uint64(block.timestamp) + _unbondingDelay;
        node.unbondingEndsAt = endsAt;
        emit UnbondingRequested(msg.sender, node.stake, endsAt);
    }

    /// @notice Cancel the caller's unbonding: the node is bonded again (routable if not jailed and at or above its
    /// minimum). Allowed even after the delay has passed, as long as the node was not deregistered.
    /// @dev Emits {UnbondingCancelled}.
    function rebond() external {
        Node storage node = _nodes[msg.sender];
        if (node.registeredAt == 0) revert NodeRegistryNotRegistered(msg.sender);
        uint64 endsAt = node.unbondingEndsAt;
        if (endsAt == 0) revert NodeRegistryNotUnbonding(msg.sender);
        node.unbondingEndsAt = 0;
        emit UnbondingCancelled(msg.sender, node.stake, endsAt);
    }

    /// @notice Leave jail: the caller's node becomes routable again.
    /// @dev Emits {NodeUnjailed}. Needs a bonded (not unbonding) node whose stake is at or above its role's minimum;
    /// top up with `addStake` first after a large slash.
    /// NOTE: leaving jail is the operator's explicit act (it fixed what was wrong and put the stake back), never
    /// automatic; the reputation the attestation contract keeps is unaffected.
    function unjail() external {
        Node storage node = _bondedNode(msg.sender);
        if (!node.jailed) revert NodeRegistryNotJailed(msg.sender);
        uint256 stake = node.stake;
        uint256 minimum = minimumStake(node.role);
        if (stake < minimum) revert NodeRegistryStakeBelowMinimum(msg.sender, node.role, stake, minimum);
        node.jailed = false;
        emit NodeUnjailed(msg.sender, stake);
    }

    /// @notice After the unbonding delay, remove the caller's node and credit its stake to pending withdrawals.
    /// @dev Emits {NodeDeregistered}. Pays nothing: call `withdraw` next.
    function deregister() external {
        Node storage node = _nodes[msg.sender];
        if (node.registeredAt == 0) revert NodeRegistryNotRegistered(msg.sender);
        uint64 endsAt = node.unbondingEndsAt;
        if (endsAt == 0) revert NodeRegistryNotUnbonding(msg.sender);
        if (block.timestamp < endsAt) revert NodeRegistryUnbondingNotFinished(msg.sender, endsAt, block.timestamp);

        uint256 released = node.stake;
        delete _nodes[msg.sender];
        _totalStaked -= released;
        _pendingWithdrawals[msg.sender] += released;
        _totalPendingWithdrawals += released;
        emit NodeDeregistered(msg.sender, released);
    }

    /// @notice Pay the caller its whole pending-withdrawal balance.
    /// @dev Emits {Withdrawn}. Pull payment: effects before the transfer, guarded against reentrancy.
    function withdraw() external nonReentrant {
        uint256 amount = _pendingWithdrawals[msg.sender];
        if (amount == 0) revert NodeRegistryNothingToWithdraw(msg.sender);
        _pendingWithdrawals[msg.sender] = 0;
        _totalPendingWithdrawals -= amount;
        emit Withdrawn(msg.sender, amount);
        _send(msg.sender, amount);
    }

    /// @inheritdoc INodeSlasher
    /// @dev Emits {NodeSlashed}, then {NodeJailed} unless the node was already jailed; or {SlashSkipped} for an
    /// operator with no node. Reverts `AccessControlUnauthorizedAccount` for a caller without `SLASHER_ROLE` and
    /// `NodeRegistryZeroAmount` for a zero amount (a caller bug, not a stale entry).
    function slash(address operator, uint256 amount, bytes32 evidenceHash)
        external
        onlyRole(SLASHER_ROLE)
        returns (uint256 slashed)
    {
        if (amount == 0) revert NodeRegistryZeroAmount(msg.sender);
        Node storage node = _nodes[operator];
        if (node.registeredAt == 0) {
            emit SlashSkipped(operator, msg.sender, amount, evidenceHash);
            return 0;
        }

        uint256 stake = node.stake;
        slashed = amount < stake ? amount : stake;
        uint256 remaining = stake - slashed;
        node.stake = remaining;
        _totalStaked -= slashed;
        _treasuryBalance += slashed;
        bool newlyJailed = !node.jailed;
        node.jailed = true;
        emit NodeSlashed(operator, msg.sender, slashed, remaining, evidenceHash);
        if (newlyJailed) emit NodeJailed(operator, msg.sender, evidenceHash);
    }

    /// @notice Pay the whole treasury balance (slashed stake) to the treasury account.
    /// @dev Emits {TreasuryWithdrawn}. Only the treasury account.
    function withdrawTreasury() external nonReentrant {
        if (msg.sender != _treasury) revert NodeRegistryUnauthorizedTreasury(msg.sender);
        uint256 amount = _treasuryBalance;
        if (amount == 0) revert NodeRegistryNothingToWithdraw(msg.sender);
        _treasuryBalance = 0;
        emit TreasuryWithdrawn(msg.sender, amount);
        _send(msg.sender, amount);
    }

    /// @notice The node registered by `operator` (all-zero when none).
    /// @param operator The operator.
    /// @return The node.
    function getNode(address operator) external view returns (Node memory) {
        return _nodes[operator];
    }

    /// @notice Whether `operator` has a node registered (bonded or unbonding).
    /// @param operator The operator.
    /// @return True when registered.
    function isRegistered(address operator) external view returns (bool) {
        return _nodes[operator].registeredAt != 0;
    }

    /// @inheritdoc INodeSlasher
    function isActive(address operator) external view returns (bool) {
        Node storage node = _nodes[operator];
        return node.registeredAt != 0 && node.unbondingEndsAt == 0 && !node.jailed
            && node.stake >= minimumStake(node.role);
    }

    /// @inheritdoc INodeSlasher
    function isJailed(address operator) external view returns (bool) {
        return _nodes[operator].jailed;
    }

    /// @inheritdoc INodeSlasher
    function stakeOf(address operator) external view returns (uint256) {
        return _nodes[operator].stake;
    }

    /// @notice The minimum stake of `role`, in wei.
    /// @param role The role.
    /// @return The minimum in wei.
    function minimumStake(Role role) public view returns (uint256) {
        if (role == Role.Model) return _minimumStakeModel;
        if (role == Role.Relay) return _minimumStakeRelay;
        return _minimumStakeVerifier;
    }

    /// @notice The unbonding delay in seconds (at least `verificationWindow`).
    /// @return The delay.
    function unbondingDelay() external view returns (uint64) {
        return _unbondingDelay;
    }

    /// @notice Seconds from an answer to the verifiers' verdict on it; contracts that lock earnings until a verdict
    /// (payment channels) read it here.
    /// @return The window.
    function verificationWindow() external view returns (uint64) {
        return _verificationWindow;
    }

    /// @notice What `account` can withdraw now, in wei.
    /// @param account The account.
    /// @return The pending amount in wei.
    function pendingWithdrawal(address account) external view returns (uint256) {
        return _pendingWithdrawals[account];
    }

    /// @notice The treasury account.
    /// @return The treasury.
    function treasury() external view returns (address) {
        return _treasury;
    }

    /// @notice Slashed funds not yet withdrawn by the treasury, in wei.
    /// @return The balance in wei.
    function treasuryBalance() external view returns (uint256) {
        return _treasuryBalance;
    }

    /// @notice The sum of all bonded stakes, in wei.
    /// @return The total in wei.
    function totalStaked() external view returns (uint256) {
        return _totalStaked;
    }

    /// @notice The sum of all pending withdrawals, in wei.
    /// @return The total in wei.
    function totalPendingWithdrawals() external view returns (uint256) {
        return _totalPendingWithdrawals;
    }

    /// @dev The caller's node, which must be registered and not unbonding.
    function _bondedNode(address operator) private view returns (Node storage node) {
        node = _nodes[operator];
        if (node.registeredAt == 0) revert NodeRegistryNotRegistered(operator);
        if (node.unbondingEndsAt != 0) revert NodeRegistryNodeUnbonding(operator, node.unbondingEndsAt);
    }

    /// @dev Reverts unless 0 < length <= MAX_ENDPOINT_LENGTH.
    function _checkEndpoint(string calldata endpoint) private pure {
        uint256 length = bytes(endpoint).length;
        if (length == 0 || length > MAX_ENDPOINT_LENGTH) {
            revert NodeRegistryInvalidEndpoint(length, MAX_ENDPOINT_LENGTH);
        }
    }

    /// @dev Send `amount` wei to `to`, forwarding all gas (state is already settled).
    function _send(address to, uint256 amount) private {
        (bool ok,) = payable(to).call{value: amount}("");
        if (!ok) revert NodeRegistryTransferFailed(to, amount);
    }
}
