"""Value estimators: pure functions over the arrays of one group of rollouts."""

from statevalue.estimators.advantages import scale_advantages, segment_gae, token_gae
from statevalue.estimators.base import ValueEstimate
from statevalue.estimators.group_mean import group_mean_values
from statevalue.estimators.hista import (
    HistaNeighbour,
    HistaNode,
    HistaNodes,
    ema_smooth,
    group_node_spacing,
    hista_nodes,
    hista_representation,
    hista_values,
    hista_values_explained,
    neighbour_counts,
    node_prefix_lengths,
    prefix_chamfer,
    prefix_distances,
)
from statevalue.estimators.numca import (
    NumcaPath,
    NumcaTable,
    add_to_table,
    find_numbers,
    group_merge_distance,
    merge_boundaries,
    number_boundaries,
    numca_path,
    numca_values,
    read_numca_values,
)

__all__ = [
    "HistaNeighbour",
    "HistaNode",
    "HistaNodes",
    "NumcaPath",
    "NumcaTable",
    "ValueEstimate",
    "add_to_table",
    "ema_smooth",
    "find_numbers",
    "group_mean_values",
    "group_merge_distance",
    "group_node_spacing",
    "hista_nodes",
    "hista_representation",
    "hista_values",
    "hista_values_explained",
    "merge_boundaries",
    "neighbour_counts",
    "node_prefix_lengths",
    "number_boundaries",
    "numca_path",
    "numca_values",
    "prefix_chamfer",
    "prefix_distances",
    "read_numca_values",
    "scale_advantages",
    "segment_gae",
    "token_gae",
]
