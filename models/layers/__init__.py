"""The shared token-reduction core: pure tensor operators that the families compose (DESIGN contract 4)."""
from .attention import TokenAttention, cls_attention, size_bias
from .keep import keep_topk
from .fusion import multi_criteria_scores, one_step_ahead_attention, received_attention
from .merge import (RSchedule, bipartite_soft_matching, cosine_scores, merge_sum, merge_weighted_average, protect_rows,
                    reduction_schedule)
from .record import TokenRecord, compose_sources, destination_of_kept, identity_sources, restore
from .sparse_attention import (connectivity_index, connectivity_mask, gathered_sparse_attention, keep_top_coefficients,
                               masked_sparse_attention, query_chunk_size, resample_token_projection, sparsify_basis)

__all__ = [
    "TokenAttention", "cls_attention", "size_bias",
    "keep_topk",
    "RSchedule", "bipartite_soft_matching", "cosine_scores", "merge_sum", "merge_weighted_average", "protect_rows",
    "reduction_schedule",
    "multi_criteria_scores", "one_step_ahead_attention", "received_attention",
    "TokenRecord", "compose_sources", "destination_of_kept", "identity_sources", "restore",
    "connectivity_index", "connectivity_mask", "gathered_sparse_attention", "keep_top_coefficients",
    "masked_sparse_attention", "query_chunk_size", "resample_token_projection", "sparsify_basis",
]
