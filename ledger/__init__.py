"""PlanetServe ledger: contract handles, deployment, the anvil launcher and the event indexer.

Importing it is cheap: nothing connects to a chain or reads artefacts until a handle is built.
"""

from ledger._anvil import ANVIL_CHAIN_ID, Anvil, AnvilConfig, dev_account, port_is_free
from ledger._artifacts import Artifact, load_artifact
from ledger._attestations import AttestationParams, Attestations, EpochTally, ReputationRecord
from ledger._deploy import (
    Deployment,
    RegistryParams,
    default_deployment_path,
    deploy_all,
    load_deployment,
    open_registry,
)
from ledger._errors import (
    ArtifactsMissing,
    ChainError,
    ChainNotReachable,
    ChainUnavailable,
    DeploymentNotFound,
    InsufficientFunds,
    InvalidChainInput,
    OperatorKeyError,
    TransactionFailed,
    TransactionOutcomeUnknown,
    WrongChainId,
)
from ledger._indexer import (
    DatabaseDriverMissing,
    IndexedNode,
    Indexer,
    IndexerError,
    IndexerUnavailable,
    SyncReport,
)
from ledger._payments import ChannelBalances, ChannelInfo, OpenedChannel, PaymentChannels, PaymentParams
from ledger._registry import NodeRegistry
from ledger._reverts import ContractRevert, UnknownRevert
from ledger._tx import connect, transfer
from ledger._types import (
    NodeInfo,
    Role,
    TxReceipt,
    Wei,
    WithdrawalReceipts,
    checksum,
    format_eth,
    model_id,
    parse_eth,
)
from ledger._voucher_store import AcceptedVoucher, ChannelBook, PriceRule, VoucherStore
from ledger._vouchers import Voucher, VoucherDomain, VoucherRejected, sign_voucher, verify_voucher

__all__ = [
    "ANVIL_CHAIN_ID",
    "AcceptedVoucher",
    "Anvil",
    "AnvilConfig",
    "Artifact",
    "ArtifactsMissing",
    "AttestationParams",
    "Attestations",
    "ChainError",
    "ChainNotReachable",
    "ChainUnavailable",
    "ChannelBalances",
    "ChannelBook",
    "ChannelInfo",
    "ContractRevert",
    "DatabaseDriverMissing",
    "Deployment",
    "DeploymentNotFound",
    "EpochTally",
    "IndexedNode",
    "Indexer",
    "IndexerError",
    "IndexerUnavailable",
    "InsufficientFunds",
    "InvalidChainInput",
    "NodeInfo",
    "NodeRegistry",
    "OpenedChannel",
    "OperatorKeyError",
    "PaymentChannels",
    "PaymentParams",
    "PriceRule",
    "RegistryParams",
    "ReputationRecord",
    "Role",
    "SyncReport",
    "TransactionFailed",
    "TransactionOutcomeUnknown",
    "TxReceipt",
    "UnknownRevert",
    "Voucher",
    "VoucherDomain",
    "VoucherRejected",
    "VoucherStore",
    "Wei",
    "WithdrawalReceipts",
    "WrongChainId",
    "checksum",
    "connect",
    "default_deployment_path",
    "deploy_all",
    "dev_account",
    "format_eth",
    "load_artifact",
    "load_deployment",
    "model_id",
    "open_registry",
    "parse_eth",
    "port_is_free",
    "sign_voucher",
    "transfer",
    "verify_voucher",
]
