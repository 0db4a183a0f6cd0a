// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

import {NodeRegistry} from "../NodeRegistry.sol";

/// @title ReentrantOperator
/// @notice TEST ONLY: a node operator contract that tries to re-enter `NodeRegistry.withdraw` from its `receive`
/// hook, or refuses payments, so tests can prove the pull payment is reentrancy-safe and fails loudly.
/// NOTE: never deploy outside tests.
contract ReentrantOperator {
    NodeRegistry private immutable _registry;
    bool private _refuse;
    bytes private _reentryError;
    uint256 private _received;

    /// @notice The operator refuses incoming ETH (set with `setRefuse`).
    error ReentrantOperatorRefused();

    /// @notice The reentry attempt's outcome was recorded.
    /// @param reason The revert data of the nested `withdraw`.
    event ReentryAttempted(bytes reason);

    /// @param registry_ The registry under test.
    constructor(NodeRegistry registry_) {
        _registry = registry_;
    }

    /// @notice Register this contract as a relay with `msg.value` stake.
    function register() external payable {
        _registry.register{value: msg.value}(NodeRegistry.Role.Relay, "http://127.0.0.1:1", bytes32(uint256(1)), bytes32(0), 0);
    }

    /// @notice Forward `requestUnbond`.
    function requestUnbond() external {
        _registry.requestUnbond();
    }

    /// @notice Forward `deregister`.
    function deregister() external {
        _registry.deregister();
    }

    /// @notice Forward `withdraw`.
    function withdraw() external {
        _registry.withdraw();
    }

    /// @notice Make `receive` revert (true) or re-enter (false).
    /// @param refuse Whether to refuse payments.
    function setRefuse(bool refuse) external {
        _refuse = refuse;
    }

    /// @notice The revert data the nested `withdraw` produced.
    /// @return The raw revert data.
    function reentryError() external view returns (bytes memory) {
        return _reentryError;
    }

    /// @notice ETH received so far, in wei.
    /// @return The total.
    function received() external view returns (uint256) {
        return _received;
    }

    /// @notice Receive a payment and try to withdraw again inside it.
    /// @dev Emits {ReentryAttempted}.
    receive() external payable {
        if (_refuse) revert ReentrantOperatorRefused();
        _received += msg.value;
        try _registry.withdraw() {} catch (bytes memory reason) {
            _reentryError = reason;
            emit ReentryAttempted(reason);
        }
    }
}
