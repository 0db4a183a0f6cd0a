"""Regenerate ``tests/vectors/completion_v2.json``: completion v2 request bodies (protocol §10.1, §10.4).

Written with plain ``json`` from the protocol text, not from ``node.overlay``, so the vectors check the reader rather
than echo it. The voucher is case 1 of ``vouchers.json`` (signed by anvil's dev account 10).
Run: ``.venv/bin/python tests/vectors/generate_completion_v2.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
MODEL = "0x" + "ab" * 32


def _body(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 2,
        "type": "completion",
        "model": MODEL,
        "prompt": "Hello",
        "max_tokens": 8,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": None,
        "stop": [],
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def main() -> None:
    case = json.loads((HERE / "vouchers.json").read_text())["cases"][1]
    voucher = {
        "chainId": str(case["chain_id"]),
        "contract": case["contract"],
        "channelId": case["channel_id"],
        "cumulativeAmount": case["cumulative_amount"],
        "signature": "0x" + case["signature"],
    }

    def with_voucher(**changes: Any) -> dict[str, Any]:
        v = dict(voucher)
        for key, value in changes.items():
            if value is _DROP:
                del v[key]
            else:
                v[key] = value
        return v

    accept = [
        {"name": "v2 with a voucher", "body": _body(voucher=voucher), "voucher": voucher},
        {
            "name": "v2 without a voucher (a free node serves it; a paying one answers payment_required)",
            "body": _body(),
            "voucher": None,
        },
        {"name": "v1 without a voucher, unchanged", "body": _body(v=1), "voucher": None},
        {
            "name": "v2 re-forwarded by a model node, with its own voucher (§10.5)",
            "body": _body(voucher=voucher, forwarded=True),
            "voucher": voucher,
        },
    ]
    reject = [
        ("v1 carrying a voucher", _body(v=1, voucher=voucher), "voucher"),
        ("version 3", _body(v=3), "v"),
        (
            "amount as a JSON number",
            _body(voucher=with_voucher(cumulativeAmount=int(voucher["cumulativeAmount"]))),
            "voucher.cumulativeAmount",
        ),
        ("amount with a leading zero", _body(voucher=with_voucher(cumulativeAmount="01")), "voucher.cumulativeAmount"),
        ("negative amount", _body(voucher=with_voucher(cumulativeAmount="-1")), "voucher.cumulativeAmount"),
        ("amount of 79 digits", _body(voucher=with_voucher(cumulativeAmount="1" * 79)), "voucher.cumulativeAmount"),
        ("chain id in hex", _body(voucher=with_voucher(chainId="0x7a69")), "voucher.chainId"),
        ("channel id missing", _body(voucher=with_voucher(channelId=_DROP)), "voucher.channelId"),
        ("short signature", _body(voucher=with_voucher(signature=voucher["signature"][:-2])), "voucher.signature"),
        ("signature without 0x", _body(voucher=with_voucher(signature=voucher["signature"][2:])), "voucher.signature"),
        ("contract of 19 bytes", _body(voucher=with_voucher(contract=voucher["contract"][:-2])), "voucher.contract"),
        ("an unknown voucher field", _body(voucher=with_voucher(nonce="1")), "voucher.nonce"),
        ("snake_case field names", _body(voucher={"chain_id": "1", **with_voucher(chainId=_DROP)}), "voucher.chainId"),
        ("forwarded that is not a boolean (§10.5)", _body(v=1, forwarded="yes"), "forwarded"),
    ]
    out = {
        "description": "Completion v2 request bodies (docs/protocol.md §10.1, §10.4). Each accept body MUST parse, "
        "carrying exactly `voucher`; each reject body MUST be answered invalid_request with `param` (the first "
        "failing field) and the model MUST NOT run.",
        "accept": accept,
        "reject": [
            {"name": name, "body": body, "code": "invalid_request", "param": param}
            for name, body, param in reject
            if body is not None
        ],
    }
    (HERE / "completion_v2.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
