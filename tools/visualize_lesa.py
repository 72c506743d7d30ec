"""Visualise what a LESA layer does on one image: convolution (local) vs.
self-attention (global) vs. their gated fusion (arXiv:2107.05637).

    python tools/visualize_lesa.py CONFIG CHECKPOINT IMAGE --out FILE.png
        [--layer NAME] [--points X,Y ...] [--size H W] [--device cpu]

One row per query point (image pixel coordinates ``x,y``; default: the
centre and the centres of the top-left and bottom-right quarters of the part
of the image the model sees), four panels per row (two for a self-attention
layer, ``with_unary=False``, which has no unary term and no gate):

1. the image, the point and the cell of the layer's input grid it falls in;
2. the binary term's attention of that query over all positions (mean of the
   heads, eval-mode attention: running statistics of the norms);
3. the unary term's response ``||u||`` (L2 norm over channels);
4. the fusion gate ``sigmoid(...)`` averaged over channels (1: the
   attention output passes, 0: only the convolution).

The maps live on the layer's *input* grid (a strided LESA layer attends
before it pools) and are upsampled to the image. ``--layer`` takes a module
name (``backbone.layer3.1.conv2``, or an unambiguous suffix such as
``layer3.1.conv2``); default: the last LESA layer with stride 1.

Model input: what the config's test pipeline makes of the image, built as
MMDetection's ``inference_detector`` and MMPretrain's
``ImageClassificationInferencer`` build it, then the model's data
preprocessor (which pads, e.g. to multiples of 32); where the pipeline
crops (``CenterCrop``), the maps cover the part of the image the model sees.
``--size H W`` resizes the image to ``H x W`` in place of the pipeline's
resizing and cropping. LESA layers
with ``'classification'`` position encodings serve only their trained
feature size: another input size is refused with the layer's message.
"""
import argparse
import copy
import os
import os.path as osp
import sys
from collections import OrderedDict

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lesa_mm  # noqa: E402,F401  (registers the models, allow-lists ckpts)
from lesa_mm.models.layers.lesa import LESA  # noqa: E402
from lesa_mm.utils import load_model  # noqa: E402
from lesa_mm.utils.config import config_task  # noqa: E402

#: Size of one panel (inches) and of the title band; panels per row of a
#: LESA layer.
PANEL_INCHES = 3.0
TITLE_INCHES = 0.5
COLUMNS = 4


class _Captured(Exception):
    """Stops the forward pass once the chosen layer's input is known."""


# ----------------------------------------------------------------------------
# model and layers
# ----------------------------------------------------------------------------
def lesa_layers(model):
    """Name -> LESA layer, in module order."""
    return OrderedDict((name, m) for name, m in model.named_modules()
                       if isinstance(m, LESA))


def select_layer(layers, name=None):
    """The layer called ``name`` (full name or unambiguous suffix), by
    default the last one with stride 1 (else the last one)."""
    if not layers:
        raise ValueError('the model has no LESA layers')
    if name is None:
        stride1 = [n for n, m in layers.items() if m.stride == 1]
        return (stride1 or list(layers))[-1]
    if name in layers:
        return name
    matches = [n for n in layers if n.endswith('.' + name.lstrip('.'))]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f'--layer {name!r} is not a LESA layer of this model; '
                     f'valid names: {", ".join(layers)}')


def _extract(model, inputs):
    if hasattr(model, 'extract_feat'):
        return model.extract_feat(inputs)
    return model.backbone(inputs)


# ----------------------------------------------------------------------------
# the model input
# ----------------------------------------------------------------------------
def test_pipeline(cfg):
    """The config's test pipeline for an image array, built as the libraries'
    inferencers build it: MMDetection's ``inference_detector``
    (``LoadImageFromNDArray`` in place of ``LoadImageFromFile``), MMPretrain's
    ``ImageClassificationInferencer`` (no loader; the caller passes the
    image)."""
    from mmcv.transforms import Compose
    if config_task(cfg) == 'classification':
        from mmpretrain.datasets import remove_transform
        from mmpretrain.registry import TRANSFORMS
        steps = remove_transform(cfg.test_dataloader.dataset.pipeline,
                                 'LoadImageFromFile')
        return Compose([TRANSFORMS.build(t) for t in steps])
    from mmdet.utils import get_test_pipeline_cfg
    steps = copy.deepcopy(get_test_pipeline_cfg(cfg))
    steps[0].type = 'mmdet.LoadImageFromNDArray'
    return Compose(steps)


def model_input(model, pipeline, image_bgr):
    """``(inputs, meta)``: the batch the model gets for one BGR image (the
    pipeline, then the data preprocessor), and the pipeline's record of it
    (``img_shape``, ``scale_factor``, ...)."""
    data = pipeline(dict(img=image_bgr, img_shape=image_bgr.shape[:2],
                         ori_shape=image_bgr.shape[:2], img_id=0))
    batch = model.data_preprocessor(
        {'inputs': [data['inputs']], 'data_samples': [data['data_samples']]},
        False)
    return batch['inputs'], data['data_samples'].metainfo


def input_geometry(meta, image_hw):
    """``(scale, offset)``, each ``(y, x)``: image pixel ``p`` lies at
    ``p * scale - offset`` in the model input. From the pipeline's record:
    the ``scale_factor`` of its resizing (else ``img_shape / image size``),
    and a centred crop (``CenterCrop``) where the resized image is larger
    than ``img_shape``."""
    input_hw = meta['img_shape'][:2]
    if 'scale_factor' in meta:
        scale = tuple(float(f) for f in meta['scale_factor'][::-1])
    else:
        scale = tuple(m / n for m, n in zip(input_hw, image_hw))
    offset = tuple(max(0, round((round(n * f) - m) / 2))
                   for n, f, m in zip(image_hw, scale, input_hw))
    return scale, offset


@torch.no_grad()
def layer_input(model, layer, inputs):
    """The input ``x`` of ``layer`` when the model extracts features."""
    captured = {}

    def hook(module, args):
        captured['x'] = args[0]
        raise _Captured

    handle = layer.register_forward_pre_hook(hook)
    try:
        _extract(model, inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if 'x' not in captured:
        raise ValueError('the chosen LESA layer is not used by the model\'s '
                         'extract_feat')
    return captured['x']


@torch.no_grad()
def lesa_maps(layer, x, queries):
    """``attention (Q, h, w)`` (mean over heads), ``unary (h, w)`` (L2 norm
    over channels), ``gate (h, w)`` (channel mean); a self-attention layer
    (no unary term) has neither of the last two (None)."""
    attention = layer.binary.attention_maps(x, queries)[0].mean(dim=0)
    if layer.unary is None:
        return attention, None, None
    u = layer.unary(x)
    gate = layer.fusion.gate(u, layer.binary(x))
    return attention, u[0].norm(dim=0), gate[0].mean(dim=0)


def _to_image(grid_map, padded_hw, valid_hw, mode):
    """Upsample a map on the layer grid to the padded input, crop the part
    the resized image covers."""
    up = F.interpolate(grid_map[None, None].float(), size=padded_hw,
                       mode=mode,
                       **({} if mode == 'nearest' else dict(
                           align_corners=False)))
    return up[0, 0, :valid_hw[0], :valid_hw[1]].cpu().numpy()


def parse_point(text):
    try:
        x, y = (float(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'a point is X,Y in image pixels, got {text!r}')
    return x, y


def default_points(x0, y0, x1, y1):
    """The centre and the top-left and bottom-right quarter centres."""
    return [(x0 + (x1 - x0) * f, y0 + (y1 - y0) * f)
            for f in (1 / 2, 1 / 4, 3 / 4)]


def _panel_axes(fig, size, row, col, aspect, with_colorbar):
    """Axes (and colorbar axes) of one panel, placed in inches: a 0.45 in
    title band, then the image fitted into 2.35 x 2.45 in."""
    fig_w, fig_h = size
    box_w, box_h = PANEL_INCHES - 0.65, PANEL_INCHES - 0.55
    if box_w * aspect <= box_h:
        width, height = box_w, box_w * aspect
    else:
        width, height = box_h / aspect, box_h
    left = col * PANEL_INCHES + 0.08
    top = fig_h - TITLE_INCHES - row * PANEL_INCHES - 0.45
    ax = fig.add_axes([left / fig_w, (top - height) / fig_h, width / fig_w,
                       height / fig_h])
    cax = None
    if with_colorbar:
        cax = fig.add_axes([(left + width + 0.06) / fig_w,
                            (top - height) / fig_h, 0.1 / fig_w,
                            height / fig_h])
    return ax, cax


def draw_figure(out, rgb, rows, points, boxes, title, dpi=100, seen=None):
    """One row of panels per point: ``rows[i]`` lists ``(heat map or None
    for the plain image, imshow style, panel title)``; ``boxes[i]`` is the
    query's grid cell ``(x, y, w, h)`` drawn on the plain image; the heat
    maps cover ``seen`` (``(x0, y0, x1, y1)``, default: the whole image)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    img_h, img_w = rgb.shape[:2]
    columns = max(len(panels) for panels in rows)  # COLUMNS for LESA
    size = (columns * PANEL_INCHES, len(rows) * PANEL_INCHES + TITLE_INCHES)
    # fixed sizes in inches rather than a layout engine: the PNG is exactly
    # figsize x dpi pixels, and drawing is much faster
    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    gray = rgb.astype(np.float32).mean(axis=2)
    extent = (0, img_w, img_h, 0)
    heat_extent = extent if seen is None else (seen[0], seen[2], seen[3],
                                               seen[1])
    for i, panels in enumerate(rows):
        px, py = points[i]
        for j, (heat, style, panel_title) in enumerate(panels):
            ax, cax = _panel_axes(fig, size, i, j, img_h / img_w,
                                  heat is not None)
            if heat is None:
                ax.imshow(rgb, extent=extent, interpolation='nearest',
                          aspect='auto')
                ax.add_patch(Rectangle(boxes[i][:2], *boxes[i][2:],
                                       fill=False, edgecolor='yellow',
                                       linewidth=1.5))
            else:  # grey image under the heat map: its colours read true
                ax.imshow(gray, extent=extent, cmap='gray', vmin=0, vmax=255,
                          interpolation='nearest', aspect='auto')
                im = ax.imshow(heat, extent=heat_extent, alpha=0.6,
                               interpolation='bilinear', aspect='auto',
                               **style)
                fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
            ax.plot([px], [py], marker='x', color='white', markersize=9,
                    markeredgewidth=3)
            ax.plot([px], [py], marker='x', color='red', markersize=8,
                    markeredgewidth=1.5)
            ax.set_xlim(0, img_w)
            ax.set_ylim(img_h, 0)
            ax.set_title(panel_title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.text(0.5, 1 - TITLE_INCHES / 2 / size[1], title, fontsize=9,
             ha='center', va='center')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)


def visualize(config, checkpoint, image, out, layer=None, points=None,
              size=None, device='cpu', dpi=100, interpolation='bilinear'):
    """Draw the figure (see the module docstring) of ``config`` (a file or a
    loaded ``Config``); returns a dict with what was drawn (``layer``,
    ``input_size``, ``padded_size``, ``grid``, ``cells``, ``points``,
    ``size_note``: where the input size came from, ``seen``: the part of
    the image the model sees, ``out``)."""
    import mmcv
    from mmcv.transforms import LoadImageFromFile, Resize
    from mmengine.utils import to_2tuple
    if not osp.isfile(image):
        raise FileNotFoundError(f'image file {image!r} not found')
    image_bgr = mmcv.imread(image, flag='color')
    if image_bgr is None:
        raise ValueError(f'cannot read {image!r} as an image')
    image_hw = image_bgr.shape[:2]
    img_h, img_w = image_hw
    points = list(points or [])
    for x, y in points:
        if not (0 <= x < img_w and 0 <= y < img_h):
            raise ValueError(f'point ({x:g}, {y:g}) lies outside the '
                             f'{img_w}x{img_h} (WxH) image')
    if size is not None:
        size = to_2tuple(size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f'--size takes H W, got {size}')
    cfg, model = load_model(config, checkpoint, device)

    layers = lesa_layers(model)
    name = select_layer(layers, layer)
    lesa = layers[name]
    pipeline = test_pipeline(cfg)
    size_note = "the config's test pipeline"
    if size is not None:  # in place of the pipeline's resizing and cropping
        steps = pipeline.transforms
        loader = [t for t in steps[:1] if isinstance(t, LoadImageFromFile)]
        pipeline.transforms = loader + [
            Resize(scale=(size[1], size[0]), keep_ratio=False), steps[-1]]
        size_note = '--size'
    inputs, meta = model_input(model, pipeline, image_bgr)
    input_hw = tuple(meta['img_shape'][:2])
    padded_hw = tuple(inputs.shape[-2:])
    (sy, sx), (oy, ox) = input_geometry(meta, image_hw)
    try:
        x = layer_input(model, lesa, inputs)
    except ValueError as err:  # e.g. 'classification' encodings
        raise ValueError(f'{err} (model input {input_hw[0]}x{input_hw[1]} '
                         f'from {size_note})') from err
    grid_h, grid_w = x.shape[-2:]

    # the part of the image the model sees (all of it unless cropped)
    seen = tuple(round(v, 3) for v in (ox / sx, oy / sy,
                                       (ox + input_hw[1]) / sx,
                                       (oy + input_hw[0]) / sy))
    points = points or default_points(*seen)
    cells = []
    for px, py in points:
        # image pixel (centre) -> model input -> layer grid
        ry, rx = (py + 0.5) * sy - oy, (px + 0.5) * sx - ox
        if not (0 <= ry < input_hw[0] and 0 <= rx < input_hw[1]):
            raise ValueError(
                f'point ({px:g}, {py:g}) lies outside the part of the image '
                f'the model sees ({size_note} crops it to x {seen[0]:g}..'
                f'{seen[2]:g}, y {seen[1]:g}..{seen[3]:g})')
        row = min(grid_h - 1, int(ry * grid_h / padded_hw[0]))
        col = min(grid_w - 1, int(rx * grid_w / padded_hw[1]))
        cells.append((row, col))
    queries = [r * grid_w + c for r, c in cells]
    attention, unary, gate = lesa_maps(lesa, x, queries)

    # from the layer grid to the original image's coordinates
    def shown(grid_map):
        return _to_image(grid_map, padded_hw, input_hw, interpolation)

    cell_h, cell_w = padded_hw[0] / grid_h / sy, padded_hw[1] / grid_w / sx
    with_unary = unary is not None
    if with_unary:
        unary_img, gate_img = shown(unary), shown(gate)

    rows = []
    for i, ((px, py), (row, col)) in enumerate(zip(points, cells)):
        att = attention[i]
        rows.append([
            (None, None, f'query ({px:g}, {py:g}) -> cell ({row}, {col})'),
            # colours span the map's own range; the title gives the
            # uniform weight 1/L for scale
            (shown(att), dict(cmap='jet', vmin=att.min().item(),
                              vmax=att.max().item()),
             f'self-attention (global), {lesa.groups} heads\nmax '
             f'{att.max().item():.3g}, uniform {1 / att.numel():.3g}'),
        ] + ([
            (unary_img, dict(cmap='viridis'),
             'convolution (local)\n||u||, L2 over channels'),
            (gate_img, dict(cmap='magma', vmin=0, vmax=1),
             f'LESA gate (channel mean)\nat query: '
             f'{gate[row, col].item():.2f}'),
        ] if with_unary else []))
    kind = 'LESA' if with_unary else 'self-attention (no unary term)'
    title = (f'{name}: {lesa.pe_type} {kind}, stride {lesa.stride}, input '
             f'grid {grid_h}x{grid_w}; model input {input_hw[0]}x'
             f'{input_hw[1]} ({size_note}); {osp.basename(image)}')
    boxes = [(seen[0] + col * cell_w, seen[1] + row * cell_h, cell_w, cell_h)
             for row, col in cells]
    draw_figure(out, image_bgr[..., ::-1], rows, points, boxes, title, dpi,
                seen)
    return dict(out=out, layer=name, input_size=input_hw,
                padded_size=padded_hw, grid=(grid_h, grid_w), cells=cells,
                points=points, size_note=size_note, seen=seen)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Visualise a LESA layer: self-attention of query points, '
        'convolution response and fusion gate')
    parser.add_argument('config', help='model config')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('image', help='input image')
    parser.add_argument('--out', required=True, help='PNG to write')
    parser.add_argument('--layer', help='LESA module name, e.g. '
                        'backbone.layer3.1.conv2 (default: the last LESA '
                        'layer with stride 1)')
    parser.add_argument('--points', nargs='+', type=parse_point,
                        metavar='X,Y', help='query points in image pixels '
                        '(default: centre and two quarter points)')
    parser.add_argument('--size', nargs=2, type=int, metavar=('H', 'W'),
                        help="resize the image to H x W in place of the "
                        "config's test Resize ('classification' encodings "
                        'serve only their trained size)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dpi', type=int, default=100)
    parser.add_argument('--interpolation', choices=['bilinear', 'nearest'],
                        default='bilinear',
                        help='upsampling of the maps to the image')
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        info = visualize(args.config, args.checkpoint, args.image, args.out,
                         layer=args.layer, points=args.points, size=args.size,
                         device=args.device, dpi=args.dpi,
                         interpolation=args.interpolation)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"{info['layer']}: input grid {info['grid'][0]}x{info['grid'][1]}, "
          f"model input {info['input_size'][0]}x{info['input_size'][1]} "
          f"({info['size_note']})")
    for (px, py), (row, col) in zip(info['points'], info['cells']):
        print(f'  point ({px:g}, {py:g}) -> cell ({row}, {col})')
    print(f"written to {info['out']}")
    return info


if __name__ == '__main__':
    main()
