"""A committee of verifiers over an :func:`tests.fixtures.auditnet.audit_net`, and the short-epoch settings the
verifier tests share.

Why a module of its own: ``test_verifier_runner`` wrote these and ``test_verifier_variants`` and
``test_verifier_wire`` imported them from there (a test module's private names).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from node.client import Client, ClientConfig
from node.client._wallet import Wallet
from node.inference import TorchEngine
from tests.fixtures.auditnet import AuditNet
from verifier._calibration import Calibration
from verifier._runner import Verifier, VerifierConfig
from verifier._sequential import CusumParams

#: Seconds per epoch: a few challenges per node and verifier fit, with room for retries and the attestations.
EPOCH_S = 6
#: The shipped fp32/fp32 calibration (what ``ps-verifier run`` scores with).
CALIBRATION = Calibration.default()
#: A CUSUM that alarms after two clearly failed challenges (so a test needs one epoch, not the shipped design's
#: dozen challenges) and stays at 0 on honest answers (deficits ~0, under the allowance).
CUSUM = CusumParams(kappa=0.3, threshold=1.0, challenges_per_epoch=8)
#: A node's reputation before any verdict (fixed point, 1e6 = 1.0).
NEUTRAL = 500_000


@asynccontextmanager
async def verifier_committee(net: AuditNet, reference: TorchEngine, tmp: Path) -> AsyncIterator[list[Verifier]]:
    """One ``Verifier`` per registered verifier, each with its own index, state dir and paying client."""
    async with AsyncExitStack() as stack:
        verifiers = []
        for i, (account, payer) in enumerate(zip(net.verifiers, net.payers, strict=True)):
            indexer = net.indexer(f"verifier-{i}")
            stack.callback(indexer.close)
            nodes, directory = net.sources(indexer)
            wallet = Wallet(
                net.payments(),
                payer,
                budget_wei=10**17,
                deposit_wei=10**16,
                state_dir=tmp / f"wallet-{i}",
                fresh_addresses=True,
            )
            stack.callback(wallet.close)
            client = await stack.enter_async_context(
                Client(directory, ClientConfig(models=(net.model,)), wallet=wallet)
            )
            verifiers.append(
                Verifier(
                    VerifierConfig(
                        state_dir=tmp / f"verifier-{i}",
                        model_dir=net.root,
                        mean_challenges=3.0,
                        min_challenges=2,
                        max_challenges=6,
                        max_prompt_chars=400,
                        request_timeout_s=10.0,
                    ),
                    account=account,
                    attestations=net.attestations(account),
                    nodes=nodes,
                    client=client,
                    engine=reference,
                    model_id=net.model_id,
                    calibration=CALIBRATION,
                    cusum=CUSUM,
                )
            )
        yield verifiers
