"""tools/visualize_tokens.py: a PNG for every family, computed from the models' own records, that changes with what
the blocks did."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokenzoo
from tokenzoo.export.images import load_picture, normalize

REPO = Path(__file__).resolve().parents[1]
FAMILIES = tokenzoo.list_models('*_tiny')
SIZE = 96  # 6x6 patch grid: every family's default schedule runs (LookupViT's 5x5 compressed grid fits)


@pytest.fixture(scope='module')
def tool():
    spec = importlib.util.spec_from_file_location('visualize_tokens_tool', REPO / 'tools' / 'visualize_tokens.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _panels(tool, name: str, blocks) -> list[np.ndarray]:
    model = timm.create_model(name, img_size=SIZE).eval()
    picture = load_picture('astronaut', SIZE)
    image = np.asarray(picture, dtype=np.float64)
    pictures = model.token_pictures(normalize(picture).unsqueeze(0), list(blocks))
    return [tool.draw_groups(p.values[0].numpy(), image) if p.kind == 'groups' else
            tool.draw_attention(p.values[0].numpy(), p.query, image) for p in pictures]


@pytest.mark.parametrize('name', [pytest.param(n, marks=[] if n.startswith('evit') else pytest.mark.slow)
                                  for n in FAMILIES])
def test_writes_a_png_for_every_family(tool, tmp_path, name):
    out = tmp_path / f'{name}.png'
    assert tool.main([name, '--img-size', str(SIZE), '--blocks', '1', '10', '--out', str(out)]) == 0
    with Image.open(out) as png:
        assert png.format == 'PNG' and png.size[0] > 200 and png.size[1] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left


# Blocks that reduce differently: before any reduction vs after several (EViT, ToMe, MCTF, Expedit: groups), or two
# blocks whose own predictors / cross-attentions select differently (Sparsifiner, LookupViT).
@pytest.mark.parametrize('name', FAMILIES)
def test_pixels_differ_between_blocks_that_reduce_differently(tool, name):
    early, late = _panels(tool, name, (0, 11))
    assert early.shape == late.shape == (SIZE, SIZE, 3)
    assert (early != late).any(axis=-1).mean() > 0.05, 'the two panels are (nearly) the same picture'


def test_groups_are_the_records_sources(tool):
    """EViT at 96 px keeps ceil(0.7 * 36) = 26 of 36 tokens at block 3 and fuses 10: 27 groups, one of 10
    positions; drawn, each fused position takes the fused group's mean colour."""
    model = timm.create_model('evit_tiny', img_size=SIZE).eval()
    picture = load_picture('astronaut', SIZE)
    (before, after) = model.token_pictures(normalize(picture).unsqueeze(0), [2, 3])
    assert before.values[0].unique().numel() == 36 and before.label == '36 patch tokens'
    groups = after.values[0]
    sizes = torch.bincount(groups.flatten())
    assert groups.unique().numel() == 27 and sorted(sizes.tolist())[-1] == 10 and after.label == '27 patch tokens'
    image = np.asarray(picture, dtype=np.float64)
    panel = tool.draw_groups(groups.numpy(), image)
    fused = int(sizes.argmax())
    row, col = [int(i) for i in (groups == fused).nonzero()[0]]
    pixels = np.repeat(np.repeat((groups == fused).numpy(), 16, 0), 16, 1)
    expected = image[pixels].mean(axis=0)
    inner = panel[row * 16 + 4:row * 16 + 12, col * 16 + 4:col * 16 + 12]  # away from the outline
    np.testing.assert_allclose(inner.reshape(-1, 3).mean(0), expected, atol=1.0)
    kept = int((sizes == 1).nonzero()[0])
    row, col = [int(i) for i in (groups == kept).nonzero()[0]]
    np.testing.assert_array_equal(panel[row * 16 + 2:row * 16 + 14, col * 16 + 2:col * 16 + 14],
                                  image[row * 16 + 2:row * 16 + 14, col * 16 + 2:col * 16 + 14].astype(np.uint8))


def test_sparsifiner_picture_marks_the_keys_its_predictor_selects():
    model = timm.create_model('sparsifiner_tiny', img_size=SIZE).eval()
    (picture,) = model.token_pictures(torch.randn(1, 3, SIZE, SIZE), [4], query=(2, 3))
    budget = model.blocks[4].attn.budget(37, 37)
    assert picture.kind == 'attention' and picture.query == (2, 3)
    values = picture.values[0]
    assert ((values >= 0) & (values <= 1)).all()
    # each head selects `budget` keys among the 37 (CLS included): the grid holds all but the CLS share
    assert budget - 1 <= float(values.sum()) <= budget


def test_cli_rejects_bad_input_before_running(tmp_path):
    run = [sys.executable, 'tools/visualize_tokens.py']
    proc = subprocess.run([*run, 'evit_tiny', '--blocks', '12', '--out', str(tmp_path / 'x.png')], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'blocks 0..11' in proc.stderr
    proc = subprocess.run([*run, 'evit_tiny', '--image', 'no_such_photo', '--out', str(tmp_path / 'x.png')],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'neither an image file' in proc.stderr
    (tmp_path / 'x.png').write_text('keep me')
    proc = subprocess.run([*run, 'evit_tiny', '--out', str(tmp_path / 'x.png')], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and '--force' in proc.stderr and (tmp_path / 'x.png').read_text() == 'keep me'
