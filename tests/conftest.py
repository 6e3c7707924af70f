"""Shared fixtures and the `slow` marker (slow tests run by default; `-m "not slow"` skips them)."""
from typing import Dict, Iterator, List

import pytest
import torch

import tokenzoo  # noqa: F401  registers the families with timm


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def record_block_outputs(model: torch.nn.Module) -> List[int]:
    """Patch-token count of each block's output, filled in as the model runs (reads what actually ran)."""
    counts: List[int] = []

    def hook(module: torch.nn.Module, args, output) -> None:
        tokens = output[0] if isinstance(output, tuple) else output
        counts.append(tokens.shape[1] - model.num_prefix_tokens)

    for blk in model.blocks:
        blk.register_forward_hook(hook)
    return counts


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module: tiny models are latency-bound, extra threads only contend on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deit_state_dicts() -> Dict[str, Dict[str, torch.Tensor]]:
    """Random-init timm DeiT state dicts by size, standing in for the weights this machine cannot download."""
    import timm

    return {size: timm.create_model(f"deit_{size}_patch16_224").state_dict() for size in ("tiny", "small")}
