// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

/// @title IEarningsSlasher
/// @notice The surface of the payment contract that the attestation contract (a holder of the payment contract's
/// own `SLASHER_ROLE`) needs: how much of a node's earnings is still locked, and taking a part of it.
/// `PaymentChannels` implements it.
interface IEarningsSlasher {
    /// @notice Take up to `amount` wei of `node`'s still-locked earnings into the treasury's balance.
    /// @dev Callable only by holders of the payment contract's `SLASHER_ROLE`; reverts on a zero amount; capped at
    /// what is locked.
    /// @param node The node's operator.
    /// @param amount The requested amount in wei (non-zero).
    /// @param evidenceHash keccak256 of the off-chain evidence.
    /// @return slashed The amount actually taken, in wei.
    function slash(address node, uint256 amount, bytes32 evidenceHash) external returns (uint256 slashed);

    /// @notice What `account` has on the payment contract now.
    /// @param account A node, client or the treasury.
    /// @return locked Earnings still locked (slashable), in wei.
    /// @return withdrawable What `withdraw` would pay now, in wei.
    /// @return lockedUntil When all currently locked earnings are released (0 when nothing is locked).
    function balancesOf(address account)
        external
        view
        returns (uint256 locked, uint256 withdrawable, uint64 lockedUntil);
}
