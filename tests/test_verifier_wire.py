"""A model node's view of an audit and of a user's request has the same shape.

Captured at the model node itself (an innermost middleware for each clove's HTTP POST, and a wrapper in front of
the production completion handler for each rebuilt request): the cloves' sizes (size classes) and HTTP header
names, the decrypted request's field set, version, voucher and seed, and its parameter ranges — for N requests a
user's ``Client`` sends (paying from its wallet, as ``ps-client`` does) and N audits a ``Verifier`` sends in one
epoch. Timing: the audit plan's send times are those of a Poisson process (a Kolmogorov–Smirnov test on the
inter-arrival times of a seeded plan passes, and the same test rejects a fixed-interval schedule), and the live
audits reached the node at their planned times.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from pathlib import Path

from node.client import Client, ClientConfig
from node.client._wallet import Wallet
from node.inference import EngineConfig, TorchEngine
from node.privacy._constants import ONION_HEADER_LEN, REQUEST_CLASSES
from tests._committee import CALIBRATION, CUSUM
from tests.fixtures.auditnet import Recorder, audit_net
from verifier._epoch import AuditPolicy, plan_epoch
from verifier._prompts import PromptDistribution, user_request
from verifier._runner import EpochReport, Verifier, VerifierConfig

#: Requests of each kind compared.
N = 8
#: Longest prompt on both sides (the tests' tiny model has 1,024 positions).
MAX_PROMPT_CHARS = 400


def ks_exponential_pvalue(samples: list[float], rate: float) -> float:
    """Two-sided one-sample Kolmogorov–Smirnov p-value of ``samples`` against Exp(``rate``) (asymptotic law, with
    Stephens' small-sample correction)."""
    xs = sorted(samples)
    n = len(xs)
    d = 0.0
    for i, x in enumerate(xs):
        cdf = 1.0 - math.exp(-rate * x)
        d = max(d, (i + 1) / n - cdf, cdf - i / n)
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    p = 2.0 * sum((1 if k % 2 else -1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, p))


def _gaps(times: list[float]) -> list[float]:
    ordered = sorted(times)
    return [b - a for a, b in itertools.pairwise(ordered)]


def test_audit_send_times_are_a_poisson_process_and_a_fixed_interval_schedule_is_not() -> None:
    nodes = [f"0x{i:040x}" for i in range(1, 6)]
    length_s, mean = 3_600, 120.0
    plan = plan_epoch(
        bytes(range(32)),
        epoch=7,
        epoch_start=1_700_000_000,
        epoch_length=length_s,
        nodes=nodes,
        policy=AuditPolicy(mean_challenges=mean, max_challenges=256),
    )
    times = [c.send_at_ms / 1000.0 for c in plan.challenges]
    assert len(times) > 400
    rate = len(times) / length_s
    # The merged audit stream's inter-arrival times are exponential with the stream's rate.
    assert ks_exponential_pvalue(_gaps(times), rate) > 0.01
    # Each node's own stream too (a node sees only its own audits).
    for node in nodes:
        own = [c.send_at_ms / 1000.0 for c in plan.for_node(node)]
        assert ks_exponential_pvalue(_gaps(own), len(own) / length_s) > 0.001
    # The same test rejects audits sent at a fixed interval (what a cron-like verifier would do) ...
    fixed = [i * length_s / len(times) for i in range(len(times))]
    assert ks_exponential_pvalue(_gaps(fixed), rate) < 1e-6
    # ... and audits bunched at the epoch's start.
    bunched = sorted(random.Random(1).uniform(0, length_s / 20) for _ in times)
    assert ks_exponential_pvalue(_gaps(bunched), rate) < 1e-6


async def test_a_model_node_sees_audits_and_user_requests_in_the_same_shape(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    recorder = Recorder()
    async with audit_net(
        tiny_model_dir, tmp_path, cheats=(None,), verifiers=1, relays=4, epoch_length=6, recorder=recorder
    ) as net:
        # N user requests, drawn from the user distribution, sent and paid by a user's Client (ps-client's path).
        distribution = PromptDistribution(max_prompt_chars=MAX_PROMPT_CHARS)
        rng = random.Random(2024)
        wallet = Wallet(net.payments(), net.user, budget_wei=10**17, deposit_wei=10**16, state_dir=tmp_path / "w")
        user_indexer = net.indexer("user")
        _, directory = net.sources(user_indexer)
        try:
            async with Client(directory, ClientConfig(models=(net.model,)), wallet=wallet) as client:
                for _ in range(N):
                    await client.complete(user_request(rng, distribution).completion_request(net.model_id))
        finally:
            wallet.close()
            user_indexer.close()
        users, user_posts = list(recorder.requests), list(recorder.posts)
        assert len(users) == N

        # N audits in one epoch from a verifier (its own wallet and payer, the same Client class).
        reference = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))
        indexer = net.indexer("verifier")
        nodes, vdirectory = net.sources(indexer)
        vwallet = Wallet(
            net.payments(),
            net.payers[0],
            budget_wei=10**17,
            deposit_wei=10**16,
            state_dir=tmp_path / "vw",
            fresh_addresses=True,
        )
        reports: list[EpochReport] = []
        arrivals: list[float] = []
        try:
            async with Client(vdirectory, ClientConfig(models=(net.model,)), wallet=vwallet) as vclient:
                verifier = Verifier(
                    VerifierConfig(
                        state_dir=tmp_path / "verifier",
                        model_dir=tiny_model_dir,
                        mean_challenges=float(N),
                        min_challenges=N,
                        max_challenges=N,
                        max_prompt_chars=MAX_PROMPT_CHARS,
                    ),
                    account=net.verifiers[0],
                    attestations=net.attestations(net.verifiers[0]),
                    nodes=nodes,
                    client=vclient,
                    engine=reference,
                    model_id=net.model_id,
                    calibration=CALIBRATION,
                    cusum=CUSUM,
                )
                recorder.on_request = lambda: arrivals.append(time.time())
                await verifier.run(1, on_epoch=reports.append)
        finally:
            vwallet.close()
            indexer.close()
            await reference.close()
        audits, audit_posts = recorder.requests[N:], recorder.posts[len(user_posts) :]
        (verdict,) = reports[0].verdicts
        # N planned; on a loaded machine an audit may time out at the verifier (it still reached the node).
        assert verdict.sent == N and N // 2 <= verdict.answered <= len(audits)

    # The decrypted request: the same keys, version, voucher and seed on every request of both kinds.
    assert {c.fields for c in audits} == {c.fields for c in users}
    assert len({c.fields for c in users}) == 1
    assert all(c.version == 2 and c.voucher and c.params["seed"] for c in users + audits)
    # Parameters within the same ranges: users' temperatures, nucleus, token and stop-string bounds.
    for key in ("temperature", "top_p"):
        assert {c.params[key] for c in audits} <= {0.0, 0.8, 1.0}
        assert {c.params[key] for c in users} <= {0.0, 0.8, 1.0}
    assert all(1 <= c.params["max_tokens"] <= 64 and c.params["stops"] <= 1 for c in users + audits)
    assert all(c.params["prompt_chars"] <= MAX_PROMPT_CHARS for c in users + audits)
    # The cloves: padded to the same request size classes, with the same HTTP header names.
    assert len(user_posts) >= 3 * N and len(audit_posts) >= 3 * N
    user_classes = {size - ONION_HEADER_LEN for size, _ in user_posts}
    audit_classes = {size - ONION_HEADER_LEN for size, _ in audit_posts}
    assert user_classes <= set(REQUEST_CLASSES) and audit_classes == user_classes
    assert {h for _, h in audit_posts} == {h for _, h in user_posts} and len({h for _, h in user_posts}) == 1
    # Timing: each audit reached the node no earlier than its plan says, and within a few seconds of it.
    record = next(iter(net.root.glob("verifier/evidence/epoch-*/*.json")), None)
    assert record is not None
    evidence = json.loads(record.read_text())
    planned = sorted(evidence["epoch_start"] + c["send_at_ms"] / 1000.0 for c in evidence["challenges"])
    assert len(planned) == N and len(arrivals) == len(audits)
    for at in arrivals:  # chain timestamps are whole seconds; an answer may take a few under load
        assert any(plan_at - 1.0 <= at <= plan_at + 6.0 for plan_at in planned)
    assert min(arrivals) >= planned[0] - 1.0
