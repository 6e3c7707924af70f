"""Token clustering and token reconstruction weights (Expedit: Liang et al., "Expediting Large-Scale Vision Transformer
for Dense Prediction without Fine-tuning", NeurIPS 2022, Sec. 3, "token clustering layer" and "token reconstruction
layer"; official ops: Expedit-Segmenter ``mmseg/ops/cluster.py`` and ``mmseg/ops/reconstruction.py``).

Both operators are parameter-free and work on the patch tokens alone (prefix tokens removed), in row-major grid order.

*Clustering* turns the H x W token grid into an h x w grid of cluster centres by local soft k-means: the centres start
as the adaptive average pool of the grid; each token has an initial cell (nearest-neighbour upsampling of the cell
grid, as the official ``interpolate(..., mode="nearest")``, float32 rounding included) and may only join the centres
of the ``window`` x ``window`` cells around it; each of ``iters`` rounds assigns every token softmax(-temperature * D)
over its allowed centres, D the squared Euclidean distance, and moves each centre to the assignment-weighted mean of
the tokens, the assignment detached as in the official code (gradients reach the tokens only through that mean). The
temperature *multiplies* the distance, as in the official code: small values (0.02) give soft assignments.

The official code builds the full (h*w) x (H*W) distance matrix and masks it. Here each token meets only the centres
near its window: the cell grid is cut into tiles of window x window cells, a tile's tokens meet the centres of the
tile grown by the window radius (fewer than 4 * window^2), where a static mask keeps each token's window; distances
are one batched product per tile, and the centre update adds the per-tile partial sums of each centre (at most 4)
with one gather over static indices. That costs O(N * window^2 * C) instead of O(N * h * w * C), with the same
result (the tests compare it with the masked full computation).

*Reconstruction weights* relate the tokens that entered clustering to the centres it produced: each token keeps its
``k`` nearest centres (among all centres, as the official code) with weights exp(-temperature * D), L2-normalized over
the k (the official ``F.normalize``: the weights do not sum to one). A token is later rebuilt as the weighted sum of
the refined cluster tokens at those indices (``TokenRecord.restore``).

Deviations from the official code, and why:

* Exactly k centres per token: the official mask keeps every centre whose weight ties the k-th (more than k), which
  needs identical centres, never produced by continuous features. Which of such tied centres is kept is left to
  ``torch.topk`` (ONNX's TopK keeps the lower index; PyTorch's CPU kernel does not promise an order): a guaranteed
  index order would need a stable full sort, ~10x the cost of the top-k.
* The weights are computed as exp(-temperature * (D - D_min)), D_min the token's nearest distance, before the
  normalization: equal to the official weights (the L2 normalization removes any common factor), but they cannot
  underflow. The official exp(-temperature * D) underflows in float32 once temperature * D exceeds ~87, and its
  normalization then returns shrunken or zero tokens.
* Distances leave out the token's own squared norm where it cancels (in the softmax over a token's centres, and in
  the shifted weights): equal up to rounding, without the cancellation error of large norms.
"""
import math
import struct
from numbers import Integral, Real
from typing import Any, List, NamedTuple, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["ClusterWindows", "NumClusters", "check_num_clusters", "cluster_grid_size", "cluster_windows",
           "nearest_source_index", "reconstruction_weights", "token_clustering"]

NumClusters = Union[float, Tuple[int, int]]


def _float32(value: float) -> float:
    """``value`` rounded to float32 (a product of two float32 numbers is exact in float64, so rounding it once gives
    the float32 product)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def nearest_source_index(out_size: int, in_size: int) -> List[int]:
    """The input index PyTorch's ``interpolate(mode="nearest")`` reads for each output index, along one axis.

    ATen computes floor(i * scale) in float32 with scale = in_size / out_size rounded to float32, so an exact product
    can land just below an integer (2 cells over 82 positions: position 41 reads cell 0, not 1). The official
    clustering initializes its cell map this way; this reproduces it in plain Python (static: no tensor ops in a
    traced graph).

    Returns:
        ``out_size`` non-decreasing indices in [0, in_size).
    """
    if out_size == in_size:
        return list(range(out_size))
    scale = _float32(in_size / out_size)
    return [min(math.floor(_float32(float(i) * scale)), in_size - 1) for i in range(out_size)]


def check_num_clusters(num_clusters: Any) -> NumClusters:
    """``num_clusters`` checked: a fraction in (0, 1] of each grid side, or an (h, w) pair of positive ints."""
    if isinstance(num_clusters, Real) and not isinstance(num_clusters, (bool, Integral)):
        if 0.0 < num_clusters <= 1.0:
            return float(num_clusters)
    elif isinstance(num_clusters, (tuple, list)) and len(num_clusters) == 2 and all(
            isinstance(n, Integral) and not isinstance(n, bool) and n >= 1 for n in num_clusters):
        return int(num_clusters[0]), int(num_clusters[1])
    raise ValueError(f"num_clusters must be a float in (0, 1] (the fraction of each side of the patch grid, e.g. 0.7 "
                     f"-> 28x28 clusters on a 40x40 grid) or a pair (h, w) of positive ints, got {num_clusters!r}")


def cluster_grid_size(grid: Tuple[int, int], num_clusters: NumClusters) -> Tuple[int, int]:
    """The (h, w) cluster grid for a patch grid: a fraction of each side rounded half up (at least 1), or the given
    pair, which must fit the grid.

    Raises:
        ValueError: The pair asks for more clusters than the grid has cells along a side.
    """
    num_clusters = check_num_clusters(num_clusters)
    height, width = grid
    if isinstance(num_clusters, float):
        return (max(1, math.floor(num_clusters * height + 0.5)), max(1, math.floor(num_clusters * width + 0.5)))
    if num_clusters[0] > height or num_clusters[1] > width:
        raise ValueError(f"num_clusters={num_clusters} does not fit a {height}x{width} patch grid: at most "
                         f"{height}x{width} clusters (or give a fraction of the grid, e.g. num_clusters=0.7)")
    return num_clusters


class ClusterWindows(NamedTuple):
    """Static index tables of windowed clustering, fixed by the grid sizes and the window (see ``cluster_windows``).

    The cell grid is cut into tiles of ``window`` x ``window`` cells. A tile's tokens (those whose initial cell lies
    in it) can only reach the centres of its neighbourhood, the tile grown by the window radius on every side:
    (2 * window - 1)^2 centres at most, so each token meets fewer than 4 * window^2 centres, of which the mask keeps
    its window. G tiles, T tokens per tile (padded), S centres per neighbourhood, M = h * w centres, N = H * W tokens.

    Attributes:
        tile_tokens: (G, T) token indices of each tile; padding points at token 0.
        token_ok: (G, T) False for padding.
        tile_centres: (G, S) centre indices of each tile's neighbourhood; slots off the grid point at centre 0.
        allowed: (G, T, S) the centre is in the token's window (and on the grid); all True for padding tokens, which
            get no weight anyway.
        incoming: (M, Q) for each centre, the flat (tile * (S + 1) + slot) neighbourhood slots that hold it; missing
            entries point at slot S of tile 0, which the update keeps at zero.
    """

    tile_tokens: torch.Tensor
    token_ok: torch.Tensor
    tile_centres: torch.Tensor
    allowed: torch.Tensor
    incoming: torch.Tensor


class _AxisTiles(NamedTuple):
    """One axis of ``ClusterWindows`` (positions of the token grid, cells of the cluster grid along that axis)."""

    members: torch.Tensor  # (tiles, R) token positions of each tile, padded with 0
    members_ok: torch.Tensor  # (tiles, R)
    member_cell: torch.Tensor  # (tiles, R) their initial cell
    near: torch.Tensor  # (tiles, tile + 2 * radius) cells of each tile's neighbourhood (may be off the grid)
    near_ok: torch.Tensor  # (tiles, tile + 2 * radius)
    holder: torch.Tensor  # (cells, q) tiles whose neighbourhood holds each cell
    holder_slot: torch.Tensor  # (cells, q) the cell's slot in that neighbourhood
    holder_ok: torch.Tensor  # (cells, q)


def _axis_tiles(cell_of: List[int], num_cells: int, tile: int, radius: int, device: torch.device) -> _AxisTiles:
    """Tiles of ``tile`` cells along one axis: their token positions, neighbourhoods and which tiles hold each cell.

    Args:
        cell_of: The initial cell of each token position (non-decreasing).
        num_cells: Cells along the axis.
        tile: Cells per tile.
        radius: Window radius in cells.
        device: Where the tables go.
    """
    num_tiles = -(-num_cells // tile)
    tile_of = [cell // tile for cell in cell_of]  # non-decreasing, like cell_of: each tile holds one run
    counts = [tile_of.count(t) for t in range(num_tiles)]
    starts = [sum(counts[:t]) for t in range(num_tiles)]
    arange = torch.arange(max(counts), device=device)
    members = torch.tensor(starts, device=device).unsqueeze(1) + arange
    members_ok = arange < torch.tensor(counts, device=device).unsqueeze(1)
    members = torch.where(members_ok, members, 0)
    member_cell = torch.tensor(cell_of, device=device)[members]

    tiles = torch.arange(num_tiles, device=device).unsqueeze(1)
    near = tiles * tile - radius + torch.arange(tile + 2 * radius, device=device)
    near_ok = (near >= 0) & (near < num_cells)

    cells = torch.arange(num_cells, device=device).unsqueeze(1)
    span = -(-(tile + 2 * radius) // tile)  # most neighbourhoods holding one cell
    holder = (cells + radius) // tile - torch.arange(span, device=device)  # the last tile holding it, then earlier
    holder_slot = cells - (holder * tile - radius)
    holder_ok = (holder >= 0) & (holder < num_tiles) & (holder_slot < tile + 2 * radius)
    return _AxisTiles(members, members_ok, member_cell, torch.where(near_ok, near, 0), near_ok,
                      torch.where(holder_ok, holder, 0), torch.where(holder_ok, holder_slot, 0), holder_ok)


def cluster_windows(
        grid: Tuple[int, int], cluster_grid: Tuple[int, int], window: int, device: torch.device = None,
) -> ClusterWindows:
    """The index tables of windowed clustering of an H x W token grid into h x w cells (``ClusterWindows``).

    Vectorized over tiles, tokens and slots; only the per-axis cell maps (H + W entries) are Python lists.
    """
    (height, width), (h, w) = grid, cluster_grid
    radius = window // 2
    rows = _axis_tiles(nearest_source_index(height, h), h, window, radius, device)
    cols = _axis_tiles(nearest_source_index(width, w), w, window, radius, device)

    def outer(a: torch.Tensor, b: torch.Tensor, op) -> torch.Tensor:
        # (Ga, X) with (Gb, Y) -> (Ga * Gb, X * Y): every tile (row tile, col tile), every (row item, col item)
        return op(a[:, None, :, None], b[None, :, None, :]).flatten(2).flatten(0, 1)

    tile_tokens = outer(rows.members, cols.members, lambda r, c: r * width + c)
    token_ok = outer(rows.members_ok, cols.members_ok, torch.logical_and)
    tile_centres = outer(rows.near, cols.near, lambda r, c: r * w + c)
    near_ok = outer(rows.near_ok, cols.near_ok, torch.logical_and)
    # a token reaches the neighbourhood cells within the radius of its initial cell, along both axes
    row_reach = (rows.member_cell.unsqueeze(2) - rows.near.unsqueeze(1)).abs() <= radius  # (row tiles, R, near)
    col_reach = (cols.member_cell.unsqueeze(2) - cols.near.unsqueeze(1)).abs() <= radius
    reach = (row_reach[:, None, :, None, :, None] & col_reach[None, :, None, :, None, :]).flatten(4).flatten(2, 3)
    allowed = (reach.flatten(0, 1) & near_ok.unsqueeze(1)) | ~token_ok.unsqueeze(2)

    num_slots = tile_centres.shape[1]
    holder = outer(rows.holder, cols.holder, lambda r, c: r * cols.near.shape[0] + c)
    slot = outer(rows.holder_slot, cols.holder_slot, lambda r, c: r * cols.near.shape[1] + c)
    holder_ok = outer(rows.holder_ok, cols.holder_ok, torch.logical_and)
    incoming = torch.where(holder_ok, holder * (num_slots + 1) + slot, num_slots)
    return ClusterWindows(tile_tokens, token_ok, tile_centres, allowed, incoming)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, R, ...) at row indices ``index`` (any shape) -> (B, *index.shape, ...)."""
    return x.index_select(1, index.reshape(-1)).reshape(x.shape[0], *index.shape, *x.shape[2:])


def _window_assignment(
        tiles: torch.Tensor, centres: torch.Tensor, tables: ClusterWindows, temperature: float,
) -> torch.Tensor:
    """Soft assignment (B, G, T, S) of each tile's tokens (B, G, T, C) over the centres (B, M, C) of its
    neighbourhood: softmax(-temperature * D) over the centres of the token's window, zero for padding tokens.

    D = |x|^2 + |c|^2 - 2 x.c, where |x|^2 is common to all of a token's centres and cancels in the softmax.
    """
    near = _rows(centres, tables.tile_centres)  # (B, G, S, C)
    near_sq = _rows(centres.square().sum(-1), tables.tile_centres)  # (B, G, S)
    logits = (tiles @ near.transpose(-1, -2)).mul_(2 * temperature).sub_(temperature * near_sq.unsqueeze(2))
    logits = logits.masked_fill(~tables.allowed, float("-inf"))
    return logits.softmax(dim=-1) * tables.token_ok.unsqueeze(-1)


def _window_means(assignment: torch.Tensor, tiles: torch.Tensor, incoming: torch.Tensor) -> torch.Tensor:
    """Centres (B, M, C): the assignment-weighted means of the tokens that may join them.

    Each tile sums its tokens per neighbourhood slot (one batched product, with an extra all-zero slot for the
    padding of ``incoming``); each centre then adds up the few (at most 4) slots that hold it, one gather per holder,
    as the official sum over all tokens with the masked assignment does.
    """
    B, G, T, S = assignment.shape
    assignment = torch.cat([assignment, assignment.new_zeros(B, G, T, 1)], dim=-1)
    partial = (assignment.transpose(-1, -2) @ tiles).reshape(B, G * (S + 1), -1)
    mass = assignment.sum(dim=2).reshape(B, G * (S + 1))
    total = sum(partial.index_select(1, holders) for holders in incoming.unbind(1))
    total_mass = sum(mass.index_select(1, holders) for holders in incoming.unbind(1))
    return total / total_mass.clamp(min=1e-16).unsqueeze(-1)  # the official clamp


def _average_pool_matrix(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) matrix averaging the bins of ``F.adaptive_avg_pool1d``: [floor(i * in / out),
    ceil((i + 1) * in / out)) for output i."""
    start = torch.arange(out_size, device=like.device) * in_size // out_size
    end = (torch.arange(1, out_size + 1, device=like.device) * in_size + out_size - 1) // out_size
    position = torch.arange(in_size, device=like.device)
    inside = (position >= start[:, None]) & (position < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def token_clustering(
        tokens: torch.Tensor,
        grid: Tuple[int, int],
        cluster_grid: Tuple[int, int],
        iters: int = 5,
        window: int = 5,
        temperature: float = 0.02,
) -> torch.Tensor:
    """Local soft k-means of a token grid into a grid of cluster centres (the token clustering layer).

    Args:
        tokens: (B, N, C) patch tokens of an H x W grid in row-major order.
        grid: (H, W).
        cluster_grid: (h, w), h <= H and w <= W.
        iters: Assignment/update rounds (0 keeps the average-pooled initial centres).
        window: Odd side of the window of cells each token may join.
        temperature: Multiplies the squared distances in the assignment softmax.

    Returns:
        (B, h * w, C) cluster centres in row-major cell order.
    """
    B, N, C = tokens.shape
    (height, width), (h, w) = grid, cluster_grid
    if N != height * width:
        raise ValueError(f"token_clustering got {N} tokens for a {height}x{width} grid")
    if not (1 <= h <= height and 1 <= w <= width):
        raise ValueError(f"cluster grid {h}x{w} does not fit the {height}x{width} token grid")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 1, got {window}")
    tables = cluster_windows(grid, cluster_grid, window, tokens.device)
    # Adaptive average pooling as two averaging matrices (the same bins): every exporter takes it for any sizes,
    # while the TorchScript ONNX exporter refuses adaptive_avg_pool2d when the output does not divide the input.
    rows = _average_pool_matrix(height, h, tokens)
    cols = _average_pool_matrix(width, w, tokens)
    centres = (rows @ tokens.reshape(B, height, width * C)).reshape(B, h * width, C)
    centres = (cols @ centres.reshape(B * h, width, C)).reshape(B, h * w, C)
    tiles = _rows(tokens, tables.tile_tokens)  # (B, G, T, C)
    for _ in range(iters):
        with torch.no_grad():  # the official update detaches the assignment
            assignment = _window_assignment(tiles, centres, tables, temperature)
        centres = _window_means(assignment, tiles, tables.incoming)
    return centres


def reconstruction_weights(
        tokens: torch.Tensor, centres: torch.Tensor, k: int = 20, temperature: float = 0.02,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each token's k nearest cluster centres and their reconstruction weights (the token reconstruction layer).

    Args:
        tokens: (B, N, C) the patch tokens that entered clustering.
        centres: (B, M, C) the cluster centres clustering produced.
        k: Centres per token, 1 <= k <= M.
        temperature: Multiplies the squared distances.

    Returns:
        Indices (B, N, k) of the nearest centres, nearest first, and their weights (B, N, k): exp(-temperature * D),
        L2-normalized over the k (the official normalization; they do not sum to one).
    """
    M = centres.shape[1]
    if not 1 <= k <= M:
        raise ValueError(f"k must be in [1, {M}] (the number of clusters), got {k}")
    # D up to the token's own |x|^2, which the shift by the nearest distance below removes
    scores = torch.baddbmm(centres.square().sum(-1).unsqueeze(1), tokens, centres.transpose(1, 2), alpha=-2)
    nearest, index = scores.topk(k, dim=-1, largest=False, sorted=True)
    weights = torch.exp(-temperature * (nearest - nearest[..., :1]))
    return index, F.normalize(weights, dim=-1)
