"""The verifier's epoch: the signed seed (deterministic, the verifier's only, checkable, canonical), the anchor block
found on a real anvil, and the plan drawn from the seed (everyone audited, Poisson counts, uniform send times,
weighted sampling), independent across verifiers and anchors."""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from ledger import dev_account
from ledger._eip712 import SECP256K1_N
from tests.fixtures.chain import ChainEnv
from verifier._epoch import (
    DEFAULT_SAMPLE_SIZE,
    MAX_NODES,
    AnchorBlock,
    AnchorMismatch,
    AuditPolicy,
    EpochSeed,
    InvalidEpochSeed,
    Web3Blocks,
    epoch_bounds,
    find_anchor_block,
    keccak256,
    plan_epoch,
    sign_epoch_seed,
    verify_anchor,
    verify_epoch_seed,
)
from verifier._errors import InvalidVerifierInput
from verifier._runner import EpochPlanner, VerifierConfig

CONTRACT = "0x" + "ab" * 20
CHAIN_ID = 31337
NODES: list[str] = [str(dev_account(i).address) for i in range(1, 9)]


def _anchor(n: int = 7) -> AnchorBlock:
    return AnchorBlock(number=n, hash=keccak256(n.to_bytes(8, "big")), timestamp=1_000 + n)


def _seed(verifier: int = 5, epoch: int = 3, anchor: AnchorBlock | None = None) -> EpochSeed:
    return sign_epoch_seed(
        dev_account(verifier), chain_id=CHAIN_ID, attestations=CONTRACT, epoch=epoch, anchor=anchor or _anchor()
    )


def _bits(data: bytes) -> list[int]:
    return [(byte >> i) & 1 for byte in data for i in range(8)]


def test_the_seed_is_deterministic_and_is_keccak_of_the_verifiers_signature() -> None:
    first, again = _seed(), _seed()
    assert first.signature == again.signature and first.seed == again.seed  # RFC 6979: no nonce to grind
    assert first.seed == keccak256(first.signature) and len(first.signature) == 65
    signable = encode_typed_data(full_message=first.typed_data())
    assert Account.recover_message(signable, signature=first.signature) == dev_account(5).address
    verify_epoch_seed(first)
    # Private until published: neither the repr nor str shows the signature or the seed.
    for shown in (repr(first), str(first)):
        assert first.signature.hex() not in shown and first.seed.hex() not in shown


def test_seeds_of_other_verifiers_epochs_anchors_and_contracts_differ_and_look_independent() -> None:
    seeds = {_seed(v, e, _anchor(n)).seed for v in (5, 6) for e in (3, 4) for n in (7, 8)}
    other_contract = sign_epoch_seed(
        dev_account(5), chain_id=CHAIN_ID, attestations="0x" + "cd" * 20, epoch=3, anchor=_anchor()
    ).seed
    other_chain = sign_epoch_seed(dev_account(5), chain_id=1, attestations=CONTRACT, epoch=3, anchor=_anchor()).seed
    assert len(seeds | {other_contract, other_chain}) == 10
    # Across 64 anchors the seed bits are balanced and two verifiers' seeds agree on half their bits, as for
    # independent uniform strings (each bound: more than 6 standard deviations away would fail).
    a = [_seed(5, 3, _anchor(n)).seed for n in range(64)]
    b = [_seed(6, 3, _anchor(n)).seed for n in range(64)]
    ones = sum(sum(_bits(s)) for s in a)
    assert abs(ones - 64 * 128) < 6 * math.sqrt(64 * 256 / 4)
    agree = sum(x == y for s, t in zip(a, b, strict=True) for x, y in zip(_bits(s), _bits(t), strict=True))
    assert abs(agree - 64 * 128) < 6 * math.sqrt(64 * 256 / 4)


def test_a_seed_is_refused_when_claimed_for_another_verifier_epoch_anchor_or_in_its_malleated_form() -> None:
    good = _seed()
    for change in (
        {"verifier": dev_account(6).address},
        {"epoch": 4},
        {"anchor": _anchor(8)},
        {"chain_id": 1},
    ):
        with pytest.raises(InvalidEpochSeed, match="signed by another key"):
            verify_epoch_seed(dataclasses.replace(good, **change))
    r, s, v = good.signature[:32], int.from_bytes(good.signature[32:64], "big"), good.signature[64]
    # The malleated twin (r, n - s, v ^ 1) recovers the same signer but would be a second seed: refused.
    twin = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])
    assert Account.recover_message(encode_typed_data(full_message=good.typed_data()), signature=twin) == good.verifier
    with pytest.raises(InvalidEpochSeed, match="EIP-2"):
        verify_epoch_seed(dataclasses.replace(good, signature=twin))
    with pytest.raises(InvalidEpochSeed, match="v must be"):
        verify_epoch_seed(dataclasses.replace(good, signature=good.signature[:64] + bytes([v - 27])))
    # r in range but the x of no curve point (5**3 + 7 is not a square mod p): no key recovers from it.
    with pytest.raises(InvalidEpochSeed, match="not a valid signature"):
        verify_epoch_seed(dataclasses.replace(good, signature=(5).to_bytes(32, "big") + good.signature[32:]))
    with pytest.raises(InvalidVerifierInput):
        dataclasses.replace(good, signature=good.signature[:64])


def test_the_anchor_is_the_first_block_at_or_after_the_epoch_start_on_a_real_chain(chain: ChainEnv) -> None:
    blocks = Web3Blocks(chain.w3)
    for _ in range(3):
        chain.advance(10)
    boundary = chain.now() + 25
    assert find_anchor_block(blocks, boundary) is None  # not mined yet: wait
    chain.advance(10)
    assert find_anchor_block(blocks, boundary) is None  # still before the boundary
    chain.advance(20)
    first = blocks.latest()
    assert first.timestamp >= boundary
    for _ in range(4):
        chain.advance(5)
    found = find_anchor_block(blocks, boundary)
    assert found == first
    verify_anchor(blocks, found, boundary)
    assert find_anchor_block(blocks, boundary, confirmations=5) is None  # only 4 blocks on top of it
    assert find_anchor_block(blocks, boundary, confirmations=4) == first
    later = blocks.block(first.number + 1)
    assert later is not None
    with pytest.raises(AnchorMismatch, match="an earlier block already starts the epoch"):
        verify_anchor(blocks, later, boundary)
    with pytest.raises(AnchorMismatch, match="hash differs"):
        verify_anchor(blocks, AnchorBlock(number=first.number, hash=bytes(32), timestamp=first.timestamp), boundary)
    with pytest.raises(AnchorMismatch, match="no such block"):
        verify_anchor(blocks, AnchorBlock(number=10**9, hash=bytes(32), timestamp=first.timestamp), boundary)
    # Everyone finds the same block: a fresh source over the same chain, and one on the block before it.
    assert find_anchor_block(Web3Blocks(chain.w3), boundary) == first
    parent = blocks.block(first.number - 1)
    assert parent is not None and find_anchor_block(blocks, parent.timestamp) == parent


def test_the_plan_audits_every_node_with_poisson_counts_and_uniform_times_inside_the_send_window() -> None:
    policy = AuditPolicy(mean_challenges=4.0, min_challenges=0, max_challenges=64)
    start, end = epoch_bounds(1_000, 600, 5)
    counts: list[int] = []
    offsets: list[float] = []
    for n in range(150):
        seed = keccak256(b"plan" + n.to_bytes(4, "big"))
        plan = plan_epoch(
            seed, epoch=5, epoch_start=1_000, epoch_length=600, nodes=NODES, policy=policy, not_before=start + 60
        )
        assert plan == plan_epoch(
            seed,
            epoch=5,
            epoch_start=1_000,
            epoch_length=600,
            nodes=list(reversed(NODES)) + NODES[:2],
            policy=policy,
            not_before=start + 60,
        )  # pure: the node list's order and duplicates do not matter
        assert plan.audited == tuple(sorted(NODES)) and plan.epoch_start == start
        times = [c.send_at_ms for c in plan.challenges]
        assert times == sorted(times)
        assert all(60_000 <= t < (end - start) * 1000 for t in times)
        for node in NODES:
            mine = plan.for_node(node)
            counts.append(len(mine))
            assert [c.index for c in mine] == list(range(len(mine)))
            offsets += [(c.send_at_ms - 60_000) / 540_000 for c in mine]
        assert len({c.key for c in plan.challenges}) == len(plan.challenges)
    # Poisson(4): mean and variance 4 (1,200 counts: standard error of the mean 0.058).
    assert abs(statistics.fmean(counts) - 4.0) < 0.3
    assert 3.3 < statistics.variance(counts) < 4.8
    # Uniform times: Kolmogorov–Smirnov distance well under the 0.1% critical value 1.95 / sqrt(n).
    offsets.sort()
    ks = max(max(abs((i + 1) / len(offsets) - x), abs(i / len(offsets) - x)) for i, x in enumerate(offsets))
    assert ks < 1.95 / math.sqrt(len(offsets))


def test_min_and_max_challenges_bound_every_audited_node() -> None:
    policy = AuditPolicy(mean_challenges=0.5, min_challenges=2, max_challenges=3)
    for n in range(40):
        plan = plan_epoch(keccak256(bytes([n])), epoch=0, epoch_start=0, epoch_length=60, nodes=NODES, policy=policy)
        assert all(2 <= len(plan.for_node(node)) <= 3 for node in NODES)
    # Nothing can be sent once the epoch is over (the anchor came too late).
    late = plan_epoch(keccak256(b"x"), epoch=0, epoch_start=0, epoch_length=60, nodes=NODES, not_before=60)
    assert late.challenges == ()


def test_sampling_picks_k_nodes_uniformly_or_by_weight() -> None:
    policy = AuditPolicy(sample_size=2)
    picked = dict.fromkeys(NODES, 0)
    weighted = dict.fromkeys(NODES, 0)
    heavy = NODES[0]
    for n in range(400):
        seed = keccak256(b"sample" + n.to_bytes(4, "big"))
        plan = plan_epoch(seed, epoch=1, epoch_start=0, epoch_length=60, nodes=NODES, policy=policy)
        assert len(plan.audited) == 2 and {c.node for c in plan.challenges} <= set(plan.audited)
        for node in plan.audited:
            picked[node] += 1
        plan = plan_epoch(
            seed, epoch=1, epoch_start=0, epoch_length=60, nodes=NODES, policy=policy, weights={heavy: 8.0}
        )
        for node in plan.audited:
            weighted[node] += 1
    # Uniform: each node in 2/8 of 400 epochs = 100 (binomial sd 8.7).
    assert all(60 < count < 140 for count in picked.values()), picked
    assert weighted[heavy] > 300 and max(v for k, v in weighted.items() if k != heavy) < 110


def test_two_verifiers_plans_for_one_epoch_are_independent() -> None:
    anchor = _anchor()
    first = plan_epoch(_seed(5, 3, anchor).seed, epoch=3, epoch_start=0, epoch_length=3_600, nodes=NODES)
    second = plan_epoch(_seed(6, 3, anchor).seed, epoch=3, epoch_start=0, epoch_length=3_600, nodes=NODES)
    assert [c.send_at_ms for c in first.challenges] != [c.send_at_ms for c in second.challenges]
    assert not {c.key for c in first.challenges} & {c.key for c in second.challenges}


def test_bad_inputs_are_refused_with_the_parameter_named() -> None:
    cases: tuple[tuple[dict[str, int], str], ...] = (
        ({"mean_challenges": 0}, "mean_challenges"),
        ({"max_challenges": 0}, "max_challenges"),
        ({"min_challenges": 9, "max_challenges": 8}, "min_challenges"),
        ({"sample_size": -1}, "sample_size"),
    )
    for kwargs, param in cases:
        with pytest.raises(InvalidVerifierInput) as info:
            AuditPolicy(**kwargs)
        assert info.value.param == param
    with pytest.raises(InvalidVerifierInput, match="seed"):
        plan_epoch(b"short", epoch=0, epoch_start=0, epoch_length=60, nodes=NODES)
    with pytest.raises(InvalidVerifierInput, match="nodes"):
        plan_epoch(bytes(32), epoch=0, epoch_start=0, epoch_length=60, nodes=["not-an-address"])
    with pytest.raises(InvalidVerifierInput, match="epoch_length"):
        epoch_bounds(0, 0, 1)


def test_the_signed_digest_and_the_plan_follow_the_documented_formulas_written_out_independently() -> None:
    """docs/verification.md "Sampling and evidence", re-derived here without ``verifier._epoch``'s helpers: the
    EIP-712 digest by hand (type hashes, domain separator, ``\\x19\\x01``), the signer recovered with eth-keys, and
    the plan's counts, times and keys from the keccak draws."""
    from eth_abi.abi import encode
    from eth_hash.auto import keccak
    from eth_keys.datatypes import Signature

    anchor = _anchor(9)
    seed = _seed(7, 11, anchor)
    domain_type = b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    domain = keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [keccak(domain_type), keccak(b"PlanetServe Verifier"), keccak(b"1"), CHAIN_ID, CONTRACT],
        )
    )
    struct = keccak(
        encode(
            ["bytes32", "uint256", "uint256", "bytes32"],
            [
                keccak(b"EpochSeed(uint256 epoch,uint256 anchorBlock,bytes32 anchorHash)"),
                11,
                anchor.number,
                anchor.hash,
            ],
        )
    )
    digest = keccak(b"\x19\x01" + domain + struct)
    r, s, v = seed.signature[:32], seed.signature[32:64], seed.signature[64]
    signature = Signature(vrs=(v - 27, int.from_bytes(r, "big"), int.from_bytes(s, "big")))
    assert signature.recover_public_key_from_msg_hash(digest).to_checksum_address() == dev_account(7).address
    assert seed.seed == keccak(seed.signature)

    policy = AuditPolicy(mean_challenges=3.0, min_challenges=1, max_challenges=9)
    start, length, not_before = 5_000, 900, 5_000 + 30
    plan = plan_epoch(
        seed.seed, epoch=0, epoch_start=start, epoch_length=length, nodes=NODES, policy=policy, not_before=not_before
    )
    begin_ms, span_ms = 30_000, (length - 30) * 1000
    expected = []
    for node in sorted(NODES):
        raw = bytes.fromhex(node[2:])
        u = (int.from_bytes(keccak(b"planetserve/epoch/count/" + seed.seed + raw), "big") >> 203) / 2.0**53
        count, term, total = 0, math.exp(-3.0), math.exp(-3.0)
        while u >= total and count < 9:
            count += 1
            term *= 3.0 / count
            total += term
        count = max(count, 1)
        draws = [keccak(b"planetserve/epoch/time/" + seed.seed + raw + i.to_bytes(4, "big")) for i in range(count)]
        times = sorted(begin_ms + (int.from_bytes(d, "big") * span_ms >> 256) for d in draws)
        for i, at in enumerate(times):
            key = keccak(b"planetserve/epoch/challenge/" + seed.seed + raw + i.to_bytes(4, "big"))
            expected.append((at, node, i, key))
    assert [(c.send_at_ms, c.node, c.index, c.key) for c in plan.challenges] == sorted(expected)


#: A registry view twice the size one plan audits: the verifier must keep auditing, by a seeded sample.
LARGE_VIEW = 2 * MAX_NODES


async def test_a_registry_past_the_plan_bound_is_audited_by_a_seeded_uniform_sample_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Synthetic registry view of 20,000 model nodes (no chain): the verifier's planner no longer refuses it (which
    stopped the verifier) but audits ``DEFAULT_SAMPLE_SIZE`` of them, drawn from the epoch seed: the same plan for
    the same seed, another for another epoch, no part of the address space favoured; it logs that once, not every
    epoch. Only an impossible plan is refused: a sample larger than one plan holds."""
    view = ["0x" + keccak256(i.to_bytes(4, "big"))[:20].hex() for i in range(LARGE_VIEW)]
    ordered = sorted(view)  # lowercase hex: its lower half is the lower half of the address space
    lower_half = set(ordered[: LARGE_VIEW // 2])
    # One challenge per audited node: the plan's cost here is the sampling, not 40,000 send times.
    planner = EpochPlanner(VerifierConfig(state_dir=tmp_path, model_dir=tmp_path, max_challenges=1))
    caplog.set_level(logging.INFO, logger="verifier._runner")
    plans = []
    for epoch in (3, 4):
        seed = _seed(epoch=epoch)
        plan = await planner.plan(seed, epoch=epoch, epoch_start=0, epoch_length=3_600, nodes=view)
        plans.append(plan)
        assert plan.sampled and plan.candidates == LARGE_VIEW
        assert len(plan.audited) == len(set(plan.audited)) == DEFAULT_SAMPLE_SIZE
        audited = {node.lower() for node in plan.audited}
        assert list(plan.audited) == sorted(plan.audited) and audited <= set(view)
        assert {c.node for c in plan.challenges} == set(plan.audited)
        assert len(plan.challenges) == DEFAULT_SAMPLE_SIZE
        assert all(len(plan.for_node(node)) == 1 for node in plan.audited[:50])
        # Unbiased: 10,000 of 20,000 drawn uniformly put 5,000 in the lower half of the addresses (hypergeometric
        # sd 35; 6 sd allowed).
        assert abs(len(lower_half & audited) - DEFAULT_SAMPLE_SIZE // 2) < 6 * 36
    first, second = plans
    # Unpredictable from one epoch to the next: two independent halves share 5,000 nodes (sd 35).
    assert abs(len(set(first.audited) & set(second.audited)) - DEFAULT_SAMPLE_SIZE // 2) < 6 * 36
    # Pure: the same seed and view give the same sample (any checker re-derives it), in any order.
    again = plan_epoch(
        _seed(epoch=3).seed,
        epoch=3,
        epoch_start=0,
        epoch_length=3_600,
        nodes=list(reversed(view)),
        policy=planner.policy,
        not_before=_anchor().timestamp,
    )
    assert again.audited == first.audited and again.challenges == first.challenges
    told = [r for r in caplog.records if "uniform sample" in r.getMessage()]
    assert len(told) == 1 and told[0].levelno == logging.WARNING
    # A plan larger than one plan holds is refused, at start (the verifier never gets to run into it).
    with pytest.raises(InvalidVerifierInput) as refused:
        AuditPolicy(sample_size=MAX_NODES + 1)
    assert refused.value.param == "sample_size"
    with pytest.raises(InvalidVerifierInput) as refused:
        VerifierConfig(state_dir=tmp_path, model_dir=tmp_path, sample_size=MAX_NODES + 1)
    assert refused.value.param == "sample_size"
