"""The OpenMMLab configs of every family: layout, naming, building from the real configs, clear build-time errors.

Families are the folders of configs/ (besides _base_), so a new family is tested as soon as its folder exists. A
family has one synthetic leaf per task (its recommended setting, trained end to end in test_mm_train.py) and one or
more COCO / ADE20K leaves (e.g. a dense setting beside the paper's classification setting), every one of them built
here. Models are built with a 4-block backbone (``tiny_options``); a family whose settings do not fit 4 blocks at
128x128 adds its kwargs to ``TINY_KWARGS``.
"""
import ast
import re
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import tokenzoo
import tokenzoo.mm as tm

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
FAMILIES = sorted(p.name for p in CONFIG_ROOT.iterdir() if p.is_dir() and p.name != "_base_")
# Settings that fit 4 blocks and 64-80 tokens, by family folder.
TINY_KWARGS: Dict[str, Dict[str, Any]] = {
    "evit": dict(reduction_loc=(1, 2)),
    "tome": dict(reduction_loc=(1, 2)),
    "mctf": dict(reduction_loc=(1, 2, 3)),
    "expedit": dict(cluster_loc=1, recon_k=4),  # 3x3 clusters of the smallest test inputs (64x64: a 4x4 grid)
}
TASKS = ("det", "seg")
# Leaf configs of each family, by the dataset field of their name.
PATTERNS = {
    ("det", "real"): "mask-rcnn_*_sfp_*_coco.py",
    ("det", "synthetic"): "mask-rcnn_*_sfp_*_synthetic.py",
    ("seg", "real"): "upernet_*_mln_*_ade20k-512x512.py",
    ("seg", "synthetic"): "upernet_*_mln_*_synthetic.py",
}
CASES = [(family, task) for family in FAMILIES for task in TASKS]


pytestmark = pytest.mark.usefixtures("one_thread")


def family_configs(family: str, task: str, dataset: str) -> List[Path]:
    """The leaf configs of a family for a task ('det'/'seg') and dataset ('real'/'synthetic'): one synthetic leaf,
    one or more real ones."""
    found = sorted((CONFIG_ROOT / family).glob(PATTERNS[task, dataset]))
    assert found, f"configs/{family}/ needs a {PATTERNS[task, dataset]}"
    assert dataset == "real" or len(found) == 1, f"configs/{family}/ needs one {PATTERNS[task, dataset]}: {found}"
    return found


def family_config(family: str, task: str) -> Path:
    """The synthetic leaf of a family for a task: its recommended setting."""
    return family_configs(family, task, "synthetic")[0]


REAL_CASES = [(family, task, path.name) for family, task in CASES for path in family_configs(family, task, "real")]


def tiny_options(family: str, task: str) -> Dict[str, Any]:
    """cfg_options for a 4-block backbone and narrow heads: the real model's structure, at a size CPU tests afford."""
    opts: Dict[str, Any] = {"model.backbone.model_kwargs.depth": 4}
    for key, value in TINY_KWARGS.get(family, {}).items():
        opts[f"model.backbone.model_kwargs.{key}"] = value
    if task == "det":
        width = 64
        opts.update({
            "model.backbone.out_indices": (3,),
            "model.neck.out_channels": width,
            "model.rpn_head.in_channels": width,
            "model.rpn_head.feat_channels": width,
            "model.roi_head.bbox_roi_extractor.out_channels": width,
            "model.roi_head.mask_roi_extractor.out_channels": width,
            "model.roi_head.bbox_head.in_channels": width,
            "model.roi_head.bbox_head.conv_out_channels": width,
            "model.roi_head.bbox_head.fc_out_channels": 2 * width,
            "model.roi_head.mask_head.in_channels": width,
            "model.roi_head.mask_head.conv_out_channels": width,
            "model.train_cfg.rpn_proposal.max_per_img": 200,
            "model.train_cfg.rcnn.sampler.num": 64,
            "model.test_cfg.rpn.max_per_img": 100,
        })
    else:
        opts.update({
            "model.backbone.out_indices": (0, 1, 2, 3),
            "model.neck.out_channels": 64,
            "model.decode_head.in_channels": [64] * 4,
            "model.decode_head.channels": 64,
            "model.auxiliary_head.in_channels": 64,
            "model.auxiliary_head.channels": 32,
        })
    return opts


def _bases(path: Path) -> List[Path]:
    """The ``_base_`` files a config names (read without executing it)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_base_" for t in node.targets):
            value = ast.literal_eval(node.value)
            return [(path.parent / p).resolve() for p in ([value] if isinstance(value, str) else value)]
    return []


def _depth(path: Path) -> int:
    return 1 + max((_depth(base) for base in _bases(path)), default=-1)


def test_every_family_has_the_four_configs() -> None:
    assert {"deit", "evit"} <= set(FAMILIES)
    for family in FAMILIES:
        for task, dataset in PATTERNS:
            family_configs(family, task, dataset)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_names_layout_and_inheritance(family: str) -> None:
    # {algorithm}_{backbone}_{neck}_{schedule}_{dataset}.py, words joined by '-', the backbone field naming the family
    grammar = re.compile(r"^(mask-rcnn|upernet)_([a-z0-9.]+(?:-[a-z0-9.]+)*)_(sfp|mln)_(\d+xb\d+-[a-z0-9-]+)_"
                         r"([a-z0-9]+(?:-[a-z0-9]+)*)\.py$")
    for path in sorted((CONFIG_ROOT / family).glob("*.py")):
        match = grammar.match(path.name)
        assert match, f"{path.name} does not follow the OpenMMLab naming grammar"
        assert match.group(2).startswith(family), f"{path.name}: the backbone field should start with {family!r}"
        assert _depth(path) <= 2, f"{path.name} inherits more than two levels"
        assert "_delete_" not in path.read_text(), f"{path.name} uses _delete_"


@pytest.mark.parametrize("family, task, name", REAL_CASES)
def test_build_from_real_config(family: str, task: str, name: str) -> None:
    """The COCO / ADE20K configs build (the real Pretrained init_cfg is kept: building loads no weights)."""
    path = CONFIG_ROOT / family / name
    model = tm.build_model(path, tiny_options(family, task)).eval()
    backbone = model.backbone
    assert isinstance(backbone, tm.TokenZooViT)
    assert backbone.model_name == tm.read_config(path).model.backbone.model_name
    assert backbone.pretrained is not None and backbone.pretrained["checkpoint"].startswith("https://")
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        if task == "det":
            pyramid = model.extract_feat(x)
            # strides 4-32 from the stride-16 map; the extra level halves the stride-32 one, rounding up
            expected = [(1, 64, -(-128 // s), -(-160 // s)) for s in (4, 8, 16, 32, 64)]
            assert [tuple(p.shape) for p in pyramid] == expected
        else:
            logits = model(x, mode="tensor")
            assert logits.shape == (1, 150, 32, 40)


@pytest.mark.parametrize("task", TASKS)
def test_bad_backbone_settings_fail_at_build_time(task: str, tmp_path: Path) -> None:
    (path,) = family_configs("evit", task, "real")
    with pytest.raises(ValueError, match="unknown backbone model_name 'evit_smal'.*evit_small.*timm.list_models"):
        tm.build_model(path, {"model.backbone.model_name": "evit_smal"})
    missing = tmp_path / "deit_small.pth"
    with pytest.raises(FileNotFoundError, match="deit_small.pth' does not exist"):
        tm.build_model(path, {"model.backbone.init_cfg.checkpoint": str(missing)})
    with pytest.raises(ValueError, match=r"out_indices \(3, 12\) out of range .* 12 blocks"):
        tm.build_model(path, {"model.backbone.out_indices": (3, 12)})


def test_unknown_task_scope_is_refused() -> None:
    cfg = tm.read_config(family_config("deit", "det"))
    cfg.default_scope = "mmpretrain"
    with pytest.raises(ValueError, match="default_scope 'mmpretrain'"):
        tm.read_config(cfg)


@pytest.mark.parametrize("family, task, name", REAL_CASES)
def test_build_backbone_for_dense_benchmarks(family: str, task: str, name: str) -> None:
    """``build_backbone`` (what a dense benchmark calls) gives the config's backbone at the config's training size."""
    path = CONFIG_ROOT / family / name
    backbone = tm.build_backbone(path, {"model.backbone.model_kwargs.depth": 4, **{
        f"model.backbone.model_kwargs.{k}": v for k, v in TINY_KWARGS.get(family, {}).items()},
        "model.backbone.out_indices": (3,)})
    assert not backbone.training and backbone.pretrained is None
    assert backbone.img_size == ((1024, 1024) if task == "det" else (512, 512))
    with torch.no_grad():
        (feature,) = backbone(torch.randn(1, 3, 64, 96))
    assert feature.shape == (1, 384, 4, 6)


def test_family_configs_only_swap_the_backbone() -> None:
    """A family's config equals the DeiT baseline's but for the backbone name and kwargs (like-for-like comparison)."""
    for family in FAMILIES:
        for task, dataset in PATTERNS:
            (base_path,) = family_configs("deit", task, dataset)
            base = tm.read_config(base_path).to_dict()
            base["model"]["backbone"] = {k: v for k, v in base["model"]["backbone"].items()
                                         if k not in ("model_name", "model_kwargs")}
            for path in family_configs(family, task, dataset):
                cfg = tm.read_config(path).to_dict()
                name = cfg["model"]["backbone"].pop("model_name")
                cfg["model"]["backbone"].pop("model_kwargs")
                assert cfg == base, f"{path.name} differs from the DeiT baseline beyond the backbone"
                assert name.split(".")[0] in tokenzoo.list_models() or family == "deit", path.name


def test_load_config_command_line_settings(tmp_path: Path) -> None:
    path = family_config("evit", "det")
    cfg = tm.load_config(path)
    assert cfg.work_dir == f"work_dirs/{path.stem}" and not cfg.resume and cfg.launcher == "none"
    assert cfg.optim_wrapper.type == "OptimWrapper"  # mixed precision is off unless asked for
    checkpoint = tmp_path / "iter_4.pth"
    checkpoint.touch()
    cfg = tm.load_config(path, work_dir=tmp_path, resume=str(checkpoint))
    assert cfg.resume and cfg.load_from == str(checkpoint) and cfg.work_dir == str(tmp_path)
    cfg = tm.load_config(path, resume="auto")
    assert cfg.resume and cfg.load_from is None  # mmengine then takes the work dir's last checkpoint
    with pytest.raises(FileNotFoundError, match="iter_8.pth' does not exist"):
        tm.load_config(path, resume=str(tmp_path / "iter_8.pth"))
    with pytest.raises(ValueError, match="either resume .* or load_from"):
        tm.load_config(path, resume="auto", load_from=checkpoint)
    with pytest.raises(ValueError, match="launcher"):
        tm.load_config(path, launcher="torchrun")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--amp needs a GPU"):
            tm.load_config(path, amp=True)


@pytest.mark.parametrize("family, task", CASES)
def test_synthetic_configs_run_as_shipped(family: str, task: str) -> None:
    """The README's synthetic configs, without the tests' tiny overrides: the backbone builds (its settings are
    checked at the training size then) and runs at the size the synthetic sets have."""
    backbone = tm.build_backbone(family_config(family, task))
    assert backbone.img_size == (128, 128)
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 128, 128))
    assert all(m.shape == (2, backbone.embed_dim, 8, 8) and torch.isfinite(m).all() for m in maps)


@pytest.mark.parametrize("task", TASKS)
def test_data_root_moves_every_loader_and_evaluator(task: str, tmp_path: Path) -> None:
    from tokenzoo.mm.synthetic import write_instance_set, write_segmentation_set

    path = family_config("deit", task)
    cfg = tm.load_config(path, data_root=tmp_path / "set")
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        assert cfg[loader].dataset.data_root == f"{tmp_path / 'set'}/"
    for evaluator in ("val_evaluator", "test_evaluator"):
        assert "ann_file" not in cfg[evaluator] or cfg[evaluator].ann_file.startswith(f"{tmp_path / 'set'}/")
    with pytest.raises(FileNotFoundError, match="train_dataloader data_root .* does not exist.*--data-root DIR"):
        tm.check_data(cfg, ["train_dataloader"])
    (write_instance_set if task == "det" else write_segmentation_set)(tmp_path / "set", num_train=2, num_val=1,
                                                                       img_size=64)
    tm.check_data(cfg, ["train_dataloader", "val_dataloader", "test_dataloader"])


def test_train_tool_stops_in_one_line_when_the_data_are_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import runpy

    main = runpy.run_path(str(CONFIG_ROOT.parent / "tools" / "train.py"))["main"]
    with pytest.raises(SystemExit) as exit_info:
        main([str(family_config("evit", "det")), "--data-root", str(tmp_path / "nowhere"),
              "--work-dir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "work").exists(), "nothing is written before the input is checked"
