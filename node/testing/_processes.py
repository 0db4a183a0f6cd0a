"""A local PlanetServe network of separate ``ps-node serve`` processes, registered and staked on a chain.

This is what ``ps-net up`` runs and what the multi-process tests and benchmarks use: every node is its own process,
exactly as an operator runs it (``ps-node serve --json``, the operator key in ``PS_PRIVATE_KEY``, never on the
command line); this harness only starts them, waits for each ready line, and registers each node with the endpoint
and onion key it reported, from anvil's dev accounts (local use only: those keys are public).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from planetserve import ModelId

log = logging.getLogger(__name__)

#: Seconds a node process gets to print its ready line (a model node loads its engine first).
READY_TIMEOUT_S = 120.0
#: Seconds between each node's own reads of the registry (``ps-node serve --registry-refresh``).
REGISTRY_REFRESH_S = 1.0
#: Seconds a node process gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 10.0

_SPAWN = "import sys; from cli.node import main; sys.argv[0] = 'ps-node'; main()"


class NodeProcessFailed(RuntimeError):
    """A node process exited or printed no ready line in time; ``stderr`` holds its last output."""

    def __init__(self, name: str, reason: str, stderr: str) -> None:
        self.name = name
        self.stderr = stderr
        super().__init__(f"{name}: {reason}" + (f"\n{stderr.strip()[-2000:]}" if stderr.strip() else ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSpec:
    """One node to run."""

    name: str
    """Display name, e.g. ``relay-1``."""
    role: str
    """``relay`` or ``model``."""
    account_index: int
    """Anvil dev account of its operator."""
    stake_wei: int
    """Stake registered with it."""
    price_per_1k_tokens: int = 0
    """Model nodes: price, wei per 1000 tokens."""
    prelude: str = ""
    """Python statements the node's process runs before ``ps-node`` starts (tests: a dishonest node, e.g. one whose
    heartbeat under-reports its load); empty for an honest node."""


@dataclass(slots=True)
class NodeProcess:
    """A running node process and what it reported."""

    spec: NodeSpec
    proc: subprocess.Popen[str]
    state_dir: Path
    operator: str = ""
    endpoint: str = ""
    x25519_public_key: bytes = b""
    model_id: str = ""
    stderr_tail: list[str] = field(default_factory=list)
    pumps: list[threading.Thread] = field(default_factory=list)
    """The threads reading its stdout and stderr (they end at the process's end of output)."""

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def release(self) -> None:
        """Once the process has exited: let its pumps read to the end (bounded), then close its pipes, so that no
        file is left for the garbage collector (a ResourceWarning, an error where warnings are errors)."""
        for pump in self.pumps:
            pump.join(timeout=STOP_TIMEOUT_S)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None and not any(p.is_alive() for p in self.pumps):
                stream.close()


def _pump(stream: IO[str], sink: queue.Queue[str | None], tail: list[str]) -> None:
    for line in stream:
        sink.put(line)
        tail.append(line)
        del tail[:-50]
    sink.put(None)


def _read_ready(node: NodeProcess, lines: queue.Queue[str | None], timeout_s: float) -> dict[str, Any]:
    """The JSON object ``serve --json`` prints once it listens (pretty-printed over several lines)."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NodeProcessFailed(node.spec.name, "no ready line in time", "".join(node.stderr_tail))
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            node.proc.wait(timeout=5)
            time.sleep(0.1)  # let the stderr pump catch up
            raise NodeProcessFailed(
                node.spec.name, f"exited with code {node.proc.returncode}", "".join(node.stderr_tail)
            )
        text += line
        if line.rstrip() == "}":
            return dict(json.loads(text))


@dataclass(slots=True, kw_only=True)
class ProcessNetwork:
    """Start, register and stop ``nodes`` as ``ps-node serve`` processes against the chain at ``rpc_url``."""

    rpc_url: str
    deployment: Path
    state_root: Path
    nodes: list[NodeSpec]
    model_dir: Path | None = None
    engine: str = "torch"
    extra_env: dict[str, str] = field(default_factory=dict)
    running: list[NodeProcess] = field(default_factory=list)

    def _env(self, operator_key: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(
            PS_PRIVATE_KEY=operator_key,
            PS_RPC_URL=self.rpc_url,
            PS_DEPLOYMENT=str(self.deployment),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self, *, ready_timeout_s: float = READY_TIMEOUT_S) -> list[NodeProcess]:
        """Start every node, wait for its ready line, register it on chain; returns the running nodes."""
        from ledger import NodeRegistry, Role, connect, dev_account, load_deployment

        deployment = load_deployment(self.deployment)
        registry = NodeRegistry(connect(self.rpc_url), deployment.registry_address)
        try:
            started: list[tuple[NodeProcess, queue.Queue[str | None]]] = []
            for spec in self.nodes:
                account = dev_account(spec.account_index)
                state = self.state_root / spec.name
                state.mkdir(parents=True, exist_ok=True)
                args = ["serve", "--role", spec.role, "--port", "0", "--state-dir", str(state), "--json"]
                args += ["--registry-refresh", str(REGISTRY_REFRESH_S)]
                if spec.role == "model":
                    if self.model_dir is None:
                        raise ValueError("model nodes need a model_dir")
                    args += ["--engine", self.engine, "--model-dir", str(self.model_dir), "--device", "cpu"]
                proc = subprocess.Popen(
                    [sys.executable, "-c", f"{spec.prelude}\n{_SPAWN}" if spec.prelude else _SPAWN, *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=self._env("0x" + bytes(account.key).hex()),
                    start_new_session=True,  # Ctrl-C in a terminal reaches the harness, which stops the nodes
                )
                node = NodeProcess(spec=spec, proc=proc, state_dir=state, operator=account.address)
                self.running.append(node)
                lines: queue.Queue[str | None] = queue.Queue()
                assert proc.stdout is not None and proc.stderr is not None
                node.pumps = [
                    threading.Thread(target=_pump, args=(proc.stdout, lines, []), daemon=True),
                    threading.Thread(target=_pump, args=(proc.stderr, queue.Queue(), node.stderr_tail), daemon=True),
                ]
                for pump in node.pumps:
                    pump.start()
                started.append((node, lines))
            for node, lines in started:
                ready = _read_ready(node, lines, ready_timeout_s)
                node.endpoint = str(ready["endpoint"])
                node.x25519_public_key = bytes.fromhex(str(ready["x25519_public_key"])[2:])
                node.model_id = str(ready.get("model_id", ""))
                role = Role.MODEL if node.spec.role == "model" else Role.RELAY
                registry.with_account(dev_account(node.spec.account_index)).register(
                    role=role,
                    endpoint=node.endpoint,
                    x25519_public_key=node.x25519_public_key,
                    model_id=ModelId(node.model_id) if role is Role.MODEL else None,
                    price_per_1k_tokens=node.spec.price_per_1k_tokens,
                    stake=node.spec.stake_wei,
                )
                log.info("%s registered at %s", node.spec.name, node.endpoint)
            # Each node reads the registry itself, every REGISTRY_REFRESH_S: give them one round to see each other.
            time.sleep(REGISTRY_REFRESH_S + 1.0)
        except BaseException:
            self.stop()
            raise
        return list(self.running)

    def crashed(self) -> list[NodeProcess]:
        """Nodes whose process has exited."""
        return [n for n in self.running if not n.alive()]

    def kill(self, name: str) -> None:
        """Kill one node at once (a crash, as its peers see it)."""
        for node in self.running:
            if node.spec.name == name and node.alive():
                node.proc.kill()
                node.proc.wait(timeout=STOP_TIMEOUT_S)
                node.release()

    def stop(self) -> None:
        """SIGTERM every node, wait, then kill what is left; every node is stopped and released whatever one step
        raises (Ctrl-C included), and the first error is raised after: a node left running holds its port and state
        directory, and its pipes go to the garbage collector."""
        first: list[BaseException] = []

        def each(step: Callable[[NodeProcess], object]) -> None:
            for node in self.running:
                try:
                    step(node)
                except BaseException as exc:  # every node gets every step; the first error is raised below
                    if not first:
                        first.append(exc)
                    else:
                        log.warning("stopping %s failed too: %s", node.spec.name, type(exc).__name__)

        deadline = time.monotonic() + STOP_TIMEOUT_S

        def terminate(node: NodeProcess) -> None:
            if node.alive():
                node.proc.send_signal(signal.SIGTERM)

        def reap(node: NodeProcess) -> None:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # it ignored SIGTERM: kill it
                node.proc.kill()
                node.proc.wait(timeout=STOP_TIMEOUT_S)
            except BaseException:  # interrupted while waiting: do not leave it running
                node.proc.kill()
                node.proc.wait(timeout=STOP_TIMEOUT_S)
                raise

        each(terminate)
        each(reap)
        each(lambda node: node.release())
        if first:
            raise first[0]


def network_specs(*, relays: int, model_nodes: int, first_account: int = 1) -> list[NodeSpec]:
    """Model nodes then relays, one anvil dev account each from ``first_account`` (stakes above the defaults)."""
    specs = [
        NodeSpec(
            name=f"model-{i + 1}",
            role="model",
            account_index=first_account + i,
            stake_wei=2 * 10**18,
            price_per_1k_tokens=10_000_000_000_000,
        )
        for i in range(model_nodes)
    ]
    specs += [
        NodeSpec(
            name=f"relay-{i + 1}", role="relay", account_index=first_account + model_nodes + i, stake_wei=2 * 10**17
        )
        for i in range(relays)
    ]
    return specs
