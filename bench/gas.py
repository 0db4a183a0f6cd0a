"""Gas per NodeRegistry operation, measured on a real anvil.

Each operation is run ``--repeat`` times by distinct operators on one fresh deployment; the table shows the median,
min and max gas used (gas units, not wei: the price is the chain's business). Writes ``bench/results/gas.json``.
Run: ``.venv/bin/python bench/gas.py`` (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger import (
    Anvil,
    AnvilConfig,
    NodeRegistry,
    RegistryParams,
    Role,
    TxReceipt,
    Wei,
    deploy_all,
    dev_account,
    model_id,
)

RESULTS = Path(__file__).resolve().parent / "results" / "gas.json"
ETH = 10**18


def measure(repeat: int) -> dict[str, list[int]]:
    """Gas used by each operation, ``repeat`` samples each (3 x ``repeat`` for per-operator ones)."""
    params = RegistryParams(verification_window=600, unbonding_delay=3_600, admin_transfer_delay=60)
    gas: dict[str, list[int]] = {}

    def record(name: str, action: Callable[..., TxReceipt], *args: Any, **kwargs: Any) -> None:
        gas.setdefault(name, []).append(action(*args, **kwargs).gas_used)

    def advance(seconds: int) -> None:
        w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]

    operators_n = 3 * repeat
    extra = 2 + operators_n  # first account index after the operators: slasher candidates, then the next admin
    with Anvil(AnvilConfig(accounts=extra + repeat + 1)) as anvil, tempfile.TemporaryDirectory() as tmp:
        w3 = anvil.web3()
        owner = dev_account(0)
        deployment = deploy_all(w3, owner, params, path=Path(tmp) / "deployment.json")
        registry = NodeRegistry(w3, deployment.registry_address)
        admin = registry.with_account(owner)
        slasher_index = 1
        record("grant_slasher", admin.grant_slasher, dev_account(slasher_index).address)
        for i in range(repeat):  # more holders of the role, then revoke them again
            record("grant_slasher", admin.grant_slasher, dev_account(extra + i).address)
            record("revoke_slasher", admin.revoke_slasher, dev_account(extra + i).address)
        slasher = registry.with_account(dev_account(slasher_index))
        operators = [registry.with_account(dev_account(2 + i)) for i in range(operators_n)]
        roles = [Role.MODEL, Role.RELAY, Role.VERIFIER]
        for i, reg in enumerate(operators):
            role = roles[i % 3]
            key = bytes([i + 1]) * 32
            mid = None if role is Role.RELAY else model_id("tiny-llama@v1")
            record(
                f"register ({role.name.lower()})",
                reg.register,
                role=role,
                endpoint=f"http://127.0.0.1:{9000 + i}",
                x25519_public_key=key,
                model_id=mid,
                price_per_1k_tokens=1_000,
                stake=2 * ETH,
            )
        for reg in operators:
            record("add_stake", reg.add_stake, ETH)
            record(
                "update",
                reg.update,
                endpoint="http://127.0.0.1:9999",
                x25519_public_key=b"\x07" * 32,
                price_per_1k_tokens=2_000,
            )
            record("slash (jails)", slasher.slash, reg.account, Wei(ETH // 10), b"\x0e" * 32)
            record("slash (already jailed)", slasher.slash, reg.account, Wei(ETH // 10), b"\x0f" * 32)
            record("unjail", reg.unjail)
            record("request_unbond", reg.request_unbond)
            record("rebond", reg.rebond)
            reg.request_unbond()
        advance(params.unbonding_delay)
        for reg in operators:
            record("deregister", reg.deregister)
            record("withdraw", reg.withdraw)
            record("slash (skipped: no node)", slasher.slash, reg.account, Wei(ETH), b"\x0d" * 32)
        record("withdraw_treasury", admin.withdraw_treasury)
        successor = registry.with_account(dev_account(extra + repeat))
        record("begin_admin_transfer", admin.begin_admin_transfer, successor.account)
        advance(params.admin_transfer_delay + 1)
        record("accept_admin_transfer", successor.accept_admin_transfer)
    return gas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="operators per role (samples per operation)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    gas = measure(args.repeat)
    rows = {
        name: {"median": int(statistics.median(v)), "min": min(v), "max": max(v), "samples": len(v)}
        for name, v in gas.items()
    }
    width = max(len(n) for n in rows)
    print(f"{'operation':<{width}}  {'median gas':>10}  {'min':>8}  {'max':>8}  {'n':>3}")
    for name, row in rows.items():
        print(f"{name:<{width}}  {row['median']:>10}  {row['min']:>8}  {row['max']:>8}  {row['samples']:>3}")
    result = {
        "bench": "gas",
        "unit": "gas units per transaction (receipt gasUsed), including the 21000 base",
        "chain": "anvil 1.7.1 (default hardfork), solc 0.8.37 optimizer 200 runs, evm cancun",
        "python": platform.python_version(),
        "operations": rows,
        "seconds": round(time.perf_counter() - started, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
