"""The shared token-reduction core: pure tensor operators that the families compose (DESIGN contract 4)."""
from .attention import TokenAttention, cls_attention, size_bias
from .cluster import (ClusterWindows, NumClusters, check_num_clusters, cluster_grid_size, cluster_windows,
                      nearest_source_index, reconstruction_weights, token_clustering)
from .keep import keep_topk
from .fusion import (multi_criteria_scores, one_step_ahead_attention, one_step_ahead_attention_fused,
                     received_attention, received_attention_chunked)
from .merge import (TokenSplit, argsort_descending, bipartite_soft_matching, cosine_scores, merge_sum,
                    merge_weighted_average, num_b_tokens, protect_rows, with_registers, without_registers)
from .schedule import RSchedule, check_merge_window, check_reduction_loc, reduction_schedule, tokens_to_reduce
from .record import TokenRecord, compose_sources, destination_of_kept, identity_sources, restore
from .sparse_attention import (connectivity_index, connectivity_mask, gathered_sparse_attention, keep_top_coefficients,
                               masked_sparse_attention, query_chunk_size, resample_token_projection, sparsify_basis)

__all__ = [
    "TokenAttention", "cls_attention", "size_bias",
    "ClusterWindows", "NumClusters", "check_num_clusters", "cluster_grid_size", "cluster_windows", "nearest_source_index",
    "reconstruction_weights", "token_clustering",
    "keep_topk",
    "TokenSplit", "argsort_descending", "bipartite_soft_matching", "cosine_scores", "merge_sum",
    "merge_weighted_average", "num_b_tokens", "protect_rows", "with_registers", "without_registers",
    "RSchedule", "check_merge_window", "check_reduction_loc", "reduction_schedule", "tokens_to_reduce",
    "multi_criteria_scores", "one_step_ahead_attention", "one_step_ahead_attention_fused", "received_attention",
    "received_attention_chunked",
    "TokenRecord", "compose_sources", "destination_of_kept", "identity_sources", "restore",
    "connectivity_index", "connectivity_mask", "gathered_sparse_attention", "keep_top_coefficients",
    "masked_sparse_attention", "query_chunk_size", "resample_token_projection", "sparsify_basis",
]
