// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

import {PaymentChannels} from "../PaymentChannels.sol";

/// @title ReentrantPayee
/// @notice TEST ONLY: a payment-channel client contract that tries to re-enter `PaymentChannels.withdraw` from its
/// `receive` hook, or refuses payments, so tests can prove the pull payment is reentrancy-safe and fails loudly.
/// NOTE: never deploy outside tests.
contract ReentrantPayee {
    PaymentChannels private immutable _payments;
    bool private _refuse;
    bytes private _reentryError;
    uint256 private _received;

    /// @notice The payee refuses incoming ETH (set with `setRefuse`).
    error ReentrantPayeeRefused();

    /// @notice The reentry attempt's outcome was recorded.
    /// @param reason The revert data of the nested `withdraw`.
    event ReentryAttempted(bytes reason);

    /// @param payments_ The payment contract under test.
    constructor(PaymentChannels payments_) {
        _payments = payments_;
    }

    /// @notice Open a channel to `node` with `msg.value`, then start closing it at once.
    /// @param node The node.
    /// @return channelId The channel.
    function openAndClose(address node) external payable returns (uint256 channelId) {
        channelId = _payments.open{value: msg.value}(node);
        _payments.startClose(channelId);
    }

    /// @notice Forward `withdraw`.
    function withdraw() external {
        _payments.withdraw();
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
        if (_refuse) revert ReentrantPayeeRefused();
        _received += msg.value;
        try _payments.withdraw() {} catch (bytes memory reason) {
            _reentryError = reason;
            emit ReentryAttempted(reason);
        }
    }
}
