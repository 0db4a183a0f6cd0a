// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

import {INodeRegistryView} from "../interfaces/INodeRegistryView.sol";

/// @title JailSwitch
/// @notice TEST ONLY: an `INodeRegistryView` whose jail flags anyone can set, so payment tests can jail a node
/// without the registry's slashing flow.
/// NOTE: never deploy outside tests.
contract JailSwitch is INodeRegistryView {
    mapping(address operator => bool jailed) private _jailed;

    /// @notice `operator`'s jail flag was set to `jailed`.
    /// @param operator The operator.
    /// @param jailed The new flag.
    event JailSet(address indexed operator, bool jailed);

    /// @notice Set `operator`'s jail flag.
    /// @dev Emits {JailSet}.
    /// @param operator The operator.
    /// @param jailed The new flag.
    function setJailed(address operator, bool jailed) external {
        _jailed[operator] = jailed;
        emit JailSet(operator, jailed);
    }

    /// @inheritdoc INodeRegistryView
    function isJailed(address operator) external view returns (bool) {
        return _jailed[operator];
    }
}
