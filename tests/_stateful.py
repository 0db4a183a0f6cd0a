"""Hypothesis state machines driven alongside real contracts on the session's anvil: one base and one runner.

Why: the registry, payments and attestation machines each repeated the same set-up (a web3 handle, an
``evm_snapshot`` taken before the first rule, ``evm_revert`` in ``teardown`` so every example starts from the same
chain) and the same settings block. A machine subclasses :class:`ChainMachine`; a test calls :func:`run_on_chain`.
"""

from __future__ import annotations

from typing import ClassVar

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from ledger import Anvil, Deployment
from tests.fixtures.chain import rpc


class ChainMachine(RuleBasedStateMachine):
    """A rule-based model whose every example runs from one chain snapshot and is reverted to it afterwards."""

    anvil: ClassVar[Anvil]
    deployment: ClassVar[Deployment]

    def __init__(self) -> None:
        super().__init__()
        self.w3 = self.anvil.web3()
        self.snapshot = rpc(self.w3, "evm_snapshot", [])

    def teardown(self) -> None:
        assert rpc(self.w3, "evm_revert", [self.snapshot]) is True


def run_on_chain(
    machine: type[ChainMachine],
    anvil: Anvil,
    deployment: Deployment,
    *,
    examples: int,
    steps: int,
    shrink: bool = True,
) -> None:
    """Run ``machine`` for ``examples`` examples of up to ``steps`` rules each against ``deployment`` on ``anvil``.

    No deadline (each rule is a transaction on a loaded machine) and no example database (the chain differs each
    session). ``shrink=False`` skips shrinking, which for a chain run can take minutes; the report still lists every
    step.
    """
    machine.anvil = anvil
    machine.deployment = deployment
    phases = tuple(Phase) if shrink else (Phase.explicit, Phase.generate)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
            phases=phases,
        ),
    )
