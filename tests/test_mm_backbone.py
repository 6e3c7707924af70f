"""tokenzoo.mm's building blocks: the backbone, the simple feature pyramid, layer-wise lr decay, checkpoint loading
through torch's safe unpickler, and the synthetic data generators."""
import io
import json
import pickle
import runpy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mmengine.logging import HistoryBuffer
from PIL import Image
from torch import nn

import tokenzoo.mm as tm
from tokenzoo.mm.synthetic import SEG_CLASSES, SHAPE_CLASSES, write_instance_set, write_segmentation_set
from test_mm_configs import FAMILIES, TINY_KWARGS, family_config

TOOLS = Path(__file__).resolve().parents[1] / "tools"


pytestmark = pytest.mark.usefixtures("one_thread")


def _family_backbone(family: str, **kwargs) -> tm.TokenZooViT:
    """The backbone of a family's (recommended) detection config, with 4 blocks."""
    backbone = tm.read_config(family_config(family, "det")).model.backbone
    model_kwargs = dict(backbone.model_kwargs, depth=4, **TINY_KWARGS.get(family, {}))
    return tm.TokenZooViT(backbone.model_name, model_kwargs, **kwargs)


def test_registered_names_resolve_from_mmdet_and_mmseg() -> None:
    import mmdet.registry
    import mmseg.registry
    from mmengine.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS

    for scope_models in (mmdet.registry.MODELS, mmseg.registry.MODELS):
        assert scope_models.parent is MODELS
        assert scope_models.get("TokenZooViT") is tm.TokenZooViT
        assert scope_models.get("TokenZooSimpleFPN") is tm.TokenZooSimpleFPN
        assert scope_models.get("TokenZooLN2d") is timm.layers.LayerNorm2d
    for scope_constructors in (mmdet.registry.OPTIM_WRAPPER_CONSTRUCTORS, mmseg.registry.OPTIM_WRAPPER_CONSTRUCTORS):
        assert scope_constructors.parent is OPTIM_WRAPPER_CONSTRUCTORS
        assert scope_constructors.get("TokenZooLayerDecayOptimizerConstructor") is \
            tm.TokenZooLayerDecayOptimizerConstructor


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(64, 64), (96, 160), (128, 112)])
def test_backbone_maps_full_resolution_stride_16(family: str, size: tuple) -> None:
    backbone = _family_backbone(family, out_indices=(0, 2, -1), img_size=128).eval()
    assert backbone.out_indices == (0, 2, 3) and backbone.out_strides == [16] * 3
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, *size))
    assert isinstance(maps, tuple)
    assert [tuple(m.shape) for m in maps] == [(2, c, size[0] // 16, size[1] // 16) for c in backbone.out_channels]
    assert all(torch.isfinite(m).all() for m in maps)


def test_backbone_prunes_unused_blocks_and_trains_every_parameter_with_checkpointing() -> None:
    backbone = _family_backbone("evit", out_indices=(1, 2), drop_path_rate=0.1, with_cp=True)
    assert len(backbone.vit.blocks) == 3  # block 3 would never be used
    assert isinstance(backbone.vit.norm, nn.Identity) and isinstance(backbone.vit.head, nn.Identity)
    assert backbone.vit.blocks[-1].drop_path1.drop_prob > 0
    sum(m.square().mean() for m in backbone(torch.randn(2, 3, 64, 64))).backward()
    assert not [n for n, p in backbone.named_parameters() if p.grad is None]


def test_backbone_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown backbone model_name 'vit_nope'.*evit_small"):
        tm.TokenZooViT("vit_nope")
    with pytest.raises(FileNotFoundError, match="nope.pth' does not exist"):
        tm.TokenZooViT("evit_tiny", init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "nope.pth")))
    with pytest.raises(ValueError, match="out of range"):
        tm.TokenZooViT("evit_tiny", dict(depth=4, reduction_loc=(1,)), out_indices=(-5,))
    with pytest.raises(ValueError, match="increasing order"):
        tm.TokenZooViT("evit_tiny", dict(depth=4, reduction_loc=(1,)), out_indices=(3, 1))
    with pytest.raises(ValueError, match="does not accept model_kwargs"):
        tm.TokenZooViT("evit_tiny", dict(depth=4, reduction_loc=(1,), not_an_argument=1))
    with pytest.raises(ValueError, match="must not set"):
        tm.TokenZooViT("evit_tiny", dict(num_classes=10))
    backbone = tm.TokenZooViT("evit_tiny", dict(depth=2, reduction_loc=(1,)))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        backbone(torch.randn(1, 3, 64, 72))


def test_pretrained_timm_state_dict_is_resampled(tmp_path: Path) -> None:
    """A DeiT state dict at 224 (14x14 positions) loads into a backbone built for 128 (8x8), head and norm unused."""
    deit = timm.create_model("deit_tiny_patch16_224", depth=2)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": deit.state_dict()}, path)
    backbone = tm.TokenZooViT("evit_tiny", dict(depth=2, reduction_loc=(1,)), img_size=128,
                              init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    backbone.init_weights()
    torch.testing.assert_close(backbone.vit.blocks[1].mlp.fc2.weight, deit.blocks[1].mlp.fc2.weight)
    assert backbone.vit.pos_embed.shape == (1, 1 + 64, 192)
    expected = timm.layers.resample_abs_pos_embed(deit.pos_embed, new_size=(8, 8), num_prefix_tokens=1)
    torch.testing.assert_close(backbone.vit.pos_embed, expected)


def test_pretrained_runner_checkpoint_with_prefix(tmp_path: Path) -> None:
    """The backbone of a full Runner-style checkpoint (message hub included) loads with prefix='backbone.'."""
    source = tm.TokenZooViT("evit_tiny", dict(depth=2, reduction_loc=(1,)), img_size=64)
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["neck.conv.weight"] = torch.zeros(1)
    history = HistoryBuffer()
    history.update(1.5)
    path = tmp_path / "iter_10.pth"
    torch.save({"meta": {"iter": 10}, "state_dict": state, "message_hub": {"log_scalars": {"loss": history}}}, path)
    backbone = tm.TokenZooViT("evit_tiny", dict(depth=2, reduction_loc=(1,)), img_size=64,
                              init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone."))
    backbone.init_weights()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[key], value)
    bad = tm.TokenZooViT("evit_tiny", dict(depth=2, reduction_loc=(1,)),
                         init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="model."))
    with pytest.raises(ValueError, match="no key of checkpoint .* starts with prefix 'model.'"):
        bad.init_weights()


def test_safe_loading_refuses_other_getattr() -> None:
    """The getattr that Runner checkpoints need is allowed for HistoryBuffer statistics only."""
    class Reaches:
        def __reduce__(self):
            return getattr, (HistoryBuffer, "__init__")

    buffer = io.BytesIO()
    torch.save({"x": Reaches()}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="getattr only for the HistoryBuffer statistics"):
        torch.load(buffer)


def test_simple_fpn_strides_and_channels() -> None:
    neck = tm.TokenZooSimpleFPN(in_channels=32, out_channels=16, num_outs=6)
    neck.init_weights()
    outs = neck((torch.randn(2, 32, 6, 10),))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 24, 40), (2, 16, 12, 20), (2, 16, 6, 10), (2, 16, 3, 5),
                                              (2, 16, 2, 3), (2, 16, 1, 2)]
    with pytest.raises(ValueError, match="num_outs"):
        tm.TokenZooSimpleFPN(in_channels=32, num_outs=3)
    with pytest.raises(ValueError, match=r"expects \(B, 32, H, W\)"):
        neck(torch.randn(2, 16, 6, 10))


def test_layer_decay_groups() -> None:
    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = tm.TokenZooViT("evit_tiny", dict(depth=3, reduction_loc=(1,)))
            self.neck = nn.Conv2d(192, 8, 1)

    model = Detector()
    constructor = tm.TokenZooLayerDecayOptimizerConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1.0, weight_decay=0.05)), dict(decay_rate=0.5))
    optimizer = constructor(model).optimizer
    settings = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(settings) == len(params)
    # embeddings: group 0, block i: i + 1, neck: 4 (top) -> lr 0.5 ** (4 - group); no decay for 1-d and embeddings
    assert settings[id(params["backbone.vit.pos_embed"])] == (0.5 ** 4, 0.0)
    assert settings[id(params["backbone.vit.patch_embed.proj.weight"])] == (0.5 ** 4, 0.05)
    assert settings[id(params["backbone.vit.blocks.0.attn.qkv.weight"])] == (0.5 ** 3, 0.05)
    assert settings[id(params["backbone.vit.blocks.2.norm1.weight"])] == (0.5, 0.0)
    assert settings[id(params["neck.weight"])] == (1.0, 0.05)
    assert settings[id(params["neck.bias"])] == (1.0, 0.0)
    assert optimizer.param_groups[0]["lr"] == 1.0  # the logged lr is the base lr
    with pytest.raises(ValueError, match="decay_rate"):
        tm.TokenZooLayerDecayOptimizerConstructor(dict(optimizer=dict(type="AdamW", lr=1.0)), dict(decay=0.5))
    with pytest.raises(ValueError, match="exactly one TokenZooViT"):
        constructor(nn.Linear(2, 2))


def test_synthetic_instance_set(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    files = write_instance_set(tmp_path / "coco", num_train=6, num_val=2, img_size=96, seed=1)
    coco = COCO(str(files["train"]))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    assert len(coco.getImgIds()) == 6 and all(coco.getAnnIds(imgIds=i) for i in coco.getImgIds())
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann)
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96
        assert abs(mask.sum() - ann["area"]) <= 0.15 * ann["area"]  # polygon area vs rasterized mask
    image = Image.open(tmp_path / "coco" / "val" / "000001.jpg")
    assert image.size == (96, 96) and image.mode == "RGB"
    again = write_instance_set(tmp_path / "again", num_train=6, num_val=2, img_size=96, seed=1)
    assert again["train"].read_text() == files["train"].read_text()  # seeded: the same set


def test_synthetic_segmentation_set(tmp_path: Path) -> None:
    folders = write_segmentation_set(tmp_path / "ade", num_train=3, num_val=2, img_size=64)
    labels = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "ade" / "annotations" / "training").iterdir())]
    assert len(labels) == 3 and len(list(folders["validation"].iterdir())) == 2
    values = set(np.unique(np.stack(labels)).tolist())
    assert {0, 1} <= values <= set(range(len(SEG_CLASSES) + 1))  # 0 unlabelled, 1 background, then the shapes
    assert len(values) > 2


def test_make_synthetic_data_cli_refuses_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main = runpy.run_path(str(TOOLS / "make_synthetic_data.py"))["main"]
    args = [str(tmp_path / "out"), "--num-train", "2", "--num-val", "1", "--img-size", "64"]
    main(args)
    assert "wrote 2 + 1 images" in capsys.readouterr().out
    annotations = json.loads((tmp_path / "out" / "coco" / "annotations" / "instances_train.json").read_text())
    assert len(annotations["images"]) == 2
    with pytest.raises(SystemExit) as exit_info:  # one line on stderr, no traceback
        main(args)
    assert exit_info.value.code == 2 and "is not empty; choose an empty or new folder" in capsys.readouterr().err
    main(args[:1] + ["--num-train", "3", "--num-val", "1", "--img-size", "64", "--force"])
    assert len(list((tmp_path / "out" / "ade" / "images" / "training").iterdir())) == 3  # replaced, not added to
