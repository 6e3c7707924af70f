"""Sparsifiner's attention against dense attention: time per block of each path, and MHSA / whole-model GMACs.

Times one attention layer (DeiT-S dims: 6 heads of 64, batch 1, random weights) at the token counts of several input
sizes, all variants round-robin in one process so that a busy machine slows them alike, and reports the fastest run
of each (figures stay approximate):

* dense: fused SDPA over all N x N pairs (what DeiT runs);
* predictor: the connectivity predictor's coefficients and sparse basis;
* select: the approximate attention and its top-k keys per query (``connectivity_index``);
* masked: the mask from the selection and SDPA with it (attention on the connectivity, selection excluded);
* gather: the gather path (attention on the connectivity, its own chunked selection subtracted);
* masked total / gather total: predictor + selection + attention, i.e. all a block spends instead of dense attention.

Then GMACs for DeiT-S and Sparsifiner-S (``--model``), with token sparsity too: MHSA in the paper's accounting
(``mhsa_gmacs``: attention products and predictor, counted sparse) and as run (FlopCounterMode on the eval path), and
the whole model both ways (as run, and with its MHSA part replaced by the paper's accounting).

Usage::

    python tools/sparsifiner_attention.py --img-sizes 64 96 128 160 224 384 --iters 20
"""
import argparse
import math
import sys
import time
from typing import Callable, Dict, List, Tuple

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tokenzoo  # noqa: F401  registers the families
from tokenzoo.layers import connectivity_index, connectivity_mask, gathered_sparse_attention, masked_sparse_attention
from tokenzoo.profiling import machine_info  # also registers the FLOP formulas of SDPA and embedding_bag
from tokenzoo.sparsifiner import ConnectivityPredictor, mhsa_gmacs

VARIANTS = ("dense", "predictor", "select", "masked", "gather")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-sizes", type=int, nargs="+", default=[64, 96, 128, 160, 224, 384],
                        help="square input sizes whose token counts are timed (default: 64 96 128 160 224 384)")
    parser.add_argument("--gmacs-sizes", type=int, nargs="+", default=[224, 384],
                        help="input sizes of the GMACs table (default: 224 384)")
    parser.add_argument("--model", default="sparsifiner_small", help="Sparsifiner model of the GMACs table")
    parser.add_argument("--base", default="deit_small_patch16_224", help="dense model of the GMACs table")
    parser.add_argument("--keep", type=float, default=0.25, help="attention keep rate (default: 0.25)")
    parser.add_argument("--iters", type=int, default=20, help="timed rounds (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    return parser


def time_attention(img_size: int, keep: float, iters: int, warmup: int, heads: int = 6,
                   head_dim: int = 64) -> Dict[str, float]:
    """Median ms per call of each variant (see the module docstring) at the token count of ``img_size``."""
    grid = (img_size // 16, img_size // 16)
    num_tokens = grid[0] * grid[1] + 1
    budget = min(num_tokens, math.ceil(keep * num_tokens))
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, num_tokens, head_dim, generator=generator) for _ in range(3))
    predictor = ConnectivityPredictor(head_dim, heads, grid, num_basis=197 // 6).eval()
    scale = head_dim ** -0.5
    coef, basis = predictor(q, k, grid)
    mask = connectivity_mask(connectivity_index(coef, basis, budget), num_tokens)
    calls: Dict[str, Callable[[], object]] = {
        "dense": lambda: F.scaled_dot_product_attention(q, k, v),
        "predictor": lambda: predictor(q, k, grid),
        "select": lambda: connectivity_index(coef, basis, budget),
        "masked": lambda: masked_sparse_attention(
            q, k, v, connectivity_mask(connectivity_index(coef, basis, budget), num_tokens, dtype=q.dtype)),
        "gather": lambda: gathered_sparse_attention(q, k, v, coef, basis, budget, scale),
    }
    times: Dict[str, List[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        assert (calls["gather"]() - masked_sparse_attention(q, k, v, mask)).abs().max() < 1e-4
        for i in range(warmup + iters):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    # the fastest run: on a shared machine contention only ever adds time, so the minimum is the steadiest estimate
    ms = {name: min(values) for name, values in times.items()}
    ms["masked"] -= ms["select"]  # attention on the connectivity alone
    ms["gather"] -= ms["select"]
    ms["masked total"] = ms["predictor"] + ms["select"] + ms["masked"]
    ms["gather total"] = ms["predictor"] + ms["select"] + ms["gather"]
    return dict(tokens=num_tokens, budget=budget, **ms)


def main(argv: List[str] = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"# {info.get('cpu', '?')}, torch {torch.__version__}, {args.threads} thread(s), batch 1, DeiT-S heads, "
          f"keep {args.keep}; fastest of {args.iters} round-robin runs, approximate", file=sys.stderr)
    columns = ("dense", "predictor", "select", "masked", "gather", "masked total", "gather total")
    print("| input | tokens | keys kept | " + " | ".join(f"{c} (ms)" for c in columns) + " | gather total / dense |")
    print("|" + "---|" * (len(columns) + 4))
    for img_size in args.img_sizes:
        r = time_attention(img_size, args.keep, args.iters, args.warmup)
        print(f"| {img_size} | {r['tokens']} | {r['budget']} | " + " | ".join(f"{r[c]:.2f}" for c in columns) +
              f" | {r['gather total'] / r['dense']:.2f} |", flush=True)

    print("\n| model | input | MHSA GMACs, paper accounting | vs base | MHSA GMACs as run | whole model, paper "
          "accounting | vs base | whole model as run | vs base |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = timm.create_model(args.base, dynamic_img_size=True).eval()
    models = [(args.base, base), (args.model, timm.create_model(args.model).eval()),
              (f"{args.model} token_keep_rate=0.7", timm.create_model(args.model, token_keep_rate=0.7).eval())]
    for img_size in args.gmacs_sizes:
        reference = None
        for name, model in models:
            mhsa, (total, mhsa_run) = mhsa_gmacs(model, img_size), gmacs_as_run(model, img_size)
            paper_total = total - mhsa_run + mhsa
            reference = reference or (mhsa, paper_total, total)
            print(f"| {name} | {img_size} | {mhsa:.3f} | {mhsa / reference[0] - 1:+.1%} | {mhsa_run:.3f} | "
                  f"{paper_total:.3f} | {paper_total / reference[1] - 1:+.1%} | {total:.3f} | "
                  f"{total / reference[2] - 1:+.1%} |", flush=True)
    return 0


def gmacs_as_run(model: torch.nn.Module, img_size: int) -> Tuple[float, float]:
    """Whole-model GMACs as run (FlopCounterMode, the eval path) and the part of them that is MHSA.

    MHSA as run: fused attention, the 4-D products (predictor, the gather path's scores), the predictor's bias-free
    products and the gather path's value sum; every Linear of the model has a bias (addmm), so none is included.
    """
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img_size, img_size))
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    mhsa_ops = ("aten._scaled_dot_product_flash_attention_for_cpu", "aten.bmm", "aten.mm", "aten.embedding_bag",
                "aten._embedding_bag_forward_only")
    return sum(by_op.values()) / 2e9, sum(by_op.get(op, 0) for op in mhsa_ops) / 2e9


if __name__ == "__main__":
    sys.exit(main())
