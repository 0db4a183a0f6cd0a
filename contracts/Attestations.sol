// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {NodeRegistry} from "./NodeRegistry.sol";
import {IEarningsSlasher} from "./interfaces/IEarningsSlasher.sol";

/// @title Attestations
/// @notice Verifier committees' verdicts on model nodes, the reputation they build, and the penalty for failing.
///
/// Time is cut into epochs of `epochLength` seconds from `epochStart`: epoch `e` is
/// `[epochStart + e * epochLength, epochStart + (e + 1) * epochLength)`. During an epoch the verifiers audit model
/// nodes off chain; each posts, for each node it audited, one attestation `(node, epoch, score, evidenceHash)` for
/// the current or the previous epoch (`MAX_EPOCH_AGE`). Scores are fixed-point with `SCALE` = 1e6 = 1.0.
///
/// Committee: every registered verifier that the registry reports active (staked at least the minimum, bonded, not
/// jailed) when it attests. The registry cannot enumerate its verifiers on chain, so the committee's size is the
/// constructor parameter `committeeSize` (how many verifiers the network runs, at most `MAX_COMMITTEE`), and the
/// quorum is `ceil(2 * committeeSize / 3)` attestations for one node and epoch. The quorum-th attestation finalizes
/// the node's epoch: the median of the quorum's scores (the mean of the two middle ones, rounded down, for an even
/// quorum) updates the node's reputation, and a median below `scoreThreshold` penalizes it. Attestations for a
/// finalized epoch revert (`AttestationsEpochFinalized`): each verdict is applied exactly once.
///
/// Reputation (fixed-point, `SCALE` = 1.0, `NEUTRAL_REPUTATION` = 0.5 for a node never rated) is an exponentially
/// weighted moving average of the medians: `r' = (r * (SCALE - w) + median * w) / SCALE` (rounded down). A passing
/// epoch uses `w = ALPHA` and clears the failure streak; a failing one increments the streak `k` and uses
/// `w = min(ALPHA * k, MAX_FAILURE_WEIGHT)`, so repeated failures pull the reputation down ever faster.
///
/// Penalty: `ceil(stake * stakeSlashFraction / SCALE)` wei of the node's registry stake (at least 1 wei, so the
/// registry always jails it) through `NodeRegistry.slash`, and `ceil(locked * earningsSlashFraction / SCALE)` of
/// its still-locked earnings through the payment contract's `slash` (skipped when that is zero). This contract
/// must hold `SLASHER_ROLE` on both.
/// @dev Bounds: a node-epoch tally holds at most `quorum <= MAX_QUORUM` scores in a fixed-size array; the median
/// sorts that many in memory. Nothing loops over storage a caller can grow. This contract holds no ETH (nothing is
/// payable). Checks, then effects (tally, reputation, events), then the two slash calls, whose actual amounts the
/// final `NodePenalized` event reports.
contract Attestations is ReentrancyGuardTransient {
    /// @dev One node's votes for one epoch. `count`, `finalized` and `median` share a slot; the scores take
    /// `ceil(MAX_QUORUM / 8)` = 3 slots (the length 22 is `MAX_QUORUM`, written as a literal because solc wants one).
    struct Tally {
        uint8 count;
        bool finalized;
        uint32 median;
        bytes32 evidenceRoot;
        uint32[22] scores;
    }

    /// @dev One node's reputation record (one slot).
    struct Record {
        uint32 reputation;
        uint32 failureStreak;
        uint64 epochsRated;
        uint64 penalties;
        bool rated;
    }

    /// @notice Fixed-point one (1.0) for scores, reputations, weights, the threshold and slash fractions.
    uint32 public constant SCALE = 1_000_000;
    /// @notice The reputation of a node never rated (0.5).
    uint32 public constant NEUTRAL_REPUTATION = 500_000;
    /// @notice The weight of a passing epoch's median, and the step of a failing one's (0.2).
    uint32 public constant ALPHA = 200_000;
    /// @notice The largest weight a failing epoch's median gets, reached at the 4th failure in a row (0.8).
    uint32 public constant MAX_FAILURE_WEIGHT = 800_000;
    /// @notice The largest committee size.
    uint32 public constant MAX_COMMITTEE = 32;
    /// @notice The largest quorum: `ceil(2 * MAX_COMMITTEE / 3)` (the length of `Tally.scores`).
    uint32 public constant MAX_QUORUM = 22;
    /// @notice How many epochs back an attestation may go: the current epoch and the previous one.
    uint256 public constant MAX_EPOCH_AGE = 1;
    /// @notice The shortest epoch, in seconds (only non-zero: tests and demos use short epochs).
    uint64 public constant MIN_EPOCH_LENGTH = 1;

    NodeRegistry private immutable _registry;
    IEarningsSlasher private immutable _payments;
    uint64 private immutable _epochStart;
    uint64 private immutable _epochLength;
    uint32 private immutable _committeeSize;
    uint32 private immutable _quorum;
    uint32 private immutable _scoreThreshold;
    uint32 private immutable _stakeSlashFraction;
    uint32 private immutable _earningsSlashFraction;

    mapping(address node => mapping(uint256 epoch => Tally tally)) private _tallies;
    mapping(address node => mapping(uint256 epoch => mapping(address verifier => bool attested))) private _attested;
    mapping(address node => Record record) private _records;

    /// @notice `verifier` scored `node` for `epoch`.
    /// @param verifier The attesting verifier's operator.
    /// @param node The model node's operator.
    /// @param epoch The epoch audited.
    /// @param score The score, fixed-point (`SCALE` = 1.0).
    /// @param evidenceHash keccak256 of the off-chain evidence (prompts, answers, log-probs, scores).
    /// @param count Attestations for this node and epoch so far, this one included.
    event AttestationSubmitted(
        address indexed verifier,
        address indexed node,
        uint256 indexed epoch,
        uint256 score,
        bytes32 evidenceHash,
        uint256 count
    );

    /// @notice `node`'s `epoch` reached quorum and its verdict was taken.
    /// @param node The model node's operator.
    /// @param epoch The epoch.
    /// @param median The median of the quorum's scores, fixed-point.
    /// @param attestations How many attestations made the quorum.
    /// @param evidenceRoot The chained hash of the quorum's attestations (see `tallyOf`).
    /// @param failed Whether the median is below `scoreThreshold` (the node is penalized).
    event EpochFinalized(
        address indexed node, uint256 indexed epoch, uint256 median, uint256 attestations, bytes32 evidenceRoot, bool failed
    );

    /// @notice `node`'s reputation moved from `previousReputation` to `newReputation` by `epoch`'s verdict.
    /// @param node The model node's operator.
    /// @param epoch The epoch whose median was applied.
    /// @param previousReputation The reputation before, fixed-point (`NEUTRAL_REPUTATION` for a first rating).
    /// @param newReputation The reputation after, fixed-point.
    /// @param failureStreak Failing epochs in a row, this one included (0 after a pass).
    event ReputationUpdated(
        address indexed node,
        uint256 indexed epoch,
        uint256 previousReputation,
        uint256 newReputation,
        uint256 failureStreak
    );

    /// @notice `node` failed `epoch` and was slashed (and jailed by the registry).
    /// @param node The model node's operator.
    /// @param epoch The failed epoch.
    /// @param stakeSlashed Stake taken by the registry, in wei.
    /// @param earningsSlashed Locked earnings taken by the payment contract, in wei.
    /// @param evidenceRoot The epoch's evidence root, passed to both slashes.
    event NodePenalized(
        address indexed node, uint256 indexed epoch, uint256 stakeSlashed, uint256 earningsSlashed, bytes32 evidenceRoot
    );

    /// @notice `account` has no verifier node in the registry.
    /// @param account The caller.
    error AttestationsNotVerifier(address account);
    /// @notice `verifier`'s node is unbonding, jailed or below the minimum stake.
    /// @param verifier The caller.
    error AttestationsVerifierInactive(address verifier);
    /// @notice `node` is not a registered model node.
    /// @param node The attested address.
    error AttestationsNotModelNode(address node);
    /// @notice `score` exceeds `maximum` (`SCALE`).
    /// @param score The rejected score.
    /// @param maximum The largest score.
    error AttestationsScoreOutOfRange(uint256 score, uint256 maximum);
    /// @notice The evidence hash is zero.
    /// @param verifier The caller.
    /// @param node The attested node.
    /// @param epoch The attested epoch.
    error AttestationsMissingEvidence(address verifier, address node, uint256 epoch);
    /// @notice `epoch` has not started yet.
    /// @param epoch The rejected epoch.
    /// @param currentEpoch The current epoch.
    error AttestationsFutureEpoch(uint256 epoch, uint256 currentEpoch);
    /// @notice `epoch` is more than `maxAge` epochs before the current one.
    /// @param epoch The rejected epoch.
    /// @param currentEpoch The current epoch.
    /// @param maxAge `MAX_EPOCH_AGE`.
    error AttestationsEpochTooOld(uint256 epoch, uint256 currentEpoch, uint256 maxAge);
    /// @notice `verifier` already attested `node` for `epoch`.
    /// @param verifier The caller.
    /// @param node The node.
    /// @param epoch The epoch.
    error AttestationsAlreadyAttested(address verifier, address node, uint256 epoch);
    /// @notice `node`'s `epoch` already reached quorum with `median`; later attestations are refused.
    /// @param node The node.
    /// @param epoch The epoch.
    /// @param median The verdict's median.
    error AttestationsEpochFinalized(address node, uint256 epoch, uint256 median);
    /// @notice A constructor argument is unusable: a zero registry or payment contract.
    /// @param registry The registry given.
    /// @param payments The payment contract given.
    error AttestationsInvalidContracts(address registry, address payments);
    /// @notice A constructor argument is unusable: the epoch length is outside `[minimum, maximum]`, where
    /// `maximum` is half the registry's verification window (so a verdict lands while earnings are still locked).
    /// @param epochLength The rejected length, in seconds.
    /// @param minimum `MIN_EPOCH_LENGTH`.
    /// @param maximum Half the registry's verification window.
    error AttestationsInvalidEpochLength(uint64 epochLength, uint64 minimum, uint64 maximum);
    /// @notice A constructor argument is unusable: the first epoch starts after the deployment block.
    /// @param epochStart The rejected start, unix seconds.
    /// @param currentTime The deployment block's timestamp.
    error AttestationsInvalidEpochStart(uint64 epochStart, uint256 currentTime);
    /// @notice A constructor argument is unusable: the committee size is outside `[1, maximum]`.
    /// @param committeeSize The rejected size.
    /// @param maximum `MAX_COMMITTEE`.
    error AttestationsInvalidCommitteeSize(uint32 committeeSize, uint32 maximum);
    /// @notice A constructor argument is unusable: the threshold exceeds `SCALE`.
    /// @param scoreThreshold The rejected threshold.
    /// @param scale `SCALE`.
    error AttestationsInvalidThreshold(uint32 scoreThreshold, uint32 scale);
    /// @notice A constructor argument is unusable: the stake fraction is outside `[1, SCALE]` (a failing node must
    /// be jailed) or the earnings fraction exceeds `SCALE`.
    /// @param stakeSlashFraction The stake fraction given.
    /// @param earningsSlashFraction The earnings fraction given.
    /// @param scale `SCALE`.
    error AttestationsInvalidSlashFraction(uint32 stakeSlashFraction, uint32 earningsSlashFraction, uint32 scale);

    /// @notice Deploy with fixed parameters; every bound is checked here, once.
    /// @param registry_ The node registry (verifier and model-node membership; stake slashing).
    /// @param payments_ The payment contract (locked-earnings slashing).
    /// @param epochStart_ Unix time epoch 0 starts (at most the deployment block's timestamp).
    /// @param epochLength_ Seconds per epoch, in `[MIN_EPOCH_LENGTH, registry.verificationWindow() / 2]`.
    /// @param committeeSize_ Verifiers in a committee, in `[1, MAX_COMMITTEE]`; the quorum is two thirds, rounded up.
    /// @param scoreThreshold_ A median below this fails the epoch, fixed-point (at most `SCALE`).
    /// @param stakeSlashFraction_ Fraction of stake slashed on a failure, fixed-point in `[1, SCALE]`.
    /// @param earningsSlashFraction_ Fraction of locked earnings slashed on a failure, fixed-point in `[0, SCALE]`.
    constructor(
        NodeRegistry registry_,
        IEarningsSlasher payments_,
        uint64 epochStart_,
        uint64 epochLength_,
        uint32 committeeSize_,
        uint32 scoreThreshold_,
        uint32 stakeSlashFraction_,
        uint32 earningsSlashFraction_
    ) {
        if (address(registry_) == address(0) || address(payments_) == address(0)) {
            revert AttestationsInvalidContracts(address(registry_), address(payments_));
        }
        uint64 maxLength = registry_.verificationWindow() / 2;
        if (epochLength_ < MIN_EPOCH_LENGTH || epochLength_ > maxLength) {
            revert AttestationsInvalidEpochLength(epochLength_, MIN_EPOCH_LENGTH, maxLength);
        }
        if (epochStart_ > block.timestamp) revert AttestationsInvalidEpochStart(epochStart_, block.timestamp);
        if (committeeSize_ == 0 || committeeSize_ > MAX_COMMITTEE) {
            revert AttestationsInvalidCommitteeSize(committeeSize_, MAX_COMMITTEE);
        }
        if (scoreThreshold_ > SCALE) revert AttestationsInvalidThreshold(scoreThreshold_, SCALE);
        if (stakeSlashFraction_ == 0 || stakeSlashFraction_ > SCALE || earningsSlashFraction_ > SCALE) {
            revert AttestationsInvalidSlashFraction(stakeSlashFraction_, earningsSlashFraction_, SCALE);
        }
        _registry = registry_;
        _payments = payments_;
        _epochStart = epochStart_;
        _epochLength = epochLength_;
        _committeeSize = committeeSize_;
        _quorum = (2 * committeeSize_ + 2) / 3;
        _scoreThreshold = scoreThreshold_;
        _stakeSlashFraction = stakeSlashFraction_;
        _earningsSlashFraction = earningsSlashFraction_;
    }

    /// @notice Attest `node`'s serving quality in `epoch` as the caller (an active verifier).
    /// @dev Emits {AttestationSubmitted}; the quorum-th attestation also emits {EpochFinalized} and
    /// {ReputationUpdated}, and on a failing median the registry's and payment contract's slash events and
    /// {NodePenalized}. A node being unbonding or jailed does not stop attestations (its stake stays slashable).
    /// @param node The model node's operator (a registered model node).
    /// @param epoch The current epoch or the previous one.
    /// @param score The score, fixed-point in `[0, SCALE]`.
    /// @param evidenceHash keccak256 of the off-chain evidence (non-zero).
    function attest(address node, uint256 epoch, uint32 score, bytes32 evidenceHash) external nonReentrant {
        if (score > SCALE) revert AttestationsScoreOutOfRange(score, SCALE);
        if (evidenceHash == bytes32(0)) revert AttestationsMissingEvidence(msg.sender, node, epoch);
        uint256 current = currentEpoch();
        if (epoch > current) revert AttestationsFutureEpoch(epoch, current);
        if (current - epoch > MAX_EPOCH_AGE) revert AttestationsEpochTooOld(epoch, current, MAX_EPOCH_AGE);
        NodeRegistry.Node memory verifierNode = _registry.getNode(msg.sender);
        if (verifierNode.registeredAt == 0 || verifierNode.role != NodeRegistry.Role.Verifier) {
            revert AttestationsNotVerifier(msg.sender);
        }
        if (!_registry.isActive(msg.sender)) revert AttestationsVerifierInactive(msg.sender);
        NodeRegistry.Node memory modelNode = _registry.getNode(node);
        if (modelNode.registeredAt == 0 || modelNode.role != NodeRegistry.Role.Model) {
            revert AttestationsNotModelNode(node);
        }
        Tally storage tally = _tallies[node][epoch];
        if (tally.finalized) revert AttestationsEpochFinalized(node, epoch, tally.median);
        if (_attested[node][epoch][msg.sender]) revert AttestationsAlreadyAttested(msg.sender, node, epoch);

        _attested[node][epoch][msg.sender] = true;
        uint8 count = tally.count;
        // count < _quorum <= MAX_QUORUM: a tally is finalized (and refused above) when it reaches the quorum.
        tally.scores[count] = score;
        tally.count = count + 1;
        bytes32 root = keccak256(abi.encode(tally.evidenceRoot, msg.sender, score, evidenceHash));
        tally.evidenceRoot = root;
        emit AttestationSubmitted(msg.sender, node, epoch, score, evidenceHash, count + 1);
        if (count + 1 == _quorum) _finalize(node, epoch, tally, count + 1, root);
    }

    /// @notice `node`'s reputation, fixed-point (`SCALE` = 1.0); `NEUTRAL_REPUTATION` for a node never rated.
    /// @param node The model node's operator.
    /// @return The reputation in `[0, SCALE]`.
    function reputationOf(address node) external view returns (uint256) {
        Record storage record = _records[node];
        return record.rated ? record.reputation : NEUTRAL_REPUTATION;
    }

    /// @notice `node`'s whole reputation record.
    /// @param node The model node's operator.
    /// @return reputation As `reputationOf`.
    /// @return failureStreak Failing epochs in a row up to its latest verdict.
    /// @return epochsRated Epochs that reached a verdict.
    /// @return penalties Epochs it was penalized for.
    function recordOf(address node)
        external
        view
        returns (uint256 reputation, uint256 failureStreak, uint256 epochsRated, uint256 penalties)
    {
        Record storage record = _records[node];
        reputation = record.rated ? record.reputation : NEUTRAL_REPUTATION;
        return (reputation, record.failureStreak, record.epochsRated, record.penalties);
    }

    /// @notice The attestations so far for `node` in `epoch`.
    /// @param node The model node's operator.
    /// @param epoch The epoch.
    /// @return count Attestations recorded (at most the quorum).
    /// @return finalized Whether the quorum was reached and the verdict applied.
    /// @return median The verdict's median (0 until finalized).
    /// @return evidenceRoot `h_n` with `h_0 = 0` and `h_i = keccak256(abi.encode(h_{i-1}, verifier_i, score_i,
    /// evidenceHash_i))` over the attestations in order.
    function tallyOf(address node, uint256 epoch)
        external
        view
        returns (uint256 count, bool finalized, uint256 median, bytes32 evidenceRoot)
    {
        Tally storage tally = _tallies[node][epoch];
        return (tally.count, tally.finalized, tally.median, tally.evidenceRoot);
    }

    /// @notice The scores recorded for `node` in `epoch`, in arrival order (at most the quorum of them).
    /// @param node The model node's operator.
    /// @param epoch The epoch.
    /// @return scores The scores, fixed-point.
    function scoresOf(address node, uint256 epoch) external view returns (uint256[] memory scores) {
        Tally storage tally = _tallies[node][epoch];
        uint256 count = tally.count;
        scores = new uint256[](count);
        for (uint256 i = 0; i < count; ++i) {
            scores[i] = tally.scores[i];
        }
    }

    /// @notice Whether `verifier` attested `node` for `epoch`.
    /// @param verifier The verifier's operator.
    /// @param node The model node's operator.
    /// @param epoch The epoch.
    /// @return True when it did.
    function hasAttested(address verifier, address node, uint256 epoch) external view returns (bool) {
        return _attested[node][epoch][verifier];
    }

    /// @notice The epoch containing the current block's timestamp.
    /// @return The epoch number.
    function currentEpoch() public view returns (uint256) {
        return (block.timestamp - _epochStart) / _epochLength;
    }

    /// @notice Unix time epoch 0 starts.
    /// @return The start.
    function epochStart() external view returns (uint64) {
        return _epochStart;
    }

    /// @notice Seconds per epoch.
    /// @return The length.
    function epochLength() external view returns (uint64) {
        return _epochLength;
    }

    /// @notice The committee size the quorum is computed from.
    /// @return The size.
    function committeeSize() external view returns (uint32) {
        return _committeeSize;
    }

    /// @notice Attestations that finalize a node's epoch: `ceil(2 * committeeSize / 3)`.
    /// @return The quorum.
    function quorum() external view returns (uint32) {
        return _quorum;
    }

    /// @notice A median below this fails the epoch, fixed-point.
    /// @return The threshold.
    function scoreThreshold() external view returns (uint32) {
        return _scoreThreshold;
    }

    /// @notice Fraction of stake slashed on a failure, fixed-point.
    /// @return The fraction.
    function stakeSlashFraction() external view returns (uint32) {
        return _stakeSlashFraction;
    }

    /// @notice Fraction of locked earnings slashed on a failure, fixed-point.
    /// @return The fraction.
    function earningsSlashFraction() external view returns (uint32) {
        return _earningsSlashFraction;
    }

    /// @notice The node registry.
    /// @return The registry.
    function registry() external view returns (NodeRegistry) {
        return _registry;
    }

    /// @notice The payment contract.
    /// @return The payment contract.
    function payments() external view returns (IEarningsSlasher) {
        return _payments;
    }

    /// @dev Take the verdict of a tally that just reached quorum: median, reputation, and the penalty if it failed.
    function _finalize(address node, uint256 epoch, Tally storage tally, uint256 count, bytes32 root) private {
        uint32 median = _median(tally, count);
        tally.finalized = true;
        tally.median = median;
        bool failed = median < _scoreThreshold;

        Record storage record = _records[node];
        uint256 previous = record.rated ? record.reputation : NEUTRAL_REPUTATION;
        uint32 streak = failed ? record.failureStreak + 1 : 0;
        uint256 weight = failed ? Math.min(uint256(ALPHA) * streak, MAX_FAILURE_WEIGHT) : ALPHA;
        // previous, median <= SCALE and weight <= SCALE, so the result is in [0, SCALE] and fits uint32.
        uint256 updated = (previous * (SCALE - weight) + uint256(median) * weight) / SCALE;
        record.reputation = uint32(updated);
        record.failureStreak = streak;
        record.epochsRated += 1;
        record.rated = true;
        if (failed) record.penalties += 1;
        emit EpochFinalized(node, epoch, median, count, root, failed);
        emit ReputationUpdated(node, epoch, previous, updated, streak);
        if (failed) _penalize(node, epoch, root);
    }

    /// @dev Slash the configured fractions of `node`'s stake and locked earnings (interactions last).
    function _penalize(address node, uint256 epoch, bytes32 root) private {
        uint256 stakeAmount = Math.mulDiv(_registry.stakeOf(node), _stakeSlashFraction, SCALE, Math.Rounding.Ceil);
        if (stakeAmount == 0) stakeAmount = 1; // a zero stake: the registry takes nothing but still jails
        (uint256 locked,,) = _payments.balancesOf(node);
        uint256 earningsAmount = Math.mulDiv(locked, _earningsSlashFraction, SCALE, Math.Rounding.Ceil);
        uint256 stakeSlashed = _registry.slash(node, stakeAmount, root);
        uint256 earningsSlashed = earningsAmount == 0 ? 0 : _payments.slash(node, earningsAmount, root);
        emit NodePenalized(node, epoch, stakeSlashed, earningsSlashed, root);
    }

    /// @dev The median of the tally's first `count` scores (1 <= count <= MAX_QUORUM), sorted in memory.
    function _median(Tally storage tally, uint256 count) private view returns (uint32) {
        uint32[] memory values = new uint32[](count);
        for (uint256 i = 0; i < count; ++i) {
            uint32 value = tally.scores[i];
            uint256 j = i;
            while (j > 0 && values[j - 1] > value) {
                values[j] = values[j - 1];
                --j;
            }
            values[j] = value;
        }
        uint256 middle = count / 2;
        if (count % 2 == 1) return values[middle];
        // Both values are <= SCALE, so their sum cannot overflow uint32.
        return (values[middle - 1] + values[middle]) / 2;
    }
}
