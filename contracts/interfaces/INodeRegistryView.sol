// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

/// @title INodeRegistryView
/// @notice The one registry read the payment contract needs: whether a node operator is jailed (slashed and not
/// yet cleared), which forbids it to redeem vouchers. `NodeRegistry` implements it; tests may use a double.
interface INodeRegistryView {
    /// @notice Whether `operator` is jailed: it is not routed to and may not redeem payments.
    /// @param operator The node operator.
    /// @return True while jailed.
    function isJailed(address operator) external view returns (bool);
}
