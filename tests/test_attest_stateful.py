"""Random sequences of attestations (by verifiers, outsiders and relays; for current, previous, stale and future
epochs), time steps, verifier unbonding/rebonding, earnings and unjailing, against anvil and a model of the
documented rules. Invariants: reputation stays in [0, 1.0] and equals the model's; at most one attestation per
verifier, node and epoch, and at most a quorum per node and epoch; each penalty takes exactly the configured stake
fraction (rounded up, capped at the stake) and at most the configured fraction of locked earnings; the contract
never holds ETH."""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule
from web3.logs import DISCARD

from ledger import Anvil, Attestations, ContractRevert, Deployment, NodeRegistry, PaymentChannels, Role, dev_account
from ledger._reverts import (
    AttestationsAlreadyAttested,
    AttestationsEpochFinalized,
    AttestationsEpochTooOld,
    AttestationsFutureEpoch,
    AttestationsNotModelNode,
    AttestationsNotVerifier,
    AttestationsScoreOutOfRange,
    AttestationsVerifierInactive,
)
from planetserve import ModelId
from tests._stateful import ChainMachine, run_on_chain
from tests.fixtures.attest import (
    ETH,
    NEUTRAL,
    RELAY,
    SCALE,
    ceil_fraction,
    evidence,
    expected_reputation,
)
from tests.fixtures.chain import OUTSIDER, rpc
from tests.fixtures.payments import voucher

MODELS = (1, 2)
VERIFIERS = (5, 6, 7)
CLIENT = 10
ATTESTERS = (*VERIFIERS, OUTSIDER, RELAY)
TARGETS = (*MODELS, RELAY)
scores = st.one_of(st.sampled_from([0, 499_999, 500_000, SCALE, SCALE + 1]), st.integers(0, SCALE))


class AttestationMachine(ChainMachine):
    """A model of one deployment's attestations driven alongside the contract."""

    def __init__(self) -> None:
        super().__init__()
        dep = self.deployment
        assert dep.attestations_address is not None
        self.att = Attestations(self.w3, dep.attestations_address)
        self.reg = NodeRegistry(self.w3, dep.registry_address)
        self.pay = PaymentChannels(self.w3, dep.payments_address)
        for index, role, stake in [
            *((m, Role.MODEL, 3 * ETH) for m in MODELS),
            (RELAY, Role.RELAY, ETH),
            *((v, Role.VERIFIER, 2 * ETH) for v in VERIFIERS),
        ]:
            self.reg.with_account(dev_account(index)).register(
                role=role,
                endpoint=f"http://127.0.0.1:{9200 + index}",
                x25519_public_key=bytes([index + 1]) * 32,
                model_id=None if role is Role.RELAY else ModelId(bytes([7]) * 32),
                price_per_1k_tokens=1,
                stake=stake,
            )
        client = self.pay.with_account(dev_account(CLIENT))
        self.channels = {m: client.open_channel(dev_account(m).address, ETH).channel_id for m in MODELS}
        self.owed = dict.fromkeys(MODELS, 0)
        self.quorum = self.att.quorum()
        self.threshold = self.att.score_threshold()
        self.stake_fraction = self.att.stake_slash_fraction()
        self.earnings_fraction = self.att.earnings_slash_fraction()
        self.epoch_length = self.att.epoch_length()
        self.attested: set[tuple[int, int, int]] = set()
        self.tallies: dict[tuple[int, int], list[int]] = {}
        self.finalized: dict[tuple[int, int], int] = {}
        self.reputation = dict.fromkeys(MODELS, NEUTRAL)
        self.streak = dict.fromkeys(MODELS, 0)
        self.stake = dict.fromkeys(MODELS, 3 * ETH)
        self.jailed = dict.fromkeys(MODELS, False)
        self.unbonding = dict.fromkeys(VERIFIERS, False)
        self._fresh_epoch(0)  # a whole epoch ahead: no boundary between reading the epoch and mining

    def _expected_error(self, who: int, node: int, epoch: int, score: int, current: int) -> type[ContractRevert] | None:
        if score > SCALE:
            return AttestationsScoreOutOfRange
        if epoch > current:
            return AttestationsFutureEpoch
        if current - epoch > 1:
            return AttestationsEpochTooOld
        if who not in VERIFIERS:
            return AttestationsNotVerifier
        if self.unbonding[who]:
            return AttestationsVerifierInactive
        if node not in MODELS:
            return AttestationsNotModelNode
        if (node, epoch) in self.finalized:
            return AttestationsEpochFinalized
        if (who, node, epoch) in self.attested:
            return AttestationsAlreadyAttested
        return None

    @rule(who=st.sampled_from(ATTESTERS), node=st.sampled_from(TARGETS), offset=st.integers(-2, 1), score=scores)
    def attest(self, who: int, node: int, offset: int, score: int) -> None:
        current = self.att.current_epoch()
        epoch = max(0, current + offset)
        error = self._expected_error(who, node, epoch, score, current)
        address = dev_account(node).address
        handle = self.att.with_account(dev_account(who))
        if error is not None:
            try:
                handle.attest(address, epoch, score, evidence(who, node, epoch))
            except error:
                return
            raise AssertionError(f"expected {error.__name__}")
        locked_before = self.pay.balances(address).locked
        receipt = handle.attest(address, epoch, score, evidence(who, node, epoch))
        self.attested.add((who, node, epoch))
        tally = self.tallies.setdefault((node, epoch), [])
        tally.append(score)
        if len(tally) < self.quorum:
            assert receipt.events == ("AttestationSubmitted",)
            return
        ordered = sorted(tally)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) // 2
        self.finalized[(node, epoch)] = median
        failed = median < self.threshold
        self.streak[node] = self.streak[node] + 1 if failed else 0
        self.reputation[node] = expected_reputation(self.reputation[node], median, self.streak[node])
        if not failed:
            assert receipt.events == ("AttestationSubmitted", "EpochFinalized", "ReputationUpdated")
            return
        assert receipt.events[-1] == "NodePenalized"
        raw = self.w3.eth.get_transaction_receipt(receipt.tx_hash)  # type: ignore[arg-type]
        # The receipt also holds the registry's and payment contract's logs: skip those, decode ours.
        (penalty,) = self.att.contract.events.NodePenalized().process_receipt(raw, errors=DISCARD)
        stake_cut = min(max(ceil_fraction(self.stake[node], self.stake_fraction), 1), self.stake[node])
        assert penalty["args"]["stakeSlashed"] == stake_cut
        assert penalty["args"]["earningsSlashed"] <= ceil_fraction(locked_before, self.earnings_fraction)
        self.stake[node] -= stake_cut
        self.jailed[node] = True

    def _fresh_epoch(self, skip: int) -> None:
        """Move to 2 s into the epoch ``skip + 1`` after the current one (see tests.fixtures.attest.fresh_epoch)."""
        now = int(self.w3.eth.get_block("latest")["timestamp"])
        position = (now - self.att.epoch_start()) % self.epoch_length
        rpc(self.w3, "evm_increaseTime", [self.epoch_length - position + skip * self.epoch_length + 2])
        rpc(self.w3, "evm_mine", [])

    @rule(skip=st.integers(0, 1))
    def next_epoch(self, skip: int) -> None:
        self._fresh_epoch(skip)

    @rule(verifier=st.sampled_from(VERIFIERS))
    def toggle_unbonding(self, verifier: int) -> None:
        reg = self.reg.with_account(dev_account(verifier))
        if self.unbonding[verifier]:
            reg.rebond()
        else:
            reg.request_unbond()
        self.unbonding[verifier] = not self.unbonding[verifier]

    @rule(node=st.sampled_from(MODELS), amount=st.integers(1, 10**17))
    def earn(self, node: int, amount: int) -> None:
        if self.jailed[node]:
            return
        self.owed[node] += amount
        self.pay.with_account(dev_account(node)).redeem(voucher(self.pay, CLIENT, self.channels[node], self.owed[node]))

    @rule(node=st.sampled_from(MODELS))
    def unjail(self, node: int) -> None:
        if self.jailed[node]:
            self.reg.with_account(dev_account(node)).unjail()
            self.jailed[node] = False

    @invariant()
    def reputation_is_in_range_and_matches_the_model(self) -> None:
        for node in MODELS:
            record = self.att.record_of(dev_account(node).address)
            assert 0 <= record.reputation <= SCALE
            assert (record.reputation, record.failure_streak) == (self.reputation[node], self.streak[node])

    @invariant()
    def at_most_one_attestation_per_verifier_node_epoch_and_a_quorum_per_tally(self) -> None:
        for (node, epoch), tally in self.tallies.items():
            onchain = self.att.tally(dev_account(node).address, epoch)
            assert onchain.count == len(tally) <= self.quorum
            assert onchain.scores == tuple(tally)
            assert onchain.finalized == ((node, epoch) in self.finalized)
        for who, node, epoch in self.attested:
            assert self.att.has_attested(dev_account(who).address, dev_account(node).address, epoch)

    @invariant()
    def stakes_match_and_the_contract_holds_no_eth(self) -> None:
        assert self.att.balance() == 0
        for node in MODELS:
            address = dev_account(node).address
            assert self.reg.stake_of(address) == self.stake[node]
            assert self.reg.is_jailed(address) == self.jailed[node]


def test_random_attestation_sequences_keep_the_invariants(
    anvil: Anvil, chain_deployment: tuple[Deployment, Path]
) -> None:
    run_on_chain(AttestationMachine, anvil, chain_deployment[0], examples=6, steps=24)
