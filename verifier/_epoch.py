"""A verifier's epoch: randomness no model node can predict or bias, and from it whom to audit, how often and when.

**The seed.** For epoch ``e`` the verifier signs, with its registered operator key, the EIP-712 message
``EpochSeed(uint256 epoch,uint256 anchorBlock,bytes32 anchorHash)`` under the domain ``{name: "PlanetServe
Verifier", version: "1", chainId, verifyingContract: <Attestations address>}``; the seed is ``keccak256`` of the
65-byte signature ``r || s || v``.

- *Nobody else can predict it*: it is a signature by a key only the verifier holds. Model nodes learn it when the
  verifier publishes its evidence, after that epoch's audits.
- *The verifier cannot bias it*: eth-account signs deterministically (RFC 6979), the message is fixed by the chain,
  and only the canonical signature is accepted (``v`` in {27, 28}, low ``s`` as EIP-2 requires: the malleated twin
  ``(r, n - s)`` would be a second valid signature, i.e. a second seed to choose from). So there is exactly one
  seed per (key, epoch, anchor), and the anchor is fixed by the chain.
- *Anyone can check it afterwards*: the evidence carries the signature; :func:`verify_epoch_seed` recovers the signer
  and :func:`verify_anchor` checks the anchor block against the chain.

**The anchor block** is the first block whose timestamp is at least the epoch's start (``epochStart + e *
epochLength``). Why by time and not by a fixed block number: epochs are defined by time in the contract, and the
number of blocks per second differs between chains (anvil mines on demand; a public chain every few seconds), so a
fixed derivation from numbers would be either wrong or unknown in advance. Why the *first* such block: it is the
earliest block nobody could know before the epoch began (its hash covers its parent and its transactions), every
verifier and checker finds the same one from chain data alone (:func:`find_anchor_block`, a binary search over the
monotone timestamps), and the verifier cannot pick among blocks. What can bias it: the producer of that block, by
withholding it (a lost block reward per try, one bit per try at most); on a chain with reorgs, wait for
``confirmations`` blocks on top before using it.

**The plan** (:func:`plan_epoch`) is a pure function of the seed, the sorted list of model nodes and
:class:`AuditPolicy`:

- *whom*: every model node (the default), or a sample of ``sample_size`` drawn without replacement with
  probabilities proportional to given weights (Efraimidis–Spirakis keys). Auditing every node every epoch is the
  default because the contract needs two thirds of the committee to attest a node's epoch for a verdict, and
  verifiers sample independently: with sampling, a node's epoch reaches quorum only when enough verifiers happened
  to pick it, and the sequential test sees a node only every ``N / k`` epochs on average, which stretches detection
  by the same factor. Sampling is for networks too large to audit whole, and it is what happens by default beyond
  :data:`MAX_NODES` model nodes: with ``sample_size`` unset and more candidates than that, the plan audits a
  uniform sample of :data:`DEFAULT_SAMPLE_SIZE` (= ``MAX_NODES``) drawn with the same seeded keys (equal weights
  unless ``weights`` are given). Why sample rather than refuse: a refusal stopped the verifier the epoch the
  registry grew past the bound, i.e. no node was audited any more; why this size: it is the most one plan holds (a
  plan of up to ``MAX_NODES * max_challenges`` challenges, the epoch's sends and evidence records bounded by it),
  and a network just past the bound is still audited almost whole (each node with probability ``MAX_NODES / N``
  per verifier and epoch, independently across verifiers, unpredictable without the seed). Only an impossible
  plan is refused: a ``sample_size`` above ``MAX_NODES`` (at :class:`AuditPolicy` construction).
- *how many*: per audited node a Poisson(``mean_challenges``) count, raised to ``min_challenges`` (so each
  audited node yields evidence and an attestation) and capped at ``max_challenges``. A random count means a node
  that somehow spotted some audits cannot conclude that the epoch's audits are over.
- *when*: given the count, send times independent and uniform over the send window ``[not_before, epoch end)`` —
  the arrival times of a Poisson process, as user arrivals are modelled (``bench/forwarding.py``); all nodes'
  challenges together form one merged Poisson stream. ``not_before`` is the anchor block's timestamp: nothing can
  be planned before the anchor exists.

Every draw comes from ``keccak256(seed || label)`` (labels named below), not from Python's ``random`` whose
algorithms may change between versions: a checker in any language re-derives the same plan, and the evidence's
challenge count and times can be compared with it (a verifier cannot drop the challenges a node answered well).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from planetserve import InvalidValue, parse_address
from verifier._errors import InvalidVerifierInput, VerifierError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3 import Web3

#: The EIP-712 domain name and version of epoch-seed messages.
SEED_DOMAIN_NAME = "PlanetServe Verifier"
SEED_DOMAIN_VERSION = "1"
#: The primary type, byte for byte.
SEED_TYPE = "EpochSeed(uint256 epoch,uint256 anchorBlock,bytes32 anchorHash)"
#: The ``EpochSeed`` struct's fields, in :data:`SEED_TYPE`'s order.
_SEED_FIELDS = (("epoch", "uint256"), ("anchorBlock", "uint256"), ("anchorHash", "bytes32"))
_UINT256 = 2**256
#: Most challenges one node can be planned per epoch (bounds the plan and the evidence record).
MAX_CHALLENGES_PER_NODE = 256
#: Most model nodes one plan audits (bounds the plan's size; the registry can hold more: they are sampled).
MAX_NODES = 10_000
#: Nodes audited per epoch when ``sample_size`` is unset and there are more than :data:`MAX_NODES` candidates: a
#: uniform sample drawn from the seed (see the module docstring).
DEFAULT_SAMPLE_SIZE = MAX_NODES
#: Most blocks :func:`find_anchor_block` reads (a binary search over 2**64 blocks needs 64).
_MAX_SEARCH_STEPS = 80

# Labels of the derivations (part of the plan's definition; a checker uses the same bytes).
_LABEL_SELECT = b"planetserve/epoch/select/"
_LABEL_COUNT = b"planetserve/epoch/count/"
_LABEL_TIME = b"planetserve/epoch/time/"
_LABEL_CHALLENGE = b"planetserve/epoch/challenge/"


class InvalidEpochSeed(VerifierError):
    """An epoch seed's signature is malformed, not canonical, or not the claimed verifier's."""

    code = "verifier_invalid_epoch_seed"

    def __init__(self, *, verifier: str, epoch: int, reason: str) -> None:
        self.verifier = verifier
        self.epoch = epoch
        self.reason = reason
        super().__init__(f"the epoch-{epoch} seed of verifier {verifier} is refused: {reason}")


class AnchorMismatch(VerifierError):
    """The anchor block a seed names is not the first block of its epoch on this chain."""

    code = "verifier_anchor_mismatch"

    def __init__(self, *, number: int, reason: str) -> None:
        self.number = number
        self.reason = reason
        super().__init__(f"anchor block {number} is refused: {reason}")


def keccak256(data: bytes) -> bytes:
    """keccak-256 (Ethereum's hash; not NIST SHA3-256) of ``data``."""
    from eth_hash.auto import keccak

    return bytes(keccak(data))


def _uint(value: int, param: str, high: int = _UINT256) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < high:
        raise InvalidVerifierInput(param, value, f"an integer in [0, {high})")
    return value


def _address(value: str, param: str) -> str:
    """``value`` checksummed by the kernel's one address parser (twice as fast as eth-utils': a plan checksums every
    candidate node), refused as ``InvalidVerifierInput`` naming ``param``."""
    if not isinstance(value, str):
        raise InvalidVerifierInput(param, value, "a 20-byte 0x address")
    try:
        return str(parse_address(value, param=param))
    except InvalidValue as exc:
        raise InvalidVerifierInput(param, value, "a 20-byte 0x address") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class AnchorBlock:
    """The block an epoch's seed is bound to: the first block with a timestamp at least the epoch's start."""

    #: Block number (>= 0).
    number: int
    #: The block's hash, 32 bytes.
    hash: bytes
    #: The block's timestamp, Unix seconds.
    timestamp: int

    def __post_init__(self) -> None:
        _uint(self.number, "anchor.number", 2**64)
        _uint(self.timestamp, "anchor.timestamp", 2**64)
        if not isinstance(self.hash, bytes) or len(self.hash) != 32:
            raise InvalidVerifierInput("anchor.hash", self.hash, "exactly 32 bytes")


class BlockSource(Protocol):
    """Reads blocks: what :func:`find_anchor_block` and :func:`verify_anchor` need of a chain."""

    def latest(self) -> AnchorBlock:
        """The chain's latest block."""

    def block(self, number: int) -> AnchorBlock | None:
        """Block ``number``, or None when the chain has no such block yet."""


class Web3Blocks:
    """A :class:`BlockSource` over a ``Web3`` connection."""

    def __init__(self, w3: Web3) -> None:
        self._w3 = w3

    @staticmethod
    def _from(block: Any) -> AnchorBlock:
        return AnchorBlock(number=int(block["number"]), hash=bytes(block["hash"]), timestamp=int(block["timestamp"]))

    def latest(self) -> AnchorBlock:
        return self._from(self._w3.eth.get_block("latest"))

    def block(self, number: int) -> AnchorBlock | None:
        from web3.exceptions import BlockNotFound

        try:
            return self._from(self._w3.eth.get_block(number))
        except BlockNotFound:
            return None


def epoch_bounds(epoch_start: int, epoch_length: int, epoch: int) -> tuple[int, int]:
    """``[start, end)`` of ``epoch`` in Unix seconds, as ``Attestations`` defines it."""
    _uint(epoch_start, "epoch_start", 2**64)
    if not isinstance(epoch_length, int) or isinstance(epoch_length, bool) or epoch_length < 1:
        raise InvalidVerifierInput("epoch_length", epoch_length, "a positive number of seconds")
    _uint(epoch, "epoch", 2**64)
    start = epoch_start + epoch * epoch_length
    return start, start + epoch_length


def find_anchor_block(source: BlockSource, not_before: int, *, confirmations: int = 0) -> AnchorBlock | None:
    """The first block with ``timestamp >= not_before``, once ``confirmations`` blocks are mined on top of it; None
    while there is none yet (wait and ask again).

    A binary search over block numbers (timestamps never decrease along a chain): about ``log2(head)`` reads.
    """
    _uint(not_before, "not_before", 2**64)
    if confirmations < 0:
        raise InvalidVerifierInput("confirmations", confirmations, "at least 0")
    head = source.latest()
    if head.timestamp < not_before:
        return None
    low, high = 0, head.number  # invariant: block ``high`` has timestamp >= not_before
    found = head
    for _ in range(_MAX_SEARCH_STEPS):
        if low >= high:
            break
        middle = (low + high) // 2
        block = source.block(middle)
        if block is None:
            raise AnchorMismatch(number=middle, reason="the chain lost a block below its head while searched")
        if block.timestamp >= not_before:
            high, found = middle, block
        else:
            low = middle + 1
    if found.number != high:
        block = source.block(high)
        if block is None:
            raise AnchorMismatch(number=high, reason="the chain lost a block below its head while searched")
        found = block
    if head.number - found.number < confirmations:
        return None
    return found


def verify_anchor(source: BlockSource, anchor: AnchorBlock, not_before: int) -> None:
    """Check that ``anchor`` is on this chain and is the first block with ``timestamp >= not_before``.

    Raises :class:`AnchorMismatch` naming what differs.
    """
    on_chain = source.block(anchor.number)
    if on_chain is None:
        raise AnchorMismatch(number=anchor.number, reason="no such block on this chain")
    if on_chain.hash != anchor.hash:
        raise AnchorMismatch(number=anchor.number, reason="its hash differs on this chain")
    if on_chain.timestamp != anchor.timestamp or anchor.timestamp < not_before:
        raise AnchorMismatch(number=anchor.number, reason=f"its timestamp is not at or after {not_before}")
    if anchor.number > 0:
        parent = source.block(anchor.number - 1)
        if parent is not None and parent.timestamp >= not_before:
            raise AnchorMismatch(number=anchor.number, reason="an earlier block already starts the epoch")


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochSeed:
    """A verifier's signed seed for one epoch. Secret until the verifier publishes its evidence: the repr hides it."""

    #: EIP-155 chain id (> 0).
    chain_id: int
    #: The ``Attestations`` contract (checksummed on construction): the seed is for its epochs.
    attestations: str
    #: The verifier's operator address (checksummed on construction): the signer.
    verifier: str
    #: The epoch number.
    epoch: int
    #: The block the seed is bound to.
    anchor: AnchorBlock
    #: 65 bytes ``r || s || v`` (canonical: low ``s``, ``v`` in {27, 28}).
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.chain_id, int) or isinstance(self.chain_id, bool) or not 0 < self.chain_id < _UINT256:
            raise InvalidVerifierInput("chain_id", self.chain_id, "a positive integer")
        object.__setattr__(self, "attestations", _address(self.attestations, "attestations"))
        object.__setattr__(self, "verifier", _address(self.verifier, "verifier"))
        _uint(self.epoch, "epoch", 2**64)
        if not isinstance(self.signature, bytes) or len(self.signature) != 65:
            raise InvalidVerifierInput("signature", "<redacted>", "exactly 65 bytes r || s || v")

    @property
    def seed(self) -> bytes:
        """``keccak256(signature)``: the 32 bytes every draw of the epoch derives from."""
        return keccak256(self.signature)

    def typed_data(self) -> dict[str, Any]:
        """The EIP-712 message the signature is over (``eth_account.messages.encode_typed_data(full_message=…)``)."""
        return seed_typed_data(
            chain_id=self.chain_id, attestations=self.attestations, epoch=self.epoch, anchor=self.anchor
        )

    def to_json(self) -> dict[str, Any]:
        """The seed as evidence carries it (``verifier._evidence.seed_from_record`` reads it back): everything a
        checker needs to verify the signature and re-derive the plan. Publish it only after the epoch's audits."""
        return {
            "chain_id": self.chain_id,
            "attestations": self.attestations,
            "verifier": self.verifier,
            "epoch": self.epoch,
            "anchor": {
                "number": self.anchor.number,
                "hash": "0x" + self.anchor.hash.hex(),
                "timestamp": self.anchor.timestamp,
            },
            "signature": "0x" + self.signature.hex(),
            "seed": "0x" + self.seed.hex(),
        }

    def __repr__(self) -> str:
        return f"EpochSeed(epoch={self.epoch}, verifier={self.verifier}, anchor={self.anchor.number}, seed=<redacted>)"

    __str__ = __repr__


def seed_typed_data(*, chain_id: int, attestations: str, epoch: int, anchor: AnchorBlock) -> dict[str, Any]:
    """The EIP-712 ``EpochSeed`` message for ``epoch`` on ``attestations`` at ``chain_id``, bound to ``anchor``."""
    from ledger._eip712 import typed_message  # eth-account and web3: only when a seed is signed or checked

    return typed_message(
        name=SEED_DOMAIN_NAME,
        version=SEED_DOMAIN_VERSION,
        chain_id=chain_id,
        verifying_contract=_address(attestations, "attestations"),
        primary_type="EpochSeed",
        fields=_SEED_FIELDS,
        message={"epoch": epoch, "anchorBlock": anchor.number, "anchorHash": anchor.hash},
    )


def sign_epoch_seed(
    account: LocalAccount, *, chain_id: int, attestations: str, epoch: int, anchor: AnchorBlock
) -> EpochSeed:
    """The verifier ``account``'s seed for ``epoch``: deterministic (RFC 6979), so signing again gives the same."""
    from ledger._eip712 import sign_typed

    message = seed_typed_data(chain_id=chain_id, attestations=attestations, epoch=epoch, anchor=anchor)
    seed = EpochSeed(
        chain_id=chain_id,
        attestations=attestations,
        verifier=account.address,
        epoch=epoch,
        anchor=anchor,
        signature=sign_typed(account, message),
    )
    verify_epoch_seed(seed)  # eth-account emits low-s, v in {27, 28}; refuse to go on if that ever changes
    return seed


def verify_epoch_seed(seed: EpochSeed) -> None:
    """Check that ``seed.signature`` is the canonical signature of ``seed.verifier`` over its ``EpochSeed`` message.

    Raises :class:`InvalidEpochSeed` naming the reason (never the signature).
    """
    from ledger._eip712 import recover_typed_signer, signature_flaw

    flaw = signature_flaw(seed.signature)
    if flaw is not None:
        raise InvalidEpochSeed(verifier=seed.verifier, epoch=seed.epoch, reason=flaw)
    signer = recover_typed_signer(seed.typed_data(), seed.signature)
    if signer is None:
        raise InvalidEpochSeed(verifier=seed.verifier, epoch=seed.epoch, reason="not a valid signature")
    if signer != seed.verifier:
        raise InvalidEpochSeed(verifier=seed.verifier, epoch=seed.epoch, reason="signed by another key")


# -- the plan ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditPolicy:
    """How much a verifier audits per epoch (see the module docstring for why these defaults)."""

    #: Mean challenges per audited node per epoch (Poisson), in (0, MAX_CHALLENGES_PER_NODE].
    mean_challenges: float = 4.0
    #: Fewest challenges an audited node gets (so each yields evidence and an attestation), in [0, max_challenges].
    min_challenges: int = 1
    #: Most challenges an audited node gets, in [1, MAX_CHALLENGES_PER_NODE].
    max_challenges: int = 32
    #: Nodes audited per epoch, in [0, MAX_NODES]; None (the default) audits every model node while there are at
    #: most ``MAX_NODES``, and a seeded uniform sample of ``DEFAULT_SAMPLE_SIZE`` of them beyond.
    sample_size: int | None = None

    def __post_init__(self) -> None:
        mean = self.mean_challenges
        if not isinstance(mean, (int, float)) or isinstance(mean, bool) or not 0 < mean <= MAX_CHALLENGES_PER_NODE:
            raise InvalidVerifierInput("mean_challenges", mean, f"in (0, {MAX_CHALLENGES_PER_NODE}]")
        _uint(self.max_challenges, "max_challenges", MAX_CHALLENGES_PER_NODE + 1)
        if self.max_challenges < 1:
            raise InvalidVerifierInput("max_challenges", self.max_challenges, "at least 1")
        _uint(self.min_challenges, "min_challenges", self.max_challenges + 1)
        if self.sample_size is not None:
            _uint(self.sample_size, "sample_size", MAX_NODES + 1)

    def to_json(self) -> dict[str, Any]:
        """The policy as evidence carries it (what a checker re-derives the plan with)."""
        return {
            "mean_challenges": float(self.mean_challenges),
            "min_challenges": self.min_challenges,
            "max_challenges": self.max_challenges,
            "sample_size": self.sample_size,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedChallenge:
    """One challenge of the plan: to whom, when, and the key its prompt and parameters derive from."""

    #: The audited model node (checksummed operator address).
    node: str
    #: Position among this node's challenges this epoch, from 0 (in time order).
    index: int
    #: When to send it, milliseconds after the epoch's start (integer: exact in JSON and in every language).
    send_at_ms: int
    #: ``keccak256(LABEL_CHALLENGE || seed || node || index)``: what ``verifier._prompts`` derives the challenge from.
    key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochPlan:
    """What a verifier does in one epoch, derived from its seed alone (plus the node list and policy)."""

    #: The epoch number.
    epoch: int
    #: The epoch's start, Unix seconds.
    epoch_start: int
    #: Seconds per epoch.
    epoch_length: int
    #: Every node audited this epoch, sorted by address.
    audited: tuple[str, ...]
    #: Every challenge of the epoch, in send order (ties by node, then index).
    challenges: tuple[PlannedChallenge, ...]
    #: How many distinct model nodes the plan was drawn from (>= ``len(audited)``; 0: not recorded).
    candidates: int = 0
    #: The challenges per node, for :meth:`for_node` (built once: a linear scan per node was quadratic in the plan,
    #: minutes for a 10,000-node plan).
    _by_node: dict[str, tuple[PlannedChallenge, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_node: dict[str, list[PlannedChallenge]] = {}
        for challenge in self.challenges:
            by_node.setdefault(challenge.node, []).append(challenge)
        object.__setattr__(self, "_by_node", {node: tuple(mine) for node, mine in by_node.items()})

    @property
    def sampled(self) -> bool:
        """Whether some candidate is not audited this epoch (an explicit ``sample_size`` or the default beyond
        ``MAX_NODES``)."""
        return self.candidates > len(self.audited)

    def for_node(self, node: str) -> tuple[PlannedChallenge, ...]:
        """The challenges planned for ``node``, in time order."""
        return self._by_node.get(_address(node, "node"), ())


def _draw(seed: bytes, label: bytes, *parts: bytes) -> int:
    """A uniform 256-bit integer: ``keccak256(label || seed || parts...)``."""
    return int.from_bytes(keccak256(label + seed + b"".join(parts)), "big")


def _unit(value: int) -> float:
    """The top 53 bits of a 256-bit draw as a float in [0, 1) (exact: every such float is representable)."""
    return (value >> 203) / float(1 << 53)


def _poisson(u: float, mean: float, cap: int) -> int:
    """The Poisson(``mean``) quantile of ``u`` (inversion; at most ``cap``)."""
    probability = math.exp(-mean)
    cumulative = probability
    count = 0
    while u >= cumulative and count < cap:
        count += 1
        probability *= mean / count
        cumulative += probability
    return count


def _node_bytes(node: str) -> bytes:
    return bytes.fromhex(node[2:])


def plan_epoch(
    seed: bytes,
    *,
    epoch: int,
    epoch_start: int,
    epoch_length: int,
    nodes: Sequence[str],
    policy: AuditPolicy | None = None,
    not_before: int | None = None,
    weights: Mapping[str, float] | None = None,
) -> EpochPlan:
    """The epoch's audit plan from ``seed`` (an :attr:`EpochSeed.seed`): whom, how many challenges, and when.

    ``nodes``: the model nodes that may be audited (any order; duplicates are one node). ``not_before``: Unix time
    before which nothing is sent (the anchor block's timestamp; default the epoch's start). ``weights``: relative
    audit weights for sampling (default equal; ignored when every node is audited).

    Beyond :data:`MAX_NODES` candidates with ``policy.sample_size`` unset, the plan samples
    :data:`DEFAULT_SAMPLE_SIZE` of them (:attr:`EpochPlan.sampled` says so). The candidate list itself is not
    bounded here: it is the caller's registry view, already in memory, and the work is ``O(n log n)`` in it; the
    plan is bounded by ``MAX_NODES``.
    """
    if not isinstance(seed, bytes) or len(seed) != 32:
        raise InvalidVerifierInput("seed", "<redacted>", "exactly 32 bytes")
    policy = policy or AuditPolicy()
    start, end = epoch_bounds(epoch_start, epoch_length, epoch)
    first = start if not_before is None else max(start, _uint(not_before, "not_before", 2**64))
    unique = sorted({_address(n, "nodes[]") for n in nodes})
    size = policy.sample_size
    if size is None and len(unique) > MAX_NODES:
        size = DEFAULT_SAMPLE_SIZE
    audited = unique
    if size is not None and size < len(unique):
        keyed: list[tuple[float, str]] = []
        for node in unique:
            weight = 1.0 if weights is None else float(weights.get(node, 1.0))
            if not weight > 0 or math.isinf(weight):
                raise InvalidVerifierInput(f"weights[{node}]", weight, "a positive finite number")
            u = _unit(_draw(seed, _LABEL_SELECT, _node_bytes(node)))
            # Efraimidis–Spirakis: the k smallest -ln(u)/w are a weighted sample without replacement.
            keyed.append((-math.log1p(-u) / weight, node))
        audited = sorted(node for _, node in heapq.nsmallest(size, keyed))
    begin_ms, span_ms = (first - start) * 1000, (end - first) * 1000
    challenges: list[PlannedChallenge] = []
    for node in audited:
        raw = _node_bytes(node)
        count = _poisson(_unit(_draw(seed, _LABEL_COUNT, raw)), policy.mean_challenges, policy.max_challenges)
        count = max(count, policy.min_challenges) if span_ms > 0 else 0
        times = sorted(
            begin_ms + ((_draw(seed, _LABEL_TIME, raw, i.to_bytes(4, "big")) * span_ms) >> 256) for i in range(count)
        )
        challenges += [
            PlannedChallenge(
                node=node,
                index=i,
                send_at_ms=at,
                key=keccak256(_LABEL_CHALLENGE + seed + raw + i.to_bytes(4, "big")),
            )
            for i, at in enumerate(times)
        ]
    challenges.sort(key=lambda c: (c.send_at_ms, c.node, c.index))
    return EpochPlan(
        epoch=epoch,
        epoch_start=start,
        epoch_length=epoch_length,
        audited=tuple(audited),
        challenges=tuple(challenges),
        candidates=len(unique),
    )
