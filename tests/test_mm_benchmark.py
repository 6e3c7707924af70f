"""tools/benchmark.py --dense and tools/model_zoo.py on OpenMMLab configs: backbones timed side by side."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "configs" / family / f"upernet_{name}_mln_1xb2-200i_synthetic.py"
           for family, name in (("deit", "deit-small"), ("evit", "evit-small-kr0.7"))]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.slow
def test_dense_benchmark_times_config_backbones_and_feeds_the_model_zoo(tmp_path) -> None:
    out = tmp_path / "dense.json"
    result = _run("tools/benchmark.py", "--dense", *map(str, CONFIGS), "--warmup", "1", "--iters", "2",
                  "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    deit, evit = report["models"]
    assert report["settings"]["dense"] and report["settings"]["base"] == str(CONFIGS[0])
    assert (deit["model_name"], evit["model_name"]) == ("deit_small_patch16_224", "evit_small")
    assert deit["img_size"] == evit["img_size"] == [128, 128]
    assert evit["tokens_per_block"] == [64, 64, 64, 46, 46, 46, 34, 34, 34, 25, 25, 25]  # ceil(0.7 n) + fused
    assert deit["ratios"]["gmacs"] == 1.0 and evit["ratios"]["gmacs"] < 0.8
    assert "| upernet_evit-small-kr0.7_mln_1xb2-200i_synthetic.py | `evit_small` | 128x128 |" in result.stdout

    zoo = tmp_path / "model_zoo.md"
    assert _run("tools/model_zoo.py", str(out), "--out", str(zoo)).returncode == 0
    assert "backbones inside detection / segmentation" in zoo.read_text()


def test_dense_benchmark_rejects_a_missing_config_before_any_work(tmp_path) -> None:
    result = _run("tools/benchmark.py", "--dense", str(CONFIGS[0]), str(tmp_path / "missing.py"))
    assert result.returncode != 0
    assert "expects config files; not found" in result.stderr
