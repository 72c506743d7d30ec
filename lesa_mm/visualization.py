"""What ``tools/visualize_lesa.py`` draws, as library code: the model
input a config's test pipeline makes of an image, the input of a chosen
attention layer, its attention maps, unary response and gate, and the
figure (``docs/lesa.md``; the tool's docstring describes the panels)."""
import copy
import os
import os.path as osp

import numpy as np
import torch
import torch.nn.functional as F

from lesa_mm.terms import extract_features
from lesa_mm.utils.config import config_task

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
        extract_features(model, inputs)
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


def to_image(grid_map, padded_hw, valid_hw, mode):
    """Upsample a map on the layer grid to the padded input, crop the part
    the resized image covers."""
    up = F.interpolate(grid_map[None, None].float(), size=padded_hw,
                       mode=mode,
                       **({} if mode == 'nearest' else dict(
                           align_corners=False)))
    return up[0, 0, :valid_hw[0], :valid_hw[1]].cpu().numpy()


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
