"""The shared token-reduction core: pure tensor operators that the families compose (DESIGN contract 4)."""
from .attention import TokenAttention, cls_attention
from .keep import keep_topk
from .sources import compose_sources, destination_of_kept, identity_sources, restore

__all__ = [
    "TokenAttention", "cls_attention", "keep_topk",
    "compose_sources", "destination_of_kept", "identity_sources", "restore",
]
