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
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import lesa_mm  # noqa: E402,F401  (registers the models, allow-lists ckpts)
from lesa_mm.terms import attention_layers  # noqa: E402
from lesa_mm.utils import load_model  # noqa: E402
from lesa_mm.visualization import (COLUMNS, PANEL_INCHES,  # noqa: E402,F401
                                   TITLE_INCHES, to_image, default_points,
                                   draw_figure, input_geometry, layer_input,
                                   lesa_maps, model_input, select_layer,
                                   test_pipeline)

def parse_point(text):
    try:
        x, y = (float(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'a point is X,Y in image pixels, got {text!r}')
    return x, y


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

    layers = attention_layers(model)
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
        return to_image(grid_map, padded_hw, input_hw, interpolation)

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
