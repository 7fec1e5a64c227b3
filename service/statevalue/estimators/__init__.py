"""Value estimators: pure functions over the arrays of one group of rollouts."""

from statevalue.estimators.advantages import scale_advantages, segment_gae, token_gae
from statevalue.estimators.base import ValueEstimate
from statevalue.estimators.group_mean import group_mean_values
from statevalue.estimators.hista import (
    ema_smooth,
    hista_values,
    neighbour_counts,
    prefix_chamfer,
    prefix_distances,
)
from statevalue.estimators.numca import (
    NumcaPath,
    NumcaTable,
    find_numbers,
    merge_boundaries,
    number_boundaries,
    numca_path,
    numca_values,
)

__all__ = [
    "NumcaPath",
    "NumcaTable",
    "ValueEstimate",
    "ema_smooth",
    "find_numbers",
    "group_mean_values",
    "hista_values",
    "merge_boundaries",
    "neighbour_counts",
    "number_boundaries",
    "numca_path",
    "numca_values",
    "prefix_chamfer",
    "prefix_distances",
    "scale_advantages",
    "segment_gae",
    "token_gae",
]
