"""Host-side data: federated datasets, partitioners, packing and cohort samplers."""

from fedjax_priv.data.digits import Split, federated_digits, load_digits
from fedjax_priv.data.federated import FederatedDataset
from fedjax_priv.data.packing import CohortData, bucket_size, pack_cohort, pad_population
from fedjax_priv.data.partition import (
    dirichlet_label_partition,
    iid_partition,
    partition_by_key,
)
from fedjax_priv.data.sampling import (
    Cohort,
    FixedSizeSampler,
    PoissonSampler,
    poisson_capacity,
    poisson_overflow_probability,
)

__all__ = [
    "Cohort",
    "CohortData",
    "FederatedDataset",
    "FixedSizeSampler",
    "PoissonSampler",
    "Split",
    "bucket_size",
    "dirichlet_label_partition",
    "federated_digits",
    "iid_partition",
    "load_digits",
    "pack_cohort",
    "pad_population",
    "partition_by_key",
    "poisson_capacity",
    "poisson_overflow_probability",
]
