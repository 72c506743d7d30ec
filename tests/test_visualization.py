"""Visualisation tools on randomly initialised demo models (fast):
tools/visualize_lesa.py, demo/image_demo.py,
tools/analysis_tools/plot_curves.py and the curves hook of
lesa_mm.utils.curves."""
import json
import os
import types

import mmcv
import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

from conftest import REPO_ROOT, load_tool
from lesa_mm.utils import build_model_from_config

DEMO_DET = os.path.join(REPO_ROOT,
                        'configs/demo/mask-rcnn_lesa-r50-slim_shapes.py')
DEMO_CLS = os.path.join(REPO_ROOT, 'configs/demo/lesa-resnet50-slim_shapes.py')


@pytest.fixture(scope='module')
def vis_tool():
    return load_tool('tools/visualize_lesa.py')


@pytest.fixture(scope='module')
def det_cfg():
    return Config.fromfile(DEMO_DET)


@pytest.fixture(scope='module')
def cls_cfg():
    return Config.fromfile(DEMO_CLS)


def random_checkpoint(cfg, path):
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    torch.save({'state_dict': model.state_dict()}, str(path))
    return str(path)


@pytest.fixture(scope='module')
def det_ckpt(det_cfg, tmp_path_factory):
    return random_checkpoint(det_cfg,
                             tmp_path_factory.mktemp('det') / 'det.pth')


@pytest.fixture(scope='module')
def cls_ckpt(cls_cfg, tmp_path_factory):
    return random_checkpoint(cls_cfg,
                             tmp_path_factory.mktemp('cls') / 'cls.pth')


def write_image(path, height, width, seed=0):
    """Noise with a bright square, BGR uint8."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    image[height // 4:height // 2, width // 4:width // 2] = (40, 200, 220)
    mmcv.imwrite(image, str(path))
    return str(path)


def check_png(path, size):
    """A real PNG of ``size`` (w, h) pixels with more than a few colours."""
    with Image.open(path) as image:
        assert image.format == 'PNG'
        assert image.size == size
        pixels = np.asarray(image.convert('RGB')).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50


def figure_size(tool, rows, dpi=100):
    return (int(tool.COLUMNS * tool.PANEL_INCHES * dpi),
            int((rows * tool.PANEL_INCHES + tool.TITLE_INCHES) * dpi))


# ----------------------------------------------------------------------------
# tools/visualize_lesa.py
# ----------------------------------------------------------------------------
def test_visualize_classification(vis_tool, cls_ckpt, tmp_path):
    image = write_image(tmp_path / 'img.png', 64, 64)
    out = str(tmp_path / 'cls.png')
    info = vis_tool.main([DEMO_CLS, cls_ckpt, image, '--out', out,
                          '--points', '10,12', '40.5,50'])
    # 'classification' encodings: the trained 4x4 grid at 64x64 inputs,
    # default layer: the last stride-1 LESA layer
    assert info['layer'] == 'backbone.layer4.2.conv2'
    assert info['input_size'] == (64, 64) and info['grid'] == (4, 4)
    assert info['cells'] == [(0, 0), (3, 2)]
    check_png(out, figure_size(vis_tool, rows=2))


def test_visualize_self_attention_shows_attention_only(vis_tool, tmp_path):
    """A self-attention layer (no unary term, no gate): image and attention
    panels only."""
    config = os.path.join(REPO_ROOT, 'configs/demo/sa-resnet50-slim_shapes.py')
    ckpt = random_checkpoint(Config.fromfile(config), tmp_path / 'sa.pth')
    image = write_image(tmp_path / 'img.png', 64, 64)
    out = str(tmp_path / 'sa.png')
    info = vis_tool.main([config, ckpt, image, '--out', out,
                          '--points', '10,12'])
    assert info['layer'] == 'backbone.layer4.2.conv2'
    check_png(out, (int(2 * vis_tool.PANEL_INCHES * 100),
                    figure_size(vis_tool, rows=1)[1]))


def test_visualize_classification_serves_only_its_trained_size(
        vis_tool, cls_cfg, cls_ckpt, tmp_path):
    # the config's test pipeline keeps a 50x90 image at 50x90: refused with
    # the LESA layer's message and where the model input came from ...
    image = write_image(tmp_path / 'img.png', 50, 90)
    with pytest.raises(ValueError, match=r"(?s)serve only the trained "
                       r"feature size.*model input 50x90 from the config's "
                       r'test pipeline'):
        vis_tool.visualize(cls_cfg, cls_ckpt, image, str(tmp_path / 'a.png'))
    # ... --size resizes it to the trained size ...
    info = vis_tool.visualize(cls_cfg, cls_ckpt, image,
                              str(tmp_path / 'a.png'),
                              layer='layer3.1.conv2', points=[(80, 40)],
                              size=64)
    assert info['layer'] == 'backbone.layer3.1.conv2'
    assert info['input_size'] == (64, 64) and info['cells'] == [(3, 3)]
    assert info['size_note'] == '--size'
    # ... and to no other
    with pytest.raises(ValueError, match='model input 96x96 from --size'):
        vis_tool.visualize(cls_cfg, cls_ckpt, image, str(tmp_path / 'b.png'),
                           size=(96, 96))
    assert not os.path.exists(tmp_path / 'b.png')


def test_visualize_centre_crop(vis_tool, cls_cfg, cls_ckpt, tmp_path):
    """A test pipeline that crops: the maps cover the part the model sees,
    points outside it are refused."""
    cfg = cls_cfg.copy()
    cfg.test_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='ResizeEdge', scale=64, edge='short'),
        dict(type='CenterCrop', crop_size=64),
        dict(type='PackInputs')]
    image = write_image(tmp_path / 'img.png', 64, 96)
    info = vis_tool.visualize(cfg, cls_ckpt, image, str(tmp_path / 'a.png'),
                              points=[(50, 30)], dpi=50)
    assert info['input_size'] == (64, 64)
    assert info['seen'] == (16, 0, 80, 64)  # x0, y0, x1, y1
    assert info['cells'] == [(1, 2)]  # (30.5, 50.5 - 16) / 16 px cells
    check_png(info['out'], figure_size(vis_tool, rows=1, dpi=50))
    with pytest.raises(ValueError, match='outside the part of the image'):
        vis_tool.visualize(cfg, cls_ckpt, image, str(tmp_path / 'b.png'),
                           points=[(10, 30)])
    # the default points: centre and quarter points of the part seen
    info = vis_tool.visualize(cfg, cls_ckpt, image, str(tmp_path / 'c.png'),
                              dpi=30)
    assert info['points'] == [(48, 32), (32, 16), (64, 48)]
    assert info['cells'] == [(2, 2), (1, 1), (3, 3)]


def test_visualize_detection_any_size(vis_tool, det_cfg, det_ckpt,
                                      tmp_path):
    image = write_image(tmp_path / 'img.png', 100, 140)
    out = str(tmp_path / 'det.png')
    info = vis_tool.main([DEMO_DET, det_ckpt, image, '--out', out])
    # the config's fixed 128x128 Resize; three default points
    assert info['input_size'] == (128, 128) and info['grid'] == (4, 4)
    assert info['size_note'] == "the config's test pipeline"
    assert info['layer'] == 'backbone.layer4.2.conv2'
    assert info['points'][0] == (70, 50) and len(info['cells']) == 3
    check_png(out, figure_size(vis_tool, rows=3))
    # 'detection_qr' takes other sizes, padded to multiples of 32 by the
    # data preprocessor: a 100x140 input is a 128x160 batch, 8x10 grid in
    # layer3 (stride 16)
    out = str(tmp_path / 'det_size.png')
    info = vis_tool.visualize(det_cfg, det_ckpt, image, out, size=(100, 140),
                              layer='layer3.5.conv2', points=[(139, 99)],
                              dpi=50)
    assert info['padded_size'] == (128, 160) and info['grid'] == (8, 10)
    assert info['cells'] == [(6, 8)]
    check_png(out, figure_size(vis_tool, rows=1, dpi=50))


def test_visualize_clear_errors(vis_tool, cls_cfg, cls_ckpt, det_ckpt,
                                tmp_path):
    image = write_image(tmp_path / 'img.png', 32, 32)
    with pytest.raises(ValueError) as err:
        vis_tool.visualize(cls_cfg, cls_ckpt, image, str(tmp_path / 'x.png'),
                           layer='backbone.layer2.0.conv2')
    assert 'valid names' in str(err.value)
    assert 'backbone.layer3.1.conv2' in str(err.value)
    with pytest.raises(ValueError, match='outside'):
        vis_tool.visualize(cls_cfg, cls_ckpt, image, str(tmp_path / 'x.png'),
                           points=[(32, 3)])
    for missing, args in (("image file 'none.png'",
                           [DEMO_DET, det_ckpt, 'none.png']),
                          ("checkpoint file 'none.pth'",
                           [DEMO_DET, 'none.pth', image])):
        with pytest.raises(FileNotFoundError, match=f'{missing} not found'):
            vis_tool.visualize(*args, str(tmp_path / 'x.png'))
    # the command line: usage error, nothing written
    with pytest.raises(SystemExit) as exit_:
        vis_tool.main([DEMO_DET, det_ckpt, 'none.png', '--out',
                       str(tmp_path / 'x.png')])
    assert exit_.value.code == 2
    assert not os.path.exists(tmp_path / 'x.png')


# ----------------------------------------------------------------------------
# tools/analysis_tools/plot_curves.py
# ----------------------------------------------------------------------------
def write_run(work_dir, stamp, lines):
    run = os.path.join(work_dir, stamp, 'vis_data')
    os.makedirs(run)
    with open(os.path.join(run, 'scalars.json'), 'w') as f:
        for line in lines:
            f.write(json.dumps(line) + '\n')


def train_line(step, loss):
    return dict(lr=1e-3, loss=loss, loss_cls=loss / 2, time=0.1, step=step)


def test_plot_curves(tmp_path):
    tool = load_tool('tools/analysis_tools/plot_curves.py')
    work = str(tmp_path / 'work')
    # a run interrupted after iteration 30 (checkpoint at 20), resumed; the
    # validation metrics are logged by epoch (step 0), as LoggerHook does
    write_run(work, '20260101_000000',
              [train_line(s, 2.0 - s / 100) for s in (10, 20, 30)])
    write_run(work, '20260101_010000',
              [train_line(s, 1.0 - s / 1000) for s in (30, 40)]
              + [{'coco/bbox_mAP': 0.25, 'coco/segm_mAP': 0.2, 'step': 0}])
    out, series = tool.main([work])
    assert out == os.path.join(work, 'curves.png')
    with Image.open(out) as image:  # two panels: losses, validation
        assert image.format == 'PNG' and image.size == (1100, 400)
    assert list(series) == ['loss', 'loss_cls', 'coco/bbox_mAP',
                            'coco/segm_mAP']
    # the resumed run replaces the first run's record of step 30; the
    # validation metrics sit at the last training step logged before them
    assert series['loss'][0] == [10, 20, 30, 40]
    assert series['loss'][1] == pytest.approx([1.9, 1.8, 0.97, 0.96])
    assert series['coco/bbox_mAP'] == ([40], [0.25])
    from lesa_mm.utils.curves import load_scalars
    train, val = load_scalars(work, runs='latest')
    assert [r['step'] for r in train] == [30, 40] and len(val) == 1
    out = str(tmp_path / 'lr.png')
    assert tool.main([work, '--keys', 'loss', 'lr', 'coco/segm_mAP',
                      '--out', out, '--runs', 'latest'])[1] == {
        'loss': ([30, 40], pytest.approx([0.97, 0.96])),
        'lr': ([30, 40], [1e-3, 1e-3]), 'coco/segm_mAP': ([40], [0.2])}
    with Image.open(out) as image:
        assert image.size == (1650, 400)  # three panels


def test_plot_curves_errors(tmp_path):
    from lesa_mm.utils.curves import plot_curves
    tool = load_tool('tools/analysis_tools/plot_curves.py')
    empty = tmp_path / 'empty'
    (empty / '20260101_000000' / 'vis_data').mkdir(parents=True)
    for work in (empty, tmp_path / 'missing'):
        with pytest.raises(FileNotFoundError, match='no scalars found'):
            plot_curves(str(work))
    # the command line: a usage error
    with pytest.raises(SystemExit) as exit_:
        tool.main([str(empty)])
    assert exit_.value.code == 2
    write_run(str(tmp_path / 'work'), '20260101_000000', [train_line(1, 1.0)])
    with pytest.raises(ValueError, match=r"training entries: \['lr', 'loss'"):
        plot_curves(str(tmp_path / 'work'), keys=['coco/bbox_mAP'])
    # a stand-alone test run's metrics (no training lines) are left out
    write_run(str(tmp_path / 'work'), '20260101_010000',
              [{'coco/bbox_mAP': 0.5, 'step': 0}])
    assert list(plot_curves(str(tmp_path / 'work'))[1]) == ['loss', 'loss_cls']


# ----------------------------------------------------------------------------
# demo/image_demo.py
# ----------------------------------------------------------------------------
def test_image_demo_detection(det_ckpt, tmp_path):
    demo = load_tool('demo/image_demo.py')
    image = write_image(tmp_path / 'img.png', 100, 140)
    out = str(tmp_path / 'out' / 'det.png')
    result = demo.main([image, DEMO_DET, det_ckpt, '--out', out,
                        '--score-thr', '0.05'])
    sample, predictions = result['sample'], result['predictions']
    assert sample.ori_shape == (100, 140) and result['out'] == out
    # the detections above the threshold, with the config's class names
    # (the checkpoint has no dataset_meta)
    scores = sample.pred_instances.scores
    assert len(predictions) == (scores >= 0.05).sum().item() > 0
    for name, score, box in predictions:
        assert name in ('circle', 'square', 'triangle') and score >= 0.05
        assert len(box) == 4 and 0 <= box[0] <= box[2] <= 140
    with Image.open(out) as drawn:  # drawn 4x larger: 400x560
        assert drawn.format == 'PNG' and drawn.size == (560, 400)


def test_image_demo_detection_with_nothing_detected(det_ckpt, tmp_path):
    """A model that detects nothing (its box classifier sure of the
    background) on a small image: an empty result, drawn upscaled."""
    ckpt = torch.load(det_ckpt)
    bias = ckpt['state_dict']['roi_head.bbox_head.fc_cls.bias']
    bias[-1] = 100.0  # mmdet's background class is the last one
    path = str(tmp_path / 'background.pth')
    torch.save(ckpt, path)
    demo = load_tool('demo/image_demo.py')
    image = write_image(tmp_path / 'img.png', 90, 120)
    out = str(tmp_path / 'det.png')
    result = demo.main([image, DEMO_DET, path, '--out', out])
    assert len(result['sample'].pred_instances) == 0
    assert result['predictions'] == []
    with Image.open(out) as drawn:  # drawn 5x larger
        assert drawn.size == (600, 450)


def test_image_demo_classification(cls_ckpt, tmp_path):
    demo = load_tool('demo/image_demo.py')
    image = write_image(tmp_path / 'img.png', 64, 64)
    out = str(tmp_path / 'cls.png')
    result = demo.main([image, DEMO_CLS, cls_ckpt, '--out', out,
                        '--topk', '2'])
    predictions = result['predictions']
    assert len(predictions) == 2  # the top-2, best first
    assert {name for name, _ in predictions} <= {'circle', 'square',
                                                 'triangle'}
    assert predictions[0][1] >= predictions[1][1]
    assert predictions[0][1] == pytest.approx(
        result['sample'].pred_score.max().item())
    with Image.open(out) as drawn:
        assert drawn.format == 'PNG' and drawn.size == (384, 384)


# ----------------------------------------------------------------------------
# curves hook
# ----------------------------------------------------------------------------
def test_plot_curves_hook(tmp_path):
    from mmengine.registry import HOOKS
    work = str(tmp_path)
    write_run(work, '20260101_000000', [train_line(1, 1.0),
                                        train_line(2, 0.5)])
    warnings = []
    runner = types.SimpleNamespace(
        work_dir=work, logger=types.SimpleNamespace(
            info=lambda msg: None, warning=warnings.append))
    hook = HOOKS.build(dict(type='PlotCurvesHook'))
    hook.after_train(runner)  # called by training loops only
    with Image.open(tmp_path / 'curves.png') as image:
        assert image.format == 'PNG' and image.size == (550, 400)
    assert not warnings
    # no logs: a warning, never an exception
    runner.work_dir = str(tmp_path / 'nothing')
    hook.after_train(runner)
    assert 'no curves written' in warnings[0]
