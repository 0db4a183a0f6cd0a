"""Gas per NodeRegistry and PaymentChannels operation, measured on a real anvil.

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

from eth_account.signers.local import LocalAccount

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger import (
    Anvil,
    AnvilConfig,
    AttestationParams,
    Attestations,
    NodeRegistry,
    PaymentChannels,
    PaymentParams,
    RegistryParams,
    Role,
    TxReceipt,
    Voucher,
    Wei,
    deploy_all,
    dev_account,
    model_id,
    sign_voucher,
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


# -- PaymentChannels (engineer H7) ------------------------------------------------------------------------------

#: Wei per request in the payment scenarios (the amount only changes calldata bytes, not the work done).
PRICE_PER_REQUEST = 10**12
#: Seconds in the amortisation day; at 1 request per second that many requests.
DAY = 86_400


def measure_payments(repeat: int) -> dict[str, list[int]]:
    """Gas of each ``PaymentChannels`` operation, ``repeat`` samples each (one node and one client per sample)."""
    gas: dict[str, list[int]] = {}

    def record(name: str, receipt: TxReceipt) -> TxReceipt:
        gas.setdefault(name, []).append(receipt.gas_used)
        return receipt

    with Anvil(AnvilConfig(accounts=2 + 2 * repeat)) as anvil, tempfile.TemporaryDirectory() as tmp:
        w3 = anvil.web3()
        owner = dev_account(0)
        window = 3_600
        deployment = deploy_all(
            w3,
            owner,
            RegistryParams(verification_window=window, unbonding_delay=window),
            path=Path(tmp) / "deployment.json",
            payment_params=PaymentParams(dispute_delay=window, verification_window=window),
        )
        admin = PaymentChannels(w3, deployment.payments_address, owner)
        admin.grant_slasher(dev_account(1).address)
        slasher = admin.with_account(dev_account(1))
        domain = admin.domain()
        for i in range(repeat):
            node_account, client_account = dev_account(2 + 2 * i), dev_account(3 + 2 * i)
            node, client = admin.with_account(node_account), admin.with_account(client_account)
            channels = []
            for _ in range(13):
                opened = client.open_channel(node_account.address, ETH // 10)
                gas.setdefault("open", []).append(opened.receipt.gas_used)
                channels.append(opened.channel_id)
            record("top_up", client.top_up(channels[0], ETH // 10))

            def pay(channel: int, requests: int, signer: LocalAccount = client_account) -> Voucher:
                return sign_voucher(signer, domain, channel, requests * PRICE_PER_REQUEST)

            record("redeem: the node's first ever (1 request)", node.redeem(pay(channels[0], 1)))
            record("redeem: 1 request", node.redeem(pay(channels[1], 1)))
            record("redeem: 10,000 requests", node.redeem(pay(channels[2], 10_000)))
            record("redeem: again on a channel (10,000 more)", node.redeem(pay(channels[2], 20_000)))
            batch = record("redeem_batch: 10 channels", node.redeem_batch([pay(c, 10_000) for c in channels[3:13]]))
            gas.setdefault("redeem_batch: per channel (of 10)", []).append(batch.gas_used // 10)
            # Two epochs on, the first bucket is released into the withdrawable balance by the next redeem.
            w3.provider.make_request("evm_increaseTime", [2 * window])  # type: ignore[arg-type]
            w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
            record("redeem: releases an old lock bucket", node.redeem(pay(channels[1], 2)))
            record("slash (locked earnings)", slasher.slash(node_account.address, PRICE_PER_REQUEST, b"\x0e" * 32))
            record("start_close", client.start_close(channels[0]))
            w3.provider.make_request("evm_increaseTime", [2 * window + 1])  # type: ignore[arg-type]
            w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
            record("finish_close", client.finish_close(channels[0]))
            record("withdraw (client refund)", client.withdraw())
            record("withdraw (node earnings)", node.withdraw())
    return gas


def amortised_per_request(rows: dict[str, dict[str, int]]) -> dict[str, float]:
    """Gas per request for one client-node channel at 1 request/s for a day, from the measured medians.

    Every request costs 0 gas (a voucher is an off-chain signature). A day's channel costs: open, the redeems,
    start_close, finish_close and both withdrawals; ``daily`` redeems once, ``hourly`` 24 times.
    """

    def median(name: str) -> int:
        return rows[name]["median"]

    fixed = (
        median("open")
        + median("start_close")
        + median("finish_close")
        + median("withdraw (client refund)")
        + median("withdraw (node earnings)")
    )
    return {
        "request path": 0.0,
        "daily redeem": round((fixed + median("redeem: 1 request")) / DAY, 3),
        "hourly redeem": round((fixed + 24 * median("redeem: again on a channel (10,000 more)")) / DAY, 3),
        "daily batch of 10 channels, per channel": round(
            (fixed + median("redeem_batch: per channel (of 10)")) / DAY, 3
        ),
    }


# -- Attestations (engineer H9) ---------------------------------------------------------------------------------


def measure_attestations(repeat: int) -> dict[str, list[int]]:
    """Gas of ``Attestations.attest``: below quorum, and the quorum-reaching one that passes, that slashes stake
    only (no locked earnings), and that slashes stake and locked earnings; ``repeat`` samples each.

    Committee of 3 (quorum 2): each node's epoch takes two attestations, the second one finalizes it.
    """
    gas: dict[str, list[int]] = {}

    def record(name: str, receipt: TxReceipt) -> None:
        gas.setdefault(name, []).append(receipt.gas_used)

    models = 3 * repeat
    verifiers = (1 + models, 2 + models)
    client_index = 3 + models
    with Anvil(AnvilConfig(accounts=client_index + 1)) as anvil, tempfile.TemporaryDirectory() as tmp:
        w3 = anvil.web3()
        owner = dev_account(0)
        params = RegistryParams(verification_window=600, unbonding_delay=3_600, admin_transfer_delay=60)
        deployment = deploy_all(
            w3,
            owner,
            params,
            path=Path(tmp) / "deployment.json",
            attestation_params=AttestationParams(committee_size=3),
        )
        registry = NodeRegistry(w3, deployment.registry_address)
        assert deployment.attestations_address is not None
        att = Attestations(w3, deployment.attestations_address)
        pay = PaymentChannels(w3, deployment.payments_address)
        for index in range(1, models + 1):
            registry.with_account(dev_account(index)).register(
                role=Role.MODEL,
                endpoint=f"http://127.0.0.1:{9000 + index}",
                x25519_public_key=bytes([index]) * 32,
                model_id=model_id("tiny-llama@v1"),
                price_per_1k_tokens=1_000,
                stake=2 * ETH,
            )
        for index in verifiers:
            registry.with_account(dev_account(index)).register(
                role=Role.VERIFIER,
                endpoint=f"http://127.0.0.1:{9000 + index}",
                x25519_public_key=bytes([index]) * 32,
                model_id=model_id("tiny-llama@v1"),
                price_per_1k_tokens=0,
                stake=ETH,
            )
        first, second = (att.with_account(dev_account(v)) for v in verifiers)
        client = pay.with_account(dev_account(client_index))
        epoch = att.current_epoch()
        for i in range(repeat):
            passing, failing, earning = (dev_account(1 + 3 * i + k).address for k in range(3))
            channel = client.open_channel(earning, ETH).channel_id
            voucher = sign_voucher(dev_account(client_index), pay.domain(), channel, ETH // 10)
            pay.with_account(dev_account(3 + 3 * i)).redeem(voucher)  # the "earning" node
            record("attest (below quorum)", first.attest(passing, epoch, 900_000, b"\x01" * 32))
            record(
                "attest (reaches quorum, passes, first rating)", second.attest(passing, epoch, 800_000, b"\x02" * 32)
            )
            first.attest(failing, epoch, 100_000, b"\x03" * 32)
            record("attest (reaches quorum, fails: slashes stake)", second.attest(failing, epoch, 0, b"\x04" * 32))
            first.attest(earning, epoch, 100_000, b"\x05" * 32)
            record(
                "attest (reaches quorum, fails: slashes stake and locked earnings)",
                second.attest(earning, epoch, 0, b"\x06" * 32),
            )
        w3.provider.make_request("evm_increaseTime", [att.epoch_length()])  # type: ignore[arg-type]
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        epoch = att.current_epoch()
        for i in range(repeat):
            passing = dev_account(1 + 3 * i).address
            first.attest(passing, epoch, 900_000, b"\x07" * 32)
            record(
                "attest (reaches quorum, passes, rated before)", second.attest(passing, epoch, 800_000, b"\x08" * 32)
            )
    return gas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="operators per role (samples per operation)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    gas = measure(args.repeat)
    gas.update(measure_attestations(args.repeat))
    gas.update(measure_payments(args.repeat))
    rows = {
        name: {"median": int(statistics.median(v)), "min": min(v), "max": max(v), "samples": len(v)}
        for name, v in gas.items()
    }
    width = max(len(n) for n in rows)
    print(f"{'operation':<{width}}  {'median gas':>10}  {'min':>8}  {'max':>8}  {'n':>3}")
    for name, row in rows.items():
        print(f"{name:<{width}}  {row['median']:>10}  {row['min']:>8}  {row['max']:>8}  {row['samples']:>3}")
    amortised = amortised_per_request(rows)
    result = {
        "bench": "gas",
        "unit": "gas units per transaction (receipt gasUsed), including the 21000 base",
        "chain": "anvil 1.7.1 (default hardfork), solc 0.8.37 optimizer 200 runs, evm cancun",
        "python": platform.python_version(),
        "operations": rows,
        "payments_gas_per_request_1rps_day": amortised,
        "seconds": round(time.perf_counter() - started, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for name, value in amortised.items():
        print(f"gas per request, 1 request/s for a day, {name}: {value}")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
