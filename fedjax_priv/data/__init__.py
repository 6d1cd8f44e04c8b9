"""Host-side data: federated datasets, partitioners, packing and cohort samplers."""

from fedjax_priv.data.digits import Split, federated_digits, load_digits
from fedjax_priv.data.federated import FederatedDataset
from fedjax_priv.data.idx import load_idx_images, read_idx, write_idx
from fedjax_priv.data.leaf import LeafData, iter_leaf, read_leaf, write_leaf
from fedjax_priv.data.packing import CohortData, bucket_size, pack_cohort, pad_population
from fedjax_priv.data.partition import (
    dirichlet_label_partition,
    iid_partition,
    partition_by_key,
)
from fedjax_priv.data.prepare import SourceError, prepare_dataset
from fedjax_priv.data.sampling import (
    Cohort,
    FixedSizeSampler,
    PoissonSampler,
    poisson_batch_buckets,
    poisson_capacity,
    poisson_overflow_probability,
)
from fedjax_priv.data.store import FederatedStore, StoreInfo, StoreWriter, write_store
from fedjax_priv.data.synthetic import fedprox_synthetic, synthetic_clients

__all__ = [
    "Cohort",
    "CohortData",
    "FederatedDataset",
    "FederatedStore",
    "FixedSizeSampler",
    "LeafData",
    "PoissonSampler",
    "SourceError",
    "Split",
    "StoreInfo",
    "StoreWriter",
    "bucket_size",
    "dirichlet_label_partition",
    "federated_digits",
    "fedprox_synthetic",
    "iid_partition",
    "iter_leaf",
    "load_digits",
    "load_idx_images",
    "pack_cohort",
    "pad_population",
    "partition_by_key",
    "poisson_batch_buckets",
    "poisson_capacity",
    "poisson_overflow_probability",
    "prepare_dataset",
    "read_idx",
    "read_leaf",
    "synthetic_clients",
    "write_idx",
    "write_leaf",
    "write_store",
]
