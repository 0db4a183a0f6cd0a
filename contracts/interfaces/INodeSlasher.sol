// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

/// @title INodeSlasher
/// @notice The slashing surface the registry exposes to the holders of its `SLASHER_ROLE` (the attestation/
/// reputation contract and the payment-channel contract). A holder needs this interface only: it can read stake,
/// activity and jailing, and burn stake into the treasury (which jails the node), nothing else.
interface INodeSlasher {
    /// @notice Slash up to `amount` wei of `operator`'s stake into the treasury and jail the node.
    /// @dev Callable only by holders of `SLASHER_ROLE`. Slashing an unbonding node is allowed (that is what the
    /// unbonding delay is for). The amount is capped at the current stake, and an operator with no node (never
    /// registered, or already deregistered) is skipped with a `SlashSkipped` event and a zero return, so that one
    /// stale entry never reverts a quorum's or a batch's transaction.
    /// @param operator The node operator to slash.
    /// @param amount The requested amount in wei (must be non-zero).
    /// @param evidenceHash keccak256 of the off-chain evidence (prompt, answer, scores).
    /// @return slashed The amount actually moved to the treasury, in wei (zero when skipped).
    function slash(address operator, uint256 amount, bytes32 evidenceHash) external returns (uint256 slashed);

    /// @notice The stake currently bonded by `operator`, in wei (zero when not registered).
    /// @param operator The node operator.
    /// @return The bonded stake in wei.
    function stakeOf(address operator) external view returns (uint256);

    /// @notice Whether `operator` may be routed to: registered, not unbonding, not jailed, stake at least its
    /// role's minimum.
    /// @param operator The node operator.
    /// @return True when the node is active.
    function isActive(address operator) external view returns (bool);

    /// @notice Whether `operator`'s node is jailed (slashed and not yet unjailed by its operator).
    /// @param operator The node operator.
    /// @return True when jailed; false for an operator with no node.
    function isJailed(address operator) external view returns (bool);
}
