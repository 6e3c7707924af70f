"""End-to-end runs of every family's synthetic configs on CPU: train, test (evaluator), resume, infer.

Each family and task trains once (a module-scoped fixture) for a few iterations on the synthetic sets with the
tiny-backbone options of test_mm_configs.py; the tests then check that run, resume it, evaluate and draw its
checkpoint through the command-line tools.
"""
import json
import runpy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.hooks import Hook
from PIL import Image

import tokenzoo.mm as tm
from tokenzoo.mm.synthetic import write_instance_set, write_segmentation_set
from test_mm_configs import CASES, family_config, tiny_options

TOOLS = Path(__file__).resolve().parents[1] / "tools"
NUM_ITERS = 8


@dataclass
class Run:
    family: str
    task: str
    config_file: Path  # the run's full config, as tools/test.py and tools/infer.py get it
    work_dir: Path
    checkpoint: Path
    losses: np.ndarray  # total loss of every iteration


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_instance_set(root / "coco", num_train=8, num_val=2)
    write_segmentation_set(root / "ade", num_train=8, num_val=2)
    return root


def task_data_root(task: str, synthetic_data: Path) -> Path:
    return synthetic_data / ("coco" if task == "det" else "ade")


def run_options(max_iters: int) -> Dict[str, Any]:
    """A short, seeded, constant-lr schedule without validation, checkpointing at the end."""
    opts: Dict[str, Any] = {
        "randomness": dict(seed=0),
        # lr 1e-3 without warm-up: in 8 iterations the loss then falls by >10% (by <1% or not at all with lr 0).
        "optim_wrapper.optimizer.lr": 1e-3,
        "param_scheduler": [],
        "train_cfg.max_iters": max_iters,
        "train_cfg.val_interval": 10 * max_iters,
        "default_hooks.checkpoint.interval": max_iters,
        "default_hooks.logger.interval": 1,
    }
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        opts[f"{loader}.num_workers"] = 0
    return opts


def _unique_name(prefix: str) -> str:
    # mmengine keeps loggers, visualizers and scopes per experiment name; its default name only has 1 s resolution.
    return f"{prefix}-{time.time_ns()}"


@pytest.fixture(scope="module", params=CASES, ids=[f"{family}-{task}" for family, task in CASES])
def run(request: pytest.FixtureRequest, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    family, task = request.param
    work_dir = tmp_path_factory.mktemp(f"{family}-{task}")
    options = {**tiny_options(family, task), **run_options(NUM_ITERS)}
    cfg = tm.load_config(family_config(family, task), cfg_options=options, work_dir=work_dir,
                         data_root=task_data_root(task, synthetic_data))
    cfg.experiment_name = _unique_name(f"{family}-{task}")
    config_file = work_dir / "run_config.py"
    cfg.dump(config_file)
    runner = tm.build_runner(cfg)
    runner.train()
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    return Run(family, task, config_file, work_dir, work_dir / f"iter_{NUM_ITERS}.pth", losses)


def test_train_loss_is_finite_and_falls(run: Run) -> None:
    assert len(run.losses) == NUM_ITERS and np.isfinite(run.losses).all()
    # Means of 3 iterations even out batch-to-batch noise; 5% is well above what untrained runs show (lr 0: < 1%).
    first, last = run.losses[:3].mean(), run.losses[-3:].mean()
    assert last < 0.95 * first, f"{run.family} {run.task}: loss did not fall: {np.round(run.losses, 3).tolist()}"
    assert run.checkpoint.is_file()


def test_test_tool_evaluates_the_checkpoint(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main = runpy.run_path(str(TOOLS / "test.py"))["main"]
    main([str(run.config_file), str(run.checkpoint), "--work-dir", str(tmp_path),
          "--cfg-options", f"experiment_name={_unique_name('test')}"])
    out = capsys.readouterr().out
    metrics = json.loads(out[out.rindex("\n{") + 1:])  # the tool prints the metrics last, after the Runner's log
    expected = {"coco/bbox_mAP", "coco/segm_mAP"} if run.task == "det" else {"mIoU", "aAcc"}
    assert expected <= set(metrics) and all(np.isfinite(metrics[key]) for key in expected)


class _RecordIters(Hook):
    def __init__(self) -> None:
        self.iters: List[int] = []

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self.iters.append(runner.iter)


def test_resume_continues_at_the_saved_iteration(run: Run) -> None:
    cfg = tm.load_config(Config.fromfile(str(run.config_file)), work_dir=run.work_dir, resume="auto",
                         cfg_options={"train_cfg.max_iters": NUM_ITERS + 2})
    cfg.experiment_name = _unique_name("resume")
    runner = tm.build_runner(cfg)
    record = _RecordIters()
    runner.register_hook(record)
    runner.train()
    assert record.iters == [NUM_ITERS, NUM_ITERS + 1]
    assert runner.iter == NUM_ITERS + 2
    assert len(runner.message_hub.get_scalar("train/loss").data[0]) == NUM_ITERS + 2  # the log history came back too
    assert (run.work_dir / f"iter_{NUM_ITERS + 2}.pth").is_file()


def test_infer_tool_draws_predictions(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main = runpy.run_path(str(TOOLS / "infer.py"))["main"]
    split = "val/000001.jpg" if run.task == "det" else "images/validation/000001.jpg"
    image = Path(tm.read_config(run.config_file).val_dataloader.dataset.data_root) / split
    out = tmp_path / "pred.png"
    args = [str(run.config_file), str(run.checkpoint), str(image), "--out", str(out)]
    main(args)
    assert Image.open(out).size == Image.open(image).size
    with pytest.raises(SystemExit) as exit_info:  # the tool ends in one line, exit code 2, before loading a model
        main(args)
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err
    main(args + ["--force"])
