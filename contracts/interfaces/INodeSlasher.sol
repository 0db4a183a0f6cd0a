// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

/// @title INodeSlasher
/// @notice The slashing surface the registry exposes to its one authorised slasher (the attestation/reputation
/// contract of a later issue). That contract holds this interface only: it can read stake and activity and burn
/// stake into the treasury, nothing else.
interface INodeSlasher {
    /// @notice Slash up to `amount` wei of `operator`'s stake into the treasury.
    /// @dev Callable only by the registry's slasher. Slashing an unbonding node is allowed (that is what the
    /// unbonding delay is for). The amount is capped at the current stake so that a quorum never reverts.
    /// @param operator The node operator to slash.
    /// @param amount The requested amount in wei (must be non-zero).
    /// @param evidenceHash keccak256 of the off-chain evidence (prompt, answer, scores).
    /// @return slashed The amount actually moved to the treasury, in wei.
    function slash(address operator, uint256 amount, bytes32 evidenceHash) external returns (uint256 slashed);

    /// @notice The stake currently bonded by `operator`, in wei (zero when not registered).
    /// @param operator The node operator.
    /// @return The bonded stake in wei.
    function stakeOf(address operator) external view returns (uint256);

    /// @notice Whether `operator` may be routed to: registered, not unbonding, stake at least its role's minimum.
    /// @param operator The node operator.
    /// @return True when the node is active.
    function isActive(address operator) external view returns (bool);
}
