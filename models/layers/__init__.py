"""The shared token-reduction core: pure tensor operators that the families compose (DESIGN contract 4)."""
from .attention import TokenAttention, cls_attention, size_bias
from .cluster import (ClusterWindows, NumClusters, check_num_clusters, cluster_grid_size, cluster_windows,
                      nearest_source_index, reconstruction_weights, token_clustering)
from .keep import keep_topk
from .fusion import multi_criteria_scores, one_step_ahead_attention, received_attention
from .merge import (RSchedule, bipartite_soft_matching, cosine_scores, merge_sum, merge_weighted_average, protect_rows,
                    reduction_schedule)
from .record import TokenRecord, compose_sources, destination_of_kept, identity_sources, restore

__all__ = [
    "TokenAttention", "cls_attention", "size_bias",
    "ClusterWindows", "NumClusters", "check_num_clusters", "cluster_grid_size", "cluster_windows", "nearest_source_index",
    "reconstruction_weights", "token_clustering",
    "keep_topk",
    "RSchedule", "bipartite_soft_matching", "cosine_scores", "merge_sum", "merge_weighted_average", "protect_rows",
    "reduction_schedule",
    "multi_criteria_scores", "one_step_ahead_attention", "received_attention",
    "TokenRecord", "compose_sources", "destination_of_kept", "identity_sources", "restore",
]
