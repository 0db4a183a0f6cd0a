"""A local anvil chain as a context manager: free port, readiness poll with a deadline, clean shutdown.

Used by ``ps-chain up``, the demo, the gas bench and the tests' session fixture. Anvil is the pinned npm package's
native binary (:func:`anvil_binary`); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import HTTPProvider, Web3

from ledger._errors import ChainError, ChainNotReachable

_ROOT = Path(__file__).resolve().parent.parent

#: anvil's well-known development mnemonic. Its keys are public: they are for local chains only.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
#: anvil's default chain id.
ANVIL_CHAIN_ID = 31337


#: npm's platform package suffix per (``platform.system()``, ``platform.machine()``), as @foundry-rs/anvil names them.
_PLATFORM_PACKAGES = {
    ("Linux", "x86_64"): "linux-amd64",
    ("Linux", "aarch64"): "linux-arm64",
    ("Darwin", "x86_64"): "darwin-amd64",
    ("Darwin", "arm64"): "darwin-arm64",
}


def anvil_binary() -> Path:
    """The pinned anvil: ``$PS_ANVIL``, else the npm package's native binary, else ``anvil`` on PATH.

    The native binary (``node_modules/@foundry-rs/anvil-<os>-<arch>/bin/anvil``), not ``node_modules/.bin/anvil``:
    that is a Node wrapper which forwards SIGTERM to the real anvil and exits at once, so waiting for it returned
    while anvil was still dumping ``--state`` (a restart then found no file, or half of one) and left anvil running
    on its own. Raises if none is installed."""
    configured = os.environ.get("PS_ANVIL")
    if configured:
        path = Path(configured)
        if not path.exists():
            raise ChainError(f"PS_ANVIL={configured} does not exist")
        return path
    suffix = _PLATFORM_PACKAGES.get((platform.system(), platform.machine()))
    if suffix is not None:
        native = _ROOT / "node_modules" / "@foundry-rs" / f"anvil-{suffix}" / "bin" / "anvil"
        if native.exists():
            return native
    found = shutil.which("anvil")
    if found is None:
        raise ChainError("anvil not found; run `make bootstrap` (npm ci installs it)")
    return Path(found)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the launcher retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind ``host:port`` now (``SO_REUSEADDR``, so a port in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def dev_account(index: int) -> LocalAccount:
    """anvil's dev account ``index`` (0-based) derived from :data:`DEV_MNEMONIC`. Local chains only."""
    if not 0 <= index < 1000:
        raise ValueError(f"dev account index out of range: {index}")
    # HD derivation is "unaudited" in eth-account; it derives public test keys here, never operator keys.
    Account.enable_unaudited_hdwallet_features()
    account: LocalAccount = Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")
    return account


@dataclass(frozen=True, slots=True, kw_only=True)
class AnvilConfig:
    """How to start anvil."""

    #: TCP port on 127.0.0.1; 0 picks a free one.
    port: int = 0
    #: File the chain state is loaded from (if it exists) and dumped to on exit; None for an ephemeral chain.
    state_file: Path | None = None
    #: Number of funded dev accounts (1..1000).
    accounts: int = 10
    #: Balance of each dev account, in ETH.
    balance_eth: int = 10_000
    #: Mine a block every this many seconds besides on each transaction (``--block-time``); 0: only on
    #: transactions. Verifier epochs are anchored to the first block at or after their start, so a chain that
    #: mines only on demand leaves ``ps-verifier run`` waiting for one.
    block_time_s: int = 0
    #: Seconds to wait for JSON-RPC readiness.
    start_timeout: float = 15.0
    #: Seconds to wait for a clean exit after SIGTERM before SIGKILL.
    stop_timeout: float = 10.0


class Anvil:
    """A running anvil process. Use as a context manager; ``stop()`` is idempotent."""

    def __init__(self, config: AnvilConfig | None = None) -> None:
        self.config = config or AnvilConfig()
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0

    @property
    def rpc_url(self) -> str:
        """The JSON-RPC URL (``http://127.0.0.1:<port>``)."""
        if self._proc is None:
            raise ChainError("anvil is not running")
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        """The anvil process id while it runs."""
        return None if self._proc is None else self._proc.pid

    def web3(self, timeout: float = 10.0) -> Web3:
        """A sync ``Web3`` connected to this chain (no transport retries: a local anvil either answers or is gone)."""
        return Web3(HTTPProvider(self.rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None))

    def dev_addresses(self) -> list[ChecksumAddress]:
        """The funded dev accounts' addresses (never their keys)."""
        return [Web3.to_checksum_address(a) for a in self.web3().eth.accounts]

    def start(self) -> Anvil:
        """Start anvil and wait until it answers ``eth_chainId``; retries once on a port race."""
        if self._proc is not None:
            return self
        attempts = 1 if self.config.port else 3
        last: Exception | None = None
        for _ in range(attempts):
            try:
                self._spawn(self.config.port or free_port())
                return self
            except ChainNotReachable as exc:
                last = exc
                self.stop()
        assert last is not None
        raise last

    def _spawn(self, port: int) -> None:
        cmd = [
            str(anvil_binary()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--accounts",
            str(self.config.accounts),
            "--balance",
            str(self.config.balance_eth),
            "--quiet",
        ]
        if self.config.block_time_s:
            cmd += ["--block-time", str(self.config.block_time_s)]
        if self.config.state_file is not None:
            self.config.state_file.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--state", str(self.config.state_file)]
        self._port = port
        # anvil reports a taken port only by exiting, and its readiness poll would meanwhile be answered by whatever
        # chain already listens there: this launcher would then hand out (and callers deploy into) someone else's
        # chain. So the port is checked first; the window between this check and anvil's bind is milliseconds.
        if not port_is_free(port):
            raise ChainNotReachable(f"http://127.0.0.1:{port}", f"port {port} on 127.0.0.1 is already in use")
        # stdout is discarded (it would grow without bound); stderr is kept small by --quiet and read on failure.
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.config.start_timeout
        w3 = self.web3(timeout=1.0)
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                stderr = self._proc.stderr.read(4096).decode(errors="replace") if self._proc.stderr else ""
                raise ChainNotReachable(self.rpc_url, f"anvil exited with {self._proc.returncode}: {stderr.strip()}")
            with contextlib.suppress(Exception):
                if w3.eth.chain_id and self._proc.poll() is None:
                    return
            time.sleep(0.05)
        raise ChainNotReachable(self.rpc_url, f"anvil did not answer within {self.config.start_timeout} s")

    def stop(self) -> None:
        """SIGTERM (anvil dumps ``--state`` on it), wait, then SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            # Dumping --state happens on SIGTERM and can take a while on a loaded machine: a kill would lose it.
            grace = self.config.stop_timeout * (3 if self.config.state_file is not None else 1)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.config.stop_timeout)
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
