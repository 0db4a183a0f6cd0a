"""Deploy every contract and record where: ``deployments/<chainId>.json``; load it back with checks."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3

from ledger._artifacts import load_artifact
from ledger._attestations import AttestationParams, Attestations, deploy_attestations
from ledger._errors import DeploymentNotFound, InvalidChainInput, WrongChainId
from ledger._payments import PaymentChannels, PaymentParams, deploy_payments
from ledger._registry import NodeRegistry
from ledger._reverts import RevertDecoder
from ledger._tx import connect, send_transaction
from ledger._types import Wei, checksum

_ROOT = Path(__file__).resolve().parent.parent
#: Bump when the file's shape changes; loaders reject other versions.
DEPLOYMENT_FORMAT = 1
_ONE_ETH = Wei(10**18)
_TENTH_ETH = Wei(10**17)
#: The contract's ``MAX_UNBONDING_DELAY`` (365 days), checked here too so a bad value fails before any transaction.
MAX_UNBONDING_DELAY = 365 * 86_400


def default_deployment_path(chain_id: int) -> Path:
    """``$PS_DEPLOYMENT`` if set, else ``<repo>/deployments/<chainId>.json``."""
    env = os.environ.get("PS_DEPLOYMENT")
    return Path(env) if env else _ROOT / "deployments" / f"{chain_id}.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryParams:
    """Constructor parameters of ``NodeRegistry`` (immutable once deployed) and the roles ``deploy_all`` grants.

    Validated on construction with the contract's own bounds, so a bad value fails before any transaction.
    """

    #: Minimum stake of a model node, in wei (> 0).
    minimum_stake_model: Wei = _ONE_ETH
    #: Minimum stake of a relay, in wei (> 0; relays only forward: a smaller bond).
    minimum_stake_relay: Wei = _TENTH_ETH
    #: Minimum stake of a verifier, in wei (> 0).
    minimum_stake_verifier: Wei = _ONE_ETH
    #: Seconds from an answer to the verifiers' verdict on it, in [1, unbonding_delay].
    verification_window: int = 3_600
    #: Unbonding delay in seconds, in [verification_window, 365 days]: a leaving node stays slashable this long.
    unbonding_delay: int = 86_400
    #: Seconds a new default admin waits between ``begin_admin_transfer`` and ``accept_admin_transfer``
    #: (in [0, 2**48)).
    admin_transfer_delay: int = 86_400
    #: Treasury for slashed stake; None means the deployer.
    treasury: ChecksumAddress | None = None
    #: The default admin (grants the slasher role); None means the deployer.
    admin: ChecksumAddress | None = None
    #: Accounts ``deploy_all`` grants ``SLASHER_ROLE`` (the attestation and payment contracts once they exist;
    #: a dev account in demos and tests until then). The deployer must be the admin for this.
    slashers: tuple[ChecksumAddress, ...] = ()

    def __post_init__(self) -> None:
        for name in ("minimum_stake_model", "minimum_stake_relay", "minimum_stake_verifier"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**256:
                raise InvalidChainInput(name, value, "must be a positive number of wei")
        if not 1 <= self.verification_window <= MAX_UNBONDING_DELAY:
            raise InvalidChainInput(
                "verification_window", self.verification_window, f"must be seconds in [1, {MAX_UNBONDING_DELAY}]"
            )
        if not self.verification_window <= self.unbonding_delay <= MAX_UNBONDING_DELAY:
            raise InvalidChainInput(
                "unbonding_delay",
                self.unbonding_delay,
                f"must be seconds in [verification_window={self.verification_window}, {MAX_UNBONDING_DELAY}]",
            )
        if not 0 <= self.admin_transfer_delay < 2**48:
            raise InvalidChainInput("admin_transfer_delay", self.admin_transfer_delay, "must be seconds in [0, 2**48)")
        object.__setattr__(self, "slashers", tuple(checksum(a, param="slasher") for a in self.slashers))


@dataclass(frozen=True, slots=True, kw_only=True)
class ContractRecord:
    """Where one contract lives."""

    #: Checksummed address.
    address: ChecksumAddress
    #: sha256 of the ABI it was deployed with (see ``Artifact.abi_hash``).
    abi_hash: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Deployment:
    """The contracts of one chain, as written to ``deployments/<chainId>.json``."""

    #: EIP-155 chain id.
    chain_id: int
    #: Block of the first deployment transaction (the indexer starts there).
    deploy_block: int
    #: Hash of ``deploy_block`` (0x-hex); detects a chain that was reset under the file.
    deploy_block_hash: str
    #: The deploying account.
    deployer: ChecksumAddress
    #: Contracts by name.
    contracts: dict[str, ContractRecord] = field(default_factory=dict)
    #: Constructor parameters, for display.
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def registry_address(self) -> ChecksumAddress:
        """The ``NodeRegistry`` address."""
        return self.contracts["NodeRegistry"].address

    @property
    def payments_address(self) -> ChecksumAddress:
        """The ``PaymentChannels`` address."""
        return self.contracts["PaymentChannels"].address

    @property
    def attestations_address(self) -> ChecksumAddress | None:
        """The ``Attestations`` address; None for a deployment made before the contract existed."""
        record = self.contracts.get("Attestations")
        return None if record is None else record.address

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object."""
        return {
            "format": DEPLOYMENT_FORMAT,
            "chainId": self.chain_id,
            "deployBlock": self.deploy_block,
            "deployBlockHash": self.deploy_block_hash,
            "deployer": self.deployer,
            "contracts": {n: {"address": c.address, "abiHash": c.abi_hash} for n, c in self.contracts.items()},
            "params": self.params,
        }

    def write(self, path: Path) -> Path:
        """Write atomically (temp file + rename) so a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path

    def verify(self, w3: Web3) -> None:
        """Check the chain id and that every contract has code; raises ``WrongChainId``/``DeploymentNotFound``."""
        actual = w3.eth.chain_id
        if actual != self.chain_id:
            raise WrongChainId(self.chain_id, actual)
        for name, record in self.contracts.items():
            if not w3.eth.get_code(record.address):
                raise DeploymentNotFound(f"chain {self.chain_id}", f"no code for {name} at {record.address}")
            if load_artifact(name).abi_hash != record.abi_hash:
                raise DeploymentNotFound(f"chain {self.chain_id}", f"{name} was deployed from a different build")


def load_deployment(path: Path) -> Deployment:
    """Read a deployment file; ``DeploymentNotFound`` when missing or malformed."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeploymentNotFound(str(path), "file not found") from None
    except (OSError, ValueError) as exc:
        raise DeploymentNotFound(str(path), f"unreadable ({type(exc).__name__})") from exc
    try:
        if data["format"] != DEPLOYMENT_FORMAT:
            raise DeploymentNotFound(str(path), f"format {data['format']} is not {DEPLOYMENT_FORMAT}")
        return Deployment(
            chain_id=int(data["chainId"]),
            deploy_block=int(data["deployBlock"]),
            deploy_block_hash=str(data["deployBlockHash"]),
            deployer=checksum(data["deployer"]),
            contracts={
                name: ContractRecord(address=checksum(c["address"]), abi_hash=str(c["abiHash"]))
                for name, c in data["contracts"].items()
            },
            params=dict(data.get("params", {})),
        )
    except (KeyError, TypeError, ValueError, InvalidChainInput) as exc:
        raise DeploymentNotFound(str(path), f"malformed ({type(exc).__name__}: {exc})") from exc


def deploy_all(
    w3: Web3,
    deployer: LocalAccount,
    params: RegistryParams | None = None,
    *,
    path: Path | None = None,
    payment_params: PaymentParams | None = None,
    attestation_params: AttestationParams | None = None,
) -> Deployment:
    """Deploy every contract from ``deployer`` and write the deployment file (``path`` or the default one).

    ``PaymentChannels`` follows the registry (it reads ``isJailed`` from it); ``payment_params`` defaults to
    :class:`PaymentParams` with the registry's treasury and verification window. ``Attestations`` follows both
    (``attestation_params`` defaults to :class:`AttestationParams`) and is granted ``SLASHER_ROLE`` on each, which
    needs the deployer to be the registry's admin (the default).
    """
    params = params or RegistryParams()
    artifact = load_artifact("NodeRegistry")
    factory = w3.eth.contract(abi=list(artifact.abi), bytecode=artifact.bytecode)
    treasury = params.treasury or deployer.address
    admin = params.admin or deployer.address
    receipt = send_transaction(
        w3,
        deployer,
        factory.constructor(
            admin,
            params.admin_transfer_delay,
            treasury,
            params.minimum_stake_model,
            params.minimum_stake_relay,
            params.minimum_stake_verifier,
            params.verification_window,
            params.unbonding_delay,
        ),
        RevertDecoder([artifact.abi]),
    )
    address = receipt["contractAddress"]
    assert address is not None, "a deployment receipt always carries the contract address"
    block = receipt["blockNumber"]
    registry = NodeRegistry(w3, checksum(address), deployer)
    for slasher in params.slashers:
        registry.grant_slasher(slasher)
    payment_params = payment_params or PaymentParams(treasury=treasury, verification_window=params.verification_window)
    payments, _ = deploy_payments(w3, deployer, registry=checksum(address), params=payment_params)
    attestation_params = attestation_params or AttestationParams()
    attestations, _ = deploy_attestations(
        w3, deployer, registry=checksum(address), payments=payments, params=attestation_params
    )
    registry.grant_slasher(attestations)
    PaymentChannels(w3, payments, deployer).grant_slasher(attestations)
    attestation_handle = Attestations(w3, attestations)
    deployment = Deployment(
        chain_id=w3.eth.chain_id,
        deploy_block=block,
        deploy_block_hash=_block_hash(w3, block),
        deployer=deployer.address,
        contracts={
            "NodeRegistry": ContractRecord(address=checksum(address), abi_hash=artifact.abi_hash),
            "PaymentChannels": ContractRecord(address=payments, abi_hash=load_artifact("PaymentChannels").abi_hash),
            "Attestations": ContractRecord(address=attestations, abi_hash=load_artifact("Attestations").abi_hash),
        },
        params={
            "minimumStakeModel": str(params.minimum_stake_model),
            "minimumStakeRelay": str(params.minimum_stake_relay),
            "minimumStakeVerifier": str(params.minimum_stake_verifier),
            "verificationWindow": params.verification_window,
            "unbondingDelay": params.unbonding_delay,
            "adminTransferDelay": params.admin_transfer_delay,
            "treasury": treasury,
            "payments": {
                "disputeDelay": payment_params.dispute_delay,
                "verificationWindow": payment_params.verification_window,
                "treasury": payment_params.treasury or deployer.address,
            },
            "attestations": {
                "epochStart": attestation_handle.epoch_start(),
                "epochLength": attestation_handle.epoch_length(),
                "committeeSize": attestation_params.committee_size,
                "quorum": attestation_params.quorum,
                "scoreThreshold": attestation_params.score_threshold,
                "stakeSlashFraction": attestation_params.stake_slash_fraction,
                "earningsSlashFraction": attestation_params.earnings_slash_fraction,
            },
            "admin": admin,
            "slashers": list(params.slashers),
        },
    )
    deployment.write(path or default_deployment_path(deployment.chain_id))
    return deployment


def open_registry(
    rpc_url: str, deployment_path: Path, account: LocalAccount | None = None
) -> tuple[Deployment, NodeRegistry]:
    """Load the deployment, connect with chain-id and code checks, and return the registry handle."""
    deployment = load_deployment(deployment_path)
    w3 = connect(rpc_url, expected_chain_id=deployment.chain_id)
    deployment.verify(w3)
    return deployment, NodeRegistry(w3, deployment.registry_address, account)


def _block_hash(w3: Web3, number: int) -> str:
    block_hash = w3.eth.get_block(number).get("hash")
    assert block_hash is not None, "a mined block has a hash"
    return block_hash.to_0x_hex()
