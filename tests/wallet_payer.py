"""A separate client process for the wallet tests: pays for requests to one model node from a durable wallet book.

Reads a JSON job on stdin (chain, state directory, the relays and the model node as descriptors, prompts) and its key
from ``PS_PRIVATE_KEY``; prints one JSON object: each answer's voucher amount and usage, or the error code. With
``"die_after_signing": true`` it signs one voucher and exits at once without sending it or settling (a crash between
committing a voucher and its answer).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any


async def _main(job: dict[str, Any]) -> dict[str, Any]:
    from eth_account import Account

    from ledger import PaymentChannels, connect
    from node.client import Client, ClientConfig
    from node.client._wallet import Wallet
    from node.overlay import CompletionError, CompletionRequest, Directory, ModelNode
    from node.privacy import RelayDescriptor

    w3 = connect(job["rpc_url"])
    account = Account.from_key(os.environ["PS_PRIVATE_KEY"])
    wallet = Wallet(
        PaymentChannels(w3, job["payments"]),
        account,
        budget_wei=int(job["budget_wei"]),
        deposit_wei=int(job["deposit_wei"]),
        state_dir=Path(job["state_dir"]),
    )
    node = job["node"]
    model = ModelNode(
        operator=node["operator"],
        endpoint=node["endpoint"],
        public_key=bytes.fromhex(node["public_key"]),
        model_id=node["model_id"],
        price_per_1k_tokens=int(node["price"]),
    )
    relays = tuple(
        RelayDescriptor(
            node_id=r["node_id"], operator=r["operator"], endpoint=r["endpoint"], public_key=bytes.fromhex(r["key"])
        )
        for r in job["relays"]
    )
    if job.get("die_after_signing"):
        request = CompletionRequest(model=model.model_id, prompt=job["prompts"][0], max_tokens=int(job["max_tokens"]))
        _paid, payment = await wallet.pay(model, request, None)
        assert payment is not None
        print(json.dumps({"signed": str(payment.amount), "reservation": str(payment.reservation)}), flush=True)
        os._exit(0)  # no finish, no close: as a crash would leave it
    results: list[dict[str, Any]] = []
    config = ClientConfig(heartbeats=False, attempts=1)
    async with Client(Directory(relays=relays, model_nodes=(model,)), config, wallet=wallet) as client:
        for prompt in job["prompts"]:
            request = CompletionRequest(
                model=model.model_id, prompt=prompt, max_tokens=int(job["max_tokens"]), temperature=0.0
            )
            try:
                done = await client.complete(request)
            except CompletionError as exc:
                results.append({"error": exc.code})
                continue
            results.append({"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens})
    wallet.close()
    return {"results": results}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_main(json.loads(sys.stdin.read())))), flush=True)
