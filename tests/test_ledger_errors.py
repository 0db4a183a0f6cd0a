"""Error mapping at the chain layer's edge: reverts by selector, funding, unreachable or mismatched chains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_abi.abi import encode
from eth_utils.abi import function_signature_to_4byte_selector

from ledger import (
    ChainError,
    ChainNotReachable,
    ContractRevert,
    DeploymentNotFound,
    InsufficientFunds,
    Role,
    UnknownRevert,
    WrongChainId,
    connect,
    dev_account,
    load_artifact,
    load_deployment,
    model_id,
    open_registry,
)
from ledger._anvil import free_port
from ledger._reverts import REVERT_CLASSES, Panic, RevertDecoder, RevertString
from tests.fixtures.chain import ChainEnv


def _decoder() -> RevertDecoder:
    return RevertDecoder([load_artifact("NodeRegistry").abi])


def test_every_abi_error_has_its_own_exception_class() -> None:
    names = {item["name"] for item in load_artifact("NodeRegistry").abi if item["type"] == "error"}
    assert names <= set(REVERT_CLASSES)
    ours = {n for n in names if n.startswith("NodeRegistry")}
    assert len(ours) >= 15
    for name in names:
        cls = REVERT_CLASSES[name]
        assert cls.__name__ == name and issubclass(cls, ContractRevert)


def test_revert_classes_register_themselves_once_and_only_from_the_ledger() -> None:
    class Elsewhere(ContractRevert):  # a caller's own subclass is not an ABI error
        pass

    assert Elsewhere.error_name == "Elsewhere" and "Elsewhere" not in REVERT_CLASSES
    assert {"Error", "Panic", "UnknownRevert"}.isdisjoint(REVERT_CLASSES)
    assert RevertString.error_name == "Error" and Panic.error_name == "Panic"
    with pytest.raises(TypeError, match="two classes"):
        type("NodeRegistryNotJailed", (ContractRevert,), {"__module__": "ledger._reverts"})


def test_decoder_decodes_arguments_by_selector() -> None:
    selector = function_signature_to_4byte_selector("NodeRegistryStakeBelowMinimum(address,uint8,uint256,uint256)")
    operator = dev_account(1).address
    data = selector + encode(["address", "uint8", "uint256", "uint256"], [operator, 2, 5, 7])
    exc = _decoder().decode("0x" + data.hex(), tx_hash="0xabc")
    assert type(exc).__name__ == "NodeRegistryStakeBelowMinimum"
    assert exc.values == {"operator": operator, "role": Role.VERIFIER, "stake": 5, "minimum": 7}
    assert exc.tx_hash == "0xabc" and exc.code == "tx_reverted"


def test_unknown_selector_gives_raw_data() -> None:
    exc = _decoder().decode("0xdeadbeef0102")
    assert isinstance(exc, UnknownRevert) and isinstance(exc, ChainError)
    assert exc.data == "0xdeadbeef0102"


def test_truncated_arguments_are_not_guessed() -> None:
    selector = function_signature_to_4byte_selector("NodeRegistryNotRegistered(address)")
    exc = _decoder().decode(selector + b"\x00" * 5)
    assert isinstance(exc, UnknownRevert)


def test_standard_error_and_panic_are_decoded() -> None:
    err = function_signature_to_4byte_selector("Error(string)") + encode(["string"], ["nope"])
    panic = function_signature_to_4byte_selector("Panic(uint256)") + encode(["uint256"], [0x11])
    decoded = _decoder().decode(err)
    assert isinstance(decoded, RevertString) and decoded.reason == "nope"
    decoded_panic = _decoder().decode(panic)
    assert isinstance(decoded_panic, Panic) and decoded_panic.code_value == 0x11
    assert decoded_panic.meaning == "arithmetic overflow or underflow"


def test_unfunded_account_raises_insufficient_funds(chain: ChainEnv) -> None:
    poor = chain.registry().with_account(dev_account(500))
    with pytest.raises(InsufficientFunds) as exc:
        poor.register(
            role=Role.MODEL,
            endpoint="http://127.0.0.1:1",
            x25519_public_key=b"\x01" * 32,
            model_id=model_id("m@v1"),
            price_per_1k_tokens=0,
            stake=10**18,
        )
    assert exc.value.code == "insufficient_funds" and exc.value.account == dev_account(500).address


def test_no_chain_at_url_is_chain_unavailable() -> None:
    with pytest.raises(ChainNotReachable) as exc:
        connect(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    assert exc.value.code.startswith("chain_unavailable")
    with pytest.raises(ChainNotReachable):
        connect("ws://127.0.0.1:1")


def test_wrong_chain_id_is_rejected(chain: ChainEnv, tmp_path: Path) -> None:
    with pytest.raises(WrongChainId) as exc:
        connect(chain.rpc_url, expected_chain_id=1)
    assert (exc.value.expected, exc.value.actual) == (1, 31337)
    doc = json.loads(chain.deployment_path.read_text())
    doc["chainId"] = 5
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(WrongChainId):
        open_registry(chain.rpc_url, path)


def test_missing_or_codeless_deployment_is_chain_unavailable(chain: ChainEnv, tmp_path: Path) -> None:
    with pytest.raises(DeploymentNotFound) as missing:
        load_deployment(tmp_path / "nope.json")
    assert missing.value.code.startswith("chain_unavailable")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DeploymentNotFound):
        load_deployment(tmp_path / "bad.json")
    doc = json.loads(chain.deployment_path.read_text())
    doc["contracts"]["NodeRegistry"]["address"] = dev_account(3).address  # an account, no code
    path = tmp_path / "codeless.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DeploymentNotFound) as codeless:
        open_registry(chain.rpc_url, path)
    assert "no code" in str(codeless.value)


def test_open_registry_round_trips_the_deployment_file(chain: ChainEnv) -> None:
    deployment, registry = open_registry(chain.rpc_url, chain.deployment_path)
    assert deployment == load_deployment(chain.deployment_path)
    assert registry.address == chain.deployment.registry_address
    assert deployment.deploy_block == chain.deployment.deploy_block
