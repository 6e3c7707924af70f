"""Per-block reduction schedules: one parser for every family that removes a number (or a fraction) of tokens.

A schedule says, for each block, how much it reduces: an int (that many tokens) or a float in [0, 1) (that fraction
of the patch tokens entering the block, the form dense inputs of varying size need). Each block then caps it at what
its method allows (ToMe's half of the tokens, MCTF's 10-token floor, a windowed split's 1 - 1/s^2), so every schedule
runs on every input size and ``token_counts`` reports what runs.
"""
import math
from numbers import Integral, Real
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["RSchedule", "check_merge_window", "check_reduction_loc", "reduction_schedule", "tokens_to_reduce"]

Amount = Union[int, float]
RSchedule = Union[Amount, Sequence[Amount], Tuple[int, float]]


def check_reduction_loc(reduction_loc: Sequence[int], depth: int) -> Tuple[int, ...]:
    """Sorted distinct block indices that reduce, or ValueError naming the allowed range."""
    if isinstance(reduction_loc, (int, str)) or not all(
            isinstance(i, Integral) and not isinstance(i, bool) and 0 <= i < depth for i in reduction_loc):
        raise ValueError(f"reduction_loc must be a sequence of block indices in [0, {depth - 1}] (depth {depth}), "
                         f"got {reduction_loc!r}")
    return tuple(sorted({int(i) for i in reduction_loc}))


def _amount(value: object) -> Optional[Amount]:
    """A valid per-block amount (int >= 0, or a float fraction in [0, 1)), or None."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    if isinstance(value, Integral):
        return int(value) if value >= 0 else None
    return float(value) if math.isfinite(value) and 0 <= value < 1 else None


def reduction_schedule(r: RSchedule, depth: int, reduction_loc: Optional[Sequence[int]] = None) -> List[Amount]:
    """How much each block reduces, from a family's ``r`` knob (ToMe's ``parse_r``, extended to fractions).

    Args:
        r: One of
            * an int: that many tokens at each block of ``reduction_loc``;
            * a float in [0, 1): that fraction of the block's patch tokens at each block of ``reduction_loc``;
            * a list with one entry (int or float, as above) per block, padded with zeros to ``depth``;
            * a tuple ``(r, inflection)``, r an int and inflection in [-1, 1]: ToMe's linear ramp with mean r, from
              r * (1 - inflection) in the first block to r * (1 + inflection) in the last.
        depth: Number of blocks.
        reduction_loc: Blocks that reduce, for an int or float r; every block when None. A list or tuple r says
            per block already and takes no reduction_loc.

    Returns:
        ``depth`` amounts: ints (tokens) and floats (fractions), zero for blocks that do not reduce.

    Raises:
        ValueError: Any other form, a negative or non-finite amount, a fraction of 1 or more, a list longer than
            ``depth``, or reduction_loc together with a list or tuple r.
    """
    forms = ("r must be an int >= 0 (tokens per block), a float in [0, 1) (fraction of the patch tokens), a list of "
             "those (one per block) or a tuple (r, inflection)")
    if isinstance(r, (list, tuple)) and reduction_loc is not None:
        raise ValueError(f"reduction_loc applies to an int or float r; a {type(r).__name__} r already says per "
                         f"block, got r={r!r} and reduction_loc={reduction_loc!r}")
    if isinstance(r, list):
        amounts = [_amount(v) for v in r]
        if len(r) > depth or any(a is None for a in amounts):
            raise ValueError(f"a per-block r list must hold at most {depth} entries, each an int >= 0 or a float in "
                             f"[0, 1), got {r!r}")
        return amounts + [0] * (depth - len(r))
    if isinstance(r, tuple):
        if len(r) != 2 or _amount(r[0]) is None or not isinstance(r[0], Integral) or \
                isinstance(r[1], bool) or not isinstance(r[1], Real) or not -1 <= r[1] <= 1:
            raise ValueError(f"a tuple r must be (r, inflection): r an int >= 0 and inflection in [-1, 1]; got {r!r}")
        first = int(r[0] * (1.0 - r[1]))
        step = (2 * r[0] - 2 * first) / max(depth - 1, 1)
        return [int(first + step * i) for i in range(depth)]
    amount = _amount(r)
    if amount is None:
        raise ValueError(f"{forms}; got {r!r}")
    blocks = range(depth) if reduction_loc is None else check_reduction_loc(reduction_loc, depth)
    return [amount if i in blocks else 0 for i in range(depth)]


def tokens_to_reduce(amount: Amount, num_patch_tokens: int) -> int:
    """The amount of one block as a token count for ``num_patch_tokens`` entering it (a fraction rounds down)."""
    return amount if isinstance(amount, int) else int(amount * num_patch_tokens)


def check_merge_window(window: Optional[int]) -> Optional[int]:
    """None (ToMe's alternating split) or the window of a windowed first merge, an int >= 2."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, Integral) or window < 2):
        raise ValueError(f"merge_window must be None (alternating split) or an int >= 2 (one set-B token per "
                         f"window x window cell of the grid at the first merge), got {window!r}")
    return window if window is None else int(window)
