"""The soak test's attacker: a separate process that abuses one relay in one way for a while, then reports counts.

Run by ``tests/test_overlay_soak.py`` as ``python -m tests.soak_attacker`` with one JSON object on stdin:
``{"kind": ..., "seconds": ..., "relay": HOP, "relay_endpoint": URL, "model": HOP}`` where a HOP is the
``dataclasses.asdict`` of a :class:`node.privacy.Hop` with bytes as ``{"hex": ...}``. It prints ``{"ready": true}``
once its own servers are up, then one JSON line of counts when done. Kinds:

- ``junk``: random bytes of random lengths, as fast as 8 connections allow;
- ``replay``: one valid packet sent again and again;
- ``slow_headers``: 200 connections that send a request head one byte per 100 ms;
- ``slow_body``: 64 connections that send a head, then the body one byte per 100 ms;
- ``trickle``: packets through the relay to this process's own next hop, which answers 200 and then sends a frame
  one byte per 50 ms;
- ``lone_cloves``: fresh single cloves (each of a new message) through the relay to the model node, 40 at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
from typing import Any

import aiohttp
from aiohttp import web

from node.privacy import Envelope, Hop, build_onion, public_key, split
from node.privacy._constants import FRAME_LEN_BYTES, REPLY_FRAME_BODY

ONION = "/overlay/v1/onion"
#: The registry id the ``trickle`` kind's own next hop goes by (where next hops are registry ids).
EVIL_NODE_ID = b"\xaa" * 20


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"hex"}:
        return bytes.fromhex(value["hex"])
    return value


def hop_from_json(data: dict[str, Any]) -> Hop:
    """A :class:`Hop` from its JSON form (whatever fields ``Hop`` has)."""
    return Hop(**{key: _decode(value) for key, value in data.items()})


def hop_to_json(hop: Hop) -> dict[str, Any]:
    """The JSON form of a :class:`Hop` (bytes as ``{"hex": ...}``)."""
    out: dict[str, Any] = {}
    for name in hop.__dataclass_fields__:
        value = getattr(hop, name)
        out[name] = {"hex": value.hex()} if isinstance(value, bytes) else value
    return out


class Attack:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.kind: str = spec["kind"]
        self.seconds: float = spec["seconds"]
        self.relay = hop_from_json(spec["relay"])
        self.relay_endpoint: str = spec["relay_endpoint"]
        self.model = hop_from_json(spec["model"])
        self.sent = 0
        self.statuses: dict[str, int] = {}
        self.cut = 0
        host, port = self.relay_endpoint.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self._runner: web.AppRunner | None = None
        self.evil_key = public_key(secrets.token_bytes(32))

    def _count(self, status: int | str) -> None:
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1

    async def _post_all(self, session: aiohttp.ClientSession, packets: Any, workers: int, pause_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds

        async def worker() -> None:
            while loop.time() < deadline:
                packet = next(packets)
                self.sent += 1
                try:
                    async with asyncio.timeout(10), session.post(self.relay_endpoint + ONION, data=packet) as resp:
                        self._count(resp.status)
                        await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self._count(type(exc).__name__)
                if pause_s:
                    await asyncio.sleep(pause_s)

        await asyncio.gather(*(worker() for _ in range(workers)))

    async def junk(self, session: aiohttp.ClientSession) -> None:
        def packets() -> Any:
            while True:
                yield os.urandom(secrets.randbelow(2048))

        await self._post_all(session, packets(), 8, 0.0)

    async def replay(self, session: aiohttp.ClientSession) -> None:
        clove = split(Envelope(reply_key=bytes(32), body=b"r").to_bytes(), 3, 2)[0].to_bytes()
        packet = build_onion([self.relay, self.model], clove).packet

        def packets() -> Any:
            while True:
                yield packet

        await self._post_all(session, packets(), 8, 0.0)

    async def lone_cloves(self, session: aiohttp.ClientSession) -> None:
        def packets() -> Any:
            while True:
                clove = split(Envelope(reply_key=bytes(32), body=b"l").to_bytes(), 3, 2)[0].to_bytes()
                yield build_onion([self.relay, self.model], clove).packet

        # 40 at a time, each waiting for its answer (the relay waits for the model node's assembly timeout).
        await self._post_all(session, packets(), 40, 0.1)

    async def _slowly(self, head: bytes, trickled: bytes, connections: int) -> None:
        """``connections`` connections, each sending ``head`` at once and then ``trickled`` one byte per 100 ms,
        reconnecting whenever the relay cuts one off, until the time is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds

        async def one() -> None:
            while loop.time() < deadline:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                answer = asyncio.create_task(reader.read(256))  # done once the relay answers (408) or hangs up
                try:
                    writer.write(head)
                    for i in range(len(trickled)):
                        if loop.time() >= deadline or answer.done():
                            break
                        writer.write(trickled[i : i + 1])
                        await writer.drain()
                        await asyncio.sleep(0.1)
                except ConnectionError:
                    pass
                finally:
                    if answer.done():
                        self.cut += 1
                    answer.cancel()
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()

        await asyncio.gather(*(one() for _ in range(connections)))

    def _head(self) -> bytes:
        return f"POST {ONION} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: 4000\r\n\r\n".encode()

    async def slow_headers(self) -> None:
        await self._slowly(b"", self._head(), 200)

    async def slow_body(self) -> None:
        await self._slowly(self._head(), b"\x01" * 4000, 64)

    async def start_next_hop(self) -> str:
        """This process's own next hop: answers 200, then sends one frame a byte per 50 ms."""

        async def handler(request: web.Request) -> web.StreamResponse:
            await request.read()
            response = web.StreamResponse()
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):  # the relay hanging up is the point
                await response.write(REPLY_FRAME_BODY.to_bytes(FRAME_LEN_BYTES, "big"))
                for _ in range(REPLY_FRAME_BODY):
                    await asyncio.sleep(0.05)
                    await response.write(b"\x00")
            return response

        app = web.Application()
        app.router.add_post(ONION, handler)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def trickle(self, session: aiohttp.ClientSession) -> None:
        # The test registers EVIL_NODE_ID at this process's endpoint in the relay's view of the registry.
        evil = Hop(node_id=EVIL_NODE_ID, public_key=self.evil_key)

        def packets() -> Any:
            while True:
                yield build_onion([self.relay, evil], b"clove").packet

        await self._post_all(session, packets(), 32, 0.0)

    async def run(self) -> dict[str, Any]:
        connector = aiohttp.TCPConnector(limit=64)
        endpoint = await self.start_next_hop() if self.kind == "trickle" else ""
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                ready = {"ready": True, "next_hop": endpoint, "next_hop_key": self.evil_key.hex()}
                print(json.dumps(ready), flush=True)
                if self.kind == "junk":
                    await self.junk(session)
                elif self.kind == "replay":
                    await self.replay(session)
                elif self.kind == "slow_headers":
                    await self.slow_headers()
                elif self.kind == "slow_body":
                    await self.slow_body()
                elif self.kind == "trickle":
                    await self.trickle(session)
                elif self.kind == "lone_cloves":
                    await self.lone_cloves(session)
                else:
                    raise SystemExit(f"unknown kind {self.kind}")
        finally:
            if self._runner is not None:
                await self._runner.cleanup()
        return {"kind": self.kind, "sent": self.sent, "statuses": self.statuses, "connections_cut": self.cut}


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    result = asyncio.run(Attack(spec).run())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
