"""Attestations on a real anvil: who may attest, one attestation per verifier/node/epoch, epochs, quorum and
median, reputation over epochs (exact fixed-point values from docs/verification.md's formula), the penalty
(stake and locked earnings slashed by the configured fractions, node jailed and unroutable in the indexer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from eth_abi.abi import encode
from web3 import Web3

from ledger import AttestationParams, Indexer, InvalidChainInput, RegistryParams, deploy_all, load_artifact
from ledger._attestations import deploy_attestations
from ledger._reverts import (
    AccessControlUnauthorizedAccount,
    AttestationsAlreadyAttested,
    AttestationsEpochFinalized,
    AttestationsEpochTooOld,
    AttestationsFutureEpoch,
    AttestationsInvalidCommitteeSize,
    AttestationsInvalidContracts,
    AttestationsInvalidEpochLength,
    AttestationsInvalidEpochStart,
    AttestationsInvalidSlashFraction,
    AttestationsInvalidThreshold,
    AttestationsMissingEvidence,
    AttestationsNotModelNode,
    AttestationsNotVerifier,
    AttestationsScoreOutOfRange,
    AttestationsVerifierInactive,
    RevertDecoder,
)
from ledger._tx import send_transaction
from tests.fixtures.attest import (
    CLIENTS,
    ETH,
    MODELS,
    NEUTRAL,
    RELAY,
    SCALE,
    VERIFIERS,
    address,
    attestations,
    ceil_fraction,
    deploy_second,
    evidence,
    expected_reputation,
    fresh_epoch,
    register_network,
)
from tests.fixtures.chain import OUTSIDER, OWNER, TEST_PARAMS, ChainEnv
from tests.fixtures.payments import payments, voucher

NODE = MODELS[0]
PASS, FAIL = 900_000, 100_000  # the session deployment's threshold is 0.5


def _next_epoch(chain: ChainEnv) -> int:
    return fresh_epoch(chain, attestations(chain))


def _root(items: list[tuple[int, int, bytes]]) -> bytes:
    """The evidence root written out from the contract's NatSpec (independent of ledger.evidence_root)."""
    root = bytes(32)
    for verifier, score, ev in items:
        root = bytes(
            Web3.keccak(encode(["bytes32", "address", "uint256", "bytes32"], [root, address(verifier), score, ev]))
        )
    return root


def test_session_deployment_wires_the_contract_with_both_slasher_roles(chain: ChainEnv) -> None:
    att = attestations(chain)
    assert att.registry() == chain.deployment.registry_address
    assert att.payments() == chain.deployment.payments_address
    assert chain.registry().is_slasher(att.address)
    assert payments(chain).has_role(payments(chain).SLASHER_ROLE, att.address)
    assert (att.committee_size(), att.quorum()) == (3, 2)
    assert att.epoch_length() == TEST_PARAMS.verification_window // 2
    assert chain.deployment.params["attestations"]["quorum"] == 2
    assert att.reputation_of(address(NODE)) == NEUTRAL  # never rated


def test_an_unregistered_address_cannot_attest(chain: ChainEnv) -> None:
    register_network(chain)
    att = attestations(chain, OUTSIDER)
    with pytest.raises(AttestationsNotVerifier) as info:
        att.attest(address(NODE), att.current_epoch(), PASS, evidence(1))
    assert info.value.account == address(OUTSIDER)


@pytest.mark.parametrize("index", [RELAY, MODELS[1]], ids=["relay", "model"])
def test_relays_and_model_nodes_cannot_attest(chain: ChainEnv, index: int) -> None:
    register_network(chain)
    att = attestations(chain, index)
    with pytest.raises(AttestationsNotVerifier) as info:
        att.attest(address(NODE), att.current_epoch(), PASS, evidence(1))
    assert info.value.account == address(index)


def test_an_unbonding_or_jailed_verifier_cannot_attest(chain: ChainEnv) -> None:
    register_network(chain)
    verifier = VERIFIERS[0]
    chain.registry(verifier).request_unbond()
    att = attestations(chain, verifier)
    with pytest.raises(AttestationsVerifierInactive) as info:
        att.attest(address(NODE), att.current_epoch(), PASS, evidence(1))
    assert info.value.verifier == address(verifier)
    chain.registry(verifier).rebond()
    att.attest(address(NODE), att.current_epoch(), PASS, evidence(1))  # active again


@pytest.mark.parametrize("target", [RELAY, VERIFIERS[1], OUTSIDER], ids=["relay", "verifier", "unregistered"])
def test_only_registered_model_nodes_are_attested(chain: ChainEnv, target: int) -> None:
    register_network(chain)
    att = attestations(chain, VERIFIERS[0])
    with pytest.raises(AttestationsNotModelNode) as info:
        att.attest(address(target), att.current_epoch(), PASS, evidence(1))
    assert info.value.node == address(target)


def test_a_second_attestation_by_one_verifier_for_one_node_and_epoch_reverts(chain: ChainEnv) -> None:
    register_network(chain)
    att = attestations(chain, VERIFIERS[0])
    epoch = att.current_epoch()
    assert att.attest(address(NODE), epoch, PASS, evidence(1)).events == ("AttestationSubmitted",)
    with pytest.raises(AttestationsAlreadyAttested) as info:
        att.attest(address(NODE), epoch, FAIL, evidence(2))
    assert (info.value.verifier, info.value.node, info.value.epoch) == (address(VERIFIERS[0]), address(NODE), epoch)
    assert att.tally(address(NODE), epoch).scores == (PASS,)  # the first one stands
    att.attest(address(MODELS[1]), epoch, PASS, evidence(3))  # another node in the same epoch is fine
    assert att.has_attested(address(VERIFIERS[0]), address(NODE), epoch)
    assert not att.has_attested(address(VERIFIERS[1]), address(NODE), epoch)


def test_future_and_too_old_epochs_revert_and_the_previous_epoch_is_accepted(chain: ChainEnv) -> None:
    register_network(chain)
    att = attestations(chain, VERIFIERS[0])
    first = fresh_epoch(chain, att)
    with pytest.raises(AttestationsFutureEpoch) as future:
        att.attest(address(NODE), first + 1, PASS, evidence(1))
    assert (future.value.epoch, future.value.currentEpoch) == (first + 1, first)
    _next_epoch(chain)
    second = _next_epoch(chain)
    assert second == first + 2
    with pytest.raises(AttestationsEpochTooOld) as old:
        att.attest(address(NODE), first, PASS, evidence(1))
    assert (old.value.epoch, old.value.currentEpoch, old.value.maxAge) == (first, second, 1)
    att.attest(address(NODE), second - 1, PASS, evidence(1))  # the previous epoch
    att.attest(address(NODE), second, PASS, evidence(2))


def test_score_range_and_evidence_are_checked(chain: ChainEnv) -> None:
    register_network(chain)
    att = attestations(chain, VERIFIERS[0])
    epoch = att.current_epoch()
    with pytest.raises(AttestationsScoreOutOfRange) as score:
        att.attest(address(NODE), epoch, SCALE + 1, evidence(1))
    assert (score.value.score, score.value.maximum) == (SCALE + 1, SCALE)
    with pytest.raises(AttestationsMissingEvidence) as missing:
        att.attest(address(NODE), epoch, PASS, bytes(32))
    assert (missing.value.node, missing.value.epoch) == (address(NODE), epoch)
    att.attest(address(NODE), epoch, SCALE, evidence(1))  # 1.0 is a valid score


def test_below_quorum_nothing_changes_and_at_quorum_the_median_is_applied_once(chain: ChainEnv) -> None:
    register_network(chain)
    target = deploy_second(chain, AttestationParams(committee_size=5))  # quorum 4: an even median
    att = attestations(chain, at=target)
    assert att.quorum() == 4
    node, epoch = address(NODE), att.current_epoch()
    scores = [700_000, 300_000, 900_000, 600_000]
    stake = chain.registry().stake_of(node)
    for i, (verifier, score) in enumerate(zip(VERIFIERS[:3], scores[:3], strict=True)):
        receipt = attestations(chain, verifier, at=target).attest(node, epoch, score, evidence(verifier))
        assert receipt.events == ("AttestationSubmitted",)
        tally = att.tally(node, epoch)
        assert (tally.count, tally.finalized, tally.median) == (i + 1, False, 0)
        assert att.reputation_of(node) == NEUTRAL and att.record_of(node).epochs_rated == 0
    last = attestations(chain, VERIFIERS[3], at=target).attest(node, epoch, scores[3], evidence(VERIFIERS[3]))
    assert last.events == ("AttestationSubmitted", "EpochFinalized", "ReputationUpdated")
    median = (600_000 + 700_000) // 2  # the two middle ones of 300k, 600k, 700k, 900k
    tally = att.tally(node, epoch)
    assert (tally.count, tally.finalized, tally.median, tally.scores) == (4, True, median, tuple(scores))
    items = [(v, s, evidence(v)) for v, s in zip(VERIFIERS[:4], scores, strict=True)]
    assert tally.evidence_root == _root(items)
    assert att.reputation_of(node) == expected_reputation(NEUTRAL, median, 0)
    with pytest.raises(AttestationsEpochFinalized) as late:  # a fifth verdict for a finalized epoch is refused
        attestations(chain, VERIFIERS[4], at=target).attest(node, epoch, FAIL, evidence(VERIFIERS[4]))
    assert (late.value.node, late.value.epoch, late.value.median) == (node, epoch, median)
    assert att.record_of(node).epochs_rated == 1 and chain.registry().stake_of(node) == stake


def test_an_odd_quorum_takes_the_middle_score(chain: ChainEnv) -> None:
    register_network(chain)
    target = deploy_second(chain, AttestationParams(committee_size=4))  # quorum 3
    node, epoch = address(NODE), attestations(chain, at=target).current_epoch()
    for verifier, score in zip(VERIFIERS[:3], (1_000_000, 0, 550_000), strict=True):
        attestations(chain, verifier, at=target).attest(node, epoch, score, evidence(verifier))
    assert attestations(chain, at=target).tally(node, epoch).median == 550_000


def test_reputation_moves_as_documented_over_several_epochs(chain: ChainEnv) -> None:
    register_network(chain)
    node = address(NODE)
    att = attestations(chain)
    # Per epoch, the quorum's two scores: a pass, five failures in a row, a pass.
    plan = [
        (950_000, 850_000),
        (200_000, 400_000),
        (100_000, 100_000),
        (0, 300_000),
        (0, 0),
        (450_000, 0),
        (800_000, 1_000_000),
    ]
    reputation, streak, seen = NEUTRAL, 0, []
    for n, (a, b) in enumerate(plan):
        epoch = _next_epoch(chain)
        attestations(chain, VERIFIERS[0]).attest(node, epoch, a, evidence(n, 0))
        receipt = attestations(chain, VERIFIERS[1]).attest(node, epoch, b, evidence(n, 1))
        median = (a + b) // 2
        streak = streak + 1 if median < 500_000 else 0
        reputation = expected_reputation(reputation, median, streak)
        assert ("NodePenalized" in receipt.events) == (streak > 0)
        record = att.record_of(node)
        assert (record.reputation, record.failure_streak, record.epochs_rated) == (reputation, streak, n + 1)
        seen.append(record.reputation)
    # The same by hand (docs/verification.md's worked example): weights 0.2, then 0.2, 0.4, 0.6, 0.8, 0.8 (capped)
    # for the failures in a row, then 0.2 again.
    assert seen == [580_000, 524_000, 354_400, 231_760, 46_352, 189_270, 331_416]
    assert att.record_of(node).penalties == 5


def test_a_failing_node_loses_the_configured_fractions_is_jailed_and_unroutable(
    chain: ChainEnv, tmp_path: Path
) -> None:
    register_network(chain)
    node = address(NODE)
    client = CLIENTS[0]
    channel = payments(chain, client).open_channel(node, ETH).channel_id
    payments(chain, NODE).redeem(voucher(payments(chain), client, channel, 3 * 10**17 + 7))
    locked = payments(chain).balances(node).locked
    stake = chain.registry().stake_of(node)
    treasury_before = chain.registry().treasury_balance()
    assert locked == 3 * 10**17 + 7

    att = attestations(chain)
    epoch = att.current_epoch()
    attestations(chain, VERIFIERS[0]).attest(node, epoch, 200_000, evidence("a"))
    receipt = attestations(chain, VERIFIERS[1]).attest(node, epoch, 300_000, evidence("b"))
    assert receipt.events == ("AttestationSubmitted", "EpochFinalized", "ReputationUpdated", "NodePenalized")

    stake_cut = ceil_fraction(stake, att.stake_slash_fraction())
    earnings_cut = ceil_fraction(locked, att.earnings_slash_fraction())
    assert stake_cut == stake // 10 and earnings_cut == (locked + 1) // 2  # 10% and 50%, rounded up
    assert chain.registry().stake_of(node) == stake - stake_cut
    assert chain.registry().treasury_balance() == treasury_before + stake_cut
    assert payments(chain).balances(node).locked == locked - earnings_cut
    registry = chain.registry()
    assert registry.is_jailed(node) and not registry.is_active(node)
    assert att.balance() == 0

    with Indexer(chain.registry(), chain.deployment, f"sqlite:///{tmp_path / 'index.db'}") as indexer:
        indexer.sync()
        indexed = {n.operator: n for n in indexer.nodes()}
        assert indexed[node].jailed and not indexed[node].active
        assert indexed[node].reputation == att.reputation_of(node) == expected_reputation(NEUTRAL, 250_000, 1)
        assert (indexed[node].failure_streak, indexed[node].penalties) == (1, 1)
        assert indexed[address(MODELS[1])].active and indexed[address(MODELS[1])].reputation == NEUTRAL
        assert indexer.stake_changes(node)[-1] == ("slash", -stake_cut, stake - stake_cut)
        root = att.tally(node, epoch).evidence_root
        assert root == _root([(VERIFIERS[0], 200_000, evidence("a")), (VERIFIERS[1], 300_000, evidence("b"))])
        assert [a[:3] for a in indexer.attestations(node)] == [
            (epoch, address(VERIFIERS[0]), 200_000),
            (epoch, address(VERIFIERS[1]), 300_000),
        ]


def test_an_honest_node_keeps_its_reputation_stake_and_earnings_over_many_epochs(chain: ChainEnv) -> None:
    register_network(chain)
    node = address(NODE)
    stake = chain.registry().stake_of(node)
    att = attestations(chain)
    reputation = NEUTRAL
    for n in range(8):
        epoch = _next_epoch(chain)
        scores = (820_000 + n * 1_000, 780_000)
        for verifier, score in zip(VERIFIERS[:2], scores, strict=True):
            attestations(chain, verifier).attest(node, epoch, score, evidence(n, verifier))
        reputation = expected_reputation(reputation, sum(scores) // 2, 0)
        assert att.reputation_of(node) == reputation
    record = att.record_of(node)
    assert (record.failure_streak, record.penalties, record.epochs_rated) == (0, 0, 8)
    assert att.reputation_of(node) > NEUTRAL
    assert chain.registry().stake_of(node) == stake and chain.registry().is_active(node)


def test_a_failing_node_with_no_locked_earnings_loses_stake_only(chain: ChainEnv) -> None:
    register_network(chain)
    node = address(NODE)
    att = attestations(chain)
    epoch = att.current_epoch()
    for verifier in VERIFIERS[:2]:
        attestations(chain, verifier).attest(node, epoch, 0, evidence(verifier))
    assert chain.registry().is_jailed(node) and payments(chain).balances(node).locked == 0


def test_penalty_without_the_slasher_roles_reverts_and_records_nothing(chain: ChainEnv) -> None:
    register_network(chain)
    target = deploy_second(chain, AttestationParams(), grant=False)
    node, epoch = address(NODE), attestations(chain, at=target).current_epoch()
    attestations(chain, VERIFIERS[0], at=target).attest(node, epoch, 0, evidence(1))
    with pytest.raises(AccessControlUnauthorizedAccount) as info:  # the registry's error, decoded through
        attestations(chain, VERIFIERS[1], at=target).attest(node, epoch, 0, evidence(2))
    assert info.value.account == target
    assert attestations(chain, at=target).tally(node, epoch).count == 1  # the whole transaction was undone


def _raw_deploy(chain: ChainEnv, **overrides: Any) -> None:
    """Send the constructor with ``overrides``, bypassing ``AttestationParams``' own checks."""
    artifact = load_artifact("Attestations")
    args: dict[str, Any] = {
        "registry": chain.deployment.registry_address,
        "payments": chain.deployment.payments_address,
        "start": chain.now(),
        "length": 600,
        "committee": 3,
        "threshold": 500_000,
        "stake": 100_000,
        "earnings": 500_000,
        **overrides,
    }
    factory = chain.w3.eth.contract(abi=list(artifact.abi), bytecode=artifact.bytecode)
    send_transaction(chain.w3, chain.account(OWNER), factory.constructor(*args.values()), RevertDecoder([artifact.abi]))


ZERO = "0x" + "00" * 20


@pytest.mark.parametrize(
    ("overrides", "error", "values"),
    [
        ({"registry": ZERO}, AttestationsInvalidContracts, None),
        ({"payments": ZERO}, AttestationsInvalidContracts, None),
        ({"length": 0}, AttestationsInvalidEpochLength, {"epochLength": 0, "minimum": 1, "maximum": 900}),
        ({"length": 901}, AttestationsInvalidEpochLength, {"epochLength": 901, "minimum": 1, "maximum": 900}),
        ({"start": 2**40}, AttestationsInvalidEpochStart, {"epochStart": 2**40}),
        ({"committee": 0}, AttestationsInvalidCommitteeSize, {"committeeSize": 0, "maximum": 32}),
        ({"committee": 33}, AttestationsInvalidCommitteeSize, {"committeeSize": 33, "maximum": 32}),
        ({"threshold": SCALE + 1}, AttestationsInvalidThreshold, {"scoreThreshold": SCALE + 1, "scale": SCALE}),
        ({"stake": 0}, AttestationsInvalidSlashFraction, {"stakeSlashFraction": 0}),
        ({"stake": SCALE + 1}, AttestationsInvalidSlashFraction, {"stakeSlashFraction": SCALE + 1}),
        ({"earnings": SCALE + 1}, AttestationsInvalidSlashFraction, {"earningsSlashFraction": SCALE + 1}),
    ],
)
def test_constructor_bounds_revert_with_the_values(
    chain: ChainEnv, overrides: dict[str, Any], error: type[Exception], values: dict[str, int] | None
) -> None:
    with pytest.raises(error) as info:
        _raw_deploy(chain, **overrides)
    for key, value in (values or {}).items():
        assert getattr(info.value, key) == value


def test_params_reject_bad_values_before_any_transaction() -> None:
    bad_values: list[dict[str, int]] = [
        {"committee_size": 0},
        {"committee_size": 33},
        {"score_threshold": SCALE + 1},
        {"stake_slash_fraction": 0},
        {"earnings_slash_fraction": -1},
        {"epoch_length": 0},
    ]
    for bad in bad_values:
        with pytest.raises(InvalidChainInput) as info:
            AttestationParams(**bad)
        assert info.value.param == next(iter(bad))


def test_deploy_attestations_defaults_the_epoch_to_half_the_verification_window(chain: ChainEnv) -> None:
    target, _ = deploy_attestations(
        chain.w3,
        chain.account(OWNER),
        registry=chain.deployment.registry_address,
        payments=chain.deployment.payments_address,
        params=AttestationParams(),
    )
    att = attestations(chain, at=target)
    assert att.epoch_length() == TEST_PARAMS.verification_window // 2
    assert att.epoch_start() <= chain.now() and att.current_epoch() == 0


def test_deploy_all_refuses_a_window_too_short_for_an_epoch_before_deploying_attestations(
    chain: ChainEnv, tmp_path: Path
) -> None:
    params = RegistryParams(verification_window=1, unbonding_delay=1)
    with pytest.raises(InvalidChainInput) as info:
        deploy_all(chain.w3, chain.account(OWNER), params, path=tmp_path / "d.json")
    assert (info.value.param, info.value.value) == ("epoch_length", 0)
    with pytest.raises(AttestationsInvalidEpochLength) as bound:  # an explicit epoch still meets the contract's
        deploy_all(
            chain.w3,
            chain.account(OWNER),
            params,
            path=tmp_path / "d.json",
            attestation_params=AttestationParams(epoch_length=1),
        )
    assert (bound.value.epochLength, bound.value.maximum) == (1, 0)


def test_two_verifiers_attesting_in_one_block_both_land_and_the_second_finalizes(chain: ChainEnv) -> None:
    """Both attestations are estimated before either is mined (the below-quorum cost); the one mined second reaches
    quorum and slashes, which costs more. ``Attestations.attest`` sends with the worst case's gas as a floor, so the
    second does not run out of gas (it did, as a verifier committee of 3 showed in the demo)."""
    import threading

    register_network(chain)
    node = address(NODE)
    att = attestations(chain)
    epoch = _next_epoch(chain)
    results: dict[int, object] = {}

    def attest(verifier: int) -> None:
        try:
            results[verifier] = attestations(chain, verifier).attest(node, epoch, FAIL, evidence("race", verifier))
        except Exception as exc:  # the assertion below shows which failed and why
            results[verifier] = exc

    chain.w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        threads = [threading.Thread(target=attest, args=(v,)) for v in VERIFIERS[:2]]
        for thread in threads:
            thread.start()
        deadline = 20.0
        while deadline > 0 and int(chain.w3.provider.make_request("txpool_status", [])["result"]["pending"], 16) < 2:  # type: ignore[arg-type]
            threading.Event().wait(0.05)
            deadline -= 0.05
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        for thread in threads:
            thread.join(timeout=30)
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    receipts = [results[v] for v in VERIFIERS[:2]]
    assert all(not isinstance(r, BaseException) for r in receipts), receipts
    assert att.tally(node, epoch).finalized
    assert chain.registry().is_jailed(node)
