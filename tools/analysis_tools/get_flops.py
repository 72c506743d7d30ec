"""Parameters and FLOPs of an OpenMMLab model, per backbone stage.

Builds the model of ``CONFIG`` (``lesa_mm.utils.build_model_from_config``:
the config's ``custom_imports`` and ``default_scope`` are honoured, weights
are left as constructed, no checkpoint is loaded), puts it in ``eval`` mode
and traces one forward pass of a ``torch.randn(1, 3, H, W)`` image with
MMEngine's :class:`mmengine.analysis.FlopAnalyzer`. Prints a markdown table
with the parameters and FLOPs of the backbone's stem (everything of the
backbone outside its residual stages), of each stage ``layer1..layer4``, of
the whole backbone, of the other top-level parts of the model (neck, heads)
and of the whole model.

What is traced
    * classifiers (MMPretrain): ``model(x, mode='tensor')``, i.e. backbone,
      neck and head up to the class scores;
    * detectors (MMDetection): ``model._forward(x, data_samples)``, the
      tensor-mode forward MMDetection's own ``get_flops`` tool analyses; the
      data samples carry only image metadata (shapes, unit scale factor),
      no annotations. The RoI heads' share depends on how many proposals the
      RPN keeps for the random image (at most ``test_cfg.rpn.max_per_img``);
    * ``--backbone-only``: ``model.backbone(x)``.

Input size
    ``--shape H [W]`` if given; otherwise the config's fixed test-time size:
    a ``Resize(keep_ratio=False)`` scale, a ``CenterCrop`` size or the
    synthetic data's ``image_size`` (demo configs); a
    ``Resize(keep_ratio=True)`` scale gives a landscape image filling its
    box, padded to the data preprocessor's ``pad_size_divisor`` (1333x800
    -> 800x1344). Otherwise 224x224 for classifiers and 1024x1024 for
    detectors.

FLOP convention
    MMEngine's: one multiply-accumulate (MAC) is one FLOP, as its handles
    for convolutions (``batch * prod(weight shape) * prod(output spatial
    size)``), ``matmul``, ``bmm``, ``linear`` and ``addmm`` count; its
    BatchNorm handle adds ``2 * numel`` (eval mode). Element-wise ops
    (add, mul, sigmoid, softmax, pooling, ...) are not counted; the tool
    lists them as "not counted".

Added handles (:data:`ADDED_FLOP_HANDLES`), for the ops LESA runs that
stock MMEngine misses or counts approximately:

    * ``aten::scaled_dot_product_attention``, the name the jit trace shows
      for ``F.scaled_dot_product_attention`` here (torch 2.x, CPU, eval),
      and the backend kernels' names in case a trace records them (e.g.
      ``aten::_scaled_dot_product_flash_attention_for_cpu``): MMEngine has
      no handle, so the fused LESA attention was counted as 0. See
      :func:`sdpa_flop_jit`.
    * ``aten::einsum``: MMEngine's handle asks ``numpy.einsum_path`` and
      parses its printed FLOP estimate, which is rounded to 4 significant
      digits (and builds zero arrays the size of every operand). Replaced
      by the exact count of :func:`einsum_flop_jit`.
    * mmcv's deformable convolutions (``prim::PythonOp.DeformConv2dFunction``
      and ``prim::PythonOp.ModulatedDeformConv2dFunction``, the ``DCN`` /
      ``DCNv2`` convs of the detection configs): untraced autograd
      functions MMEngine cannot see into, counted as 0. See
      :func:`deform_conv_flop_jit`.

What LESA's attention counts
    The count follows the kernel the config runs. ``attn_impl='reference'``
    (einsums) counts the products ``q.k`` (``g L^2 dq``) and ``attn.v``
    (``g L^2 dv``). The default ``'fused'`` kernel for ``'detection_qr'``
    attends queries augmented with the row/column position logits against
    keys augmented with one-hot row/column indicators, so both of its
    logit product is as wide as the augmented heads. A traced model runs
    the shape-generic one-call formulation (the CPU key blocks are an eager
    runtime optimisation), so the count is one SDPA call per layer: keys
    ``dq + H + W`` channels wide (padded to a multiple of 8) and values
    ``dv`` wide, ``g L^2 (dq + H + W + dv)``, whatever device runs it.

    It forms no ``L x L`` tensor, at more MACs than the reference
    products. Count the reference formulation with
    ``--cfg-options model.backbone.attn_impl=reference`` (it materialises
    the ``L x L`` logits: several GB at 1024x1024).

Examples::

    python tools/analysis_tools/get_flops.py configs/lesa/lesa-resnet50_4xb32_in1k.py
    python tools/analysis_tools/get_flops.py configs/lesa/mask-rcnn_lesa-r50.py --backbone-only
    python tools/analysis_tools/get_flops.py configs/lesa/mask-rcnn_lesa-r50.py --shape 512 512
    python tools/analysis_tools/get_flops.py mmpretrain::resnet/resnet50_8xb32_in1k.py
    python tools/analysis_tools/get_flops.py configs/lesa/lesa-resnet50_4xb32_in1k.py --compare-stock
    python tools/analysis_tools/get_flops.py configs/lesa/mask-rcnn_lesa-r50.py --backbone-only \\
        --cfg-options model.backbone.attn_impl=reference

A model that cannot serve the requested size (``'classification'`` LESA
position encodings accept only their trained feature size) makes the tool
print the model's ``ValueError`` and exit with status 1.
"""
import argparse
import contextlib
import functools
import math
import os
import re
import sys
import time
import warnings
from collections import Counter

_REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402
from mmengine.analysis import FlopAnalyzer, parameter_count  # noqa: E402
from mmengine.analysis.jit_handles import get_shape  # noqa: E402

STEM = 'stem'
# counter keys of the added handles (by_operator() reports them)
EINSUM_KEY, SDPA_KEY, DEFORM_KEY = 'einsum', 'sdpa', 'deform_conv'
ADDED_KEYS = (EINSUM_KEY, SDPA_KEY, DEFORM_KEY)


# --------------------------------------------------------------------------
# added op handles
# --------------------------------------------------------------------------
def _label_dims(term, ndim):
    """The index labels of one einsum operand of ``ndim`` dimensions; the
    dimensions an ellipsis stands for get labels counted from the right
    (``('...', 0)`` is the last one), so that they broadcast as einsum
    broadcasts them."""
    if '...' not in term:
        if len(term) != ndim:
            raise ValueError(f'einsum operand {term!r} has {len(term)} '
                             f'labels but {ndim} dimensions')
        return list(term)
    before, after = term.split('...')
    n_ellipsis = ndim - len(before) - len(after)
    if n_ellipsis < 0:
        raise ValueError(f'einsum operand {term!r} has more labels than its '
                         f'{ndim} dimensions')
    return (list(before) +
            [('...', n_ellipsis - 1 - k) for k in range(n_ellipsis)] +
            list(after))


def einsum_macs(equation, shapes):
    """Multiply-accumulates of ``torch.einsum(equation, *operands)``.

    The generic count: the product of the sizes of all distinct indices
    (output and summed ones alike), i.e. one MAC per term of the sum that
    defines every output element. For two operands this is exactly what a
    matmul/bmm of the same contraction counts (``'bij,bjk->bik'`` gives
    ``b * i * j * k``, as ``bmm``); for three or more operands it is the
    naive single-loop cost, which an optimised contraction order may beat.
    Size-1 dimensions broadcast. A single operand with no summed index (a
    permutation, a diagonal) costs 0.

    Args:
        equation (str): The einsum equation (explicit ``->`` or implicit).
        shapes (list[list[int]]): The operands' shapes.
    """
    equation = equation.replace(' ', '')
    lhs, arrow, rhs = equation.partition('->')
    terms = lhs.split(',')
    if len(terms) != len(shapes):
        raise ValueError(f'einsum {equation!r} names {len(terms)} operands, '
                         f'got {len(shapes)} shapes')
    sizes = {}
    for term, shape in zip(terms, shapes):
        for label, size in zip(_label_dims(term, len(shape)), shape):
            sizes[label] = max(sizes.get(label, 1), int(size))
    if len(terms) == 1:
        labels = _label_dims(terms[0], len(shapes[0]))
        ellipsis = {d for d in labels if isinstance(d, tuple)}
        if arrow:
            kept = {c for c in rhs if c.isalpha()}
            kept |= ellipsis if '...' in rhs else set()
        else:  # implicit output: the labels seen once, and the ellipsis
            plain = [c for c in terms[0] if c.isalpha()]
            kept = {c for c in plain if plain.count(c) == 1} | ellipsis
        if set(labels) <= kept:
            return 0
    return math.prod(sizes.values())


def einsum_flop_jit(inputs, outputs):
    """MMEngine op handle of ``aten::einsum``: :func:`einsum_macs` of the
    traced equation and operand shapes, under the key ``'einsum'``."""
    equation = inputs[0].toIValue()
    operands = list(inputs[1].node().inputs())
    shapes = [get_shape(v) for v in operands]
    if any(s is None for s in shapes):
        raise ValueError(f'einsum {equation!r}: the trace did not record '
                         f'every operand shape')
    return Counter({EINSUM_KEY: einsum_macs(equation, shapes)})


def sdpa_macs(q_shape, k_shape, v_shape):
    """Multiply-accumulates of ``scaled_dot_product_attention(q, k, v)``.

    ``q (..., L, E)``, ``k (..., S, E)``, ``v (..., S, Ev)``: the two
    products of the attention, ``q k^T`` (``L * S * E``) and
    ``softmax(.) v`` (``L * S * Ev``), for every batch and head, i.e.
    ``batch * L * S * (E + Ev)``, as ``bmm`` counts the same two products
    of an unfused attention. The scaling, mask, softmax and dropout are
    element-wise and not counted (MMEngine counts no softmax either); a
    causal mask is counted dense. The batch dimensions are those of the
    queries broadcast against the keys (the queries' alone for grouped-query
    attention, whose key heads are shared).
    """
    *q_batch, length, e = q_shape
    *k_batch, source, _ = k_shape
    ev = v_shape[-1]
    try:
        batch = torch.broadcast_shapes(tuple(q_batch), tuple(k_batch))
    except RuntimeError:  # grouped-query attention: fewer key heads
        batch = q_batch
    return math.prod(batch) * length * source * (e + ev)


def sdpa_flop_jit(inputs, outputs):
    """MMEngine op handle of the scaled-dot-product-attention ops (the
    public ``aten::scaled_dot_product_attention`` and the backend kernels,
    all of which take ``query, key, value`` first): :func:`sdpa_macs`
    under the key ``'sdpa'``."""
    shapes = [get_shape(v) for v in inputs[:3]]
    if any(s is None for s in shapes):
        raise ValueError('scaled_dot_product_attention: the trace did not '
                         'record the query/key/value shapes')
    return Counter({SDPA_KEY: sdpa_macs(*shapes)})


def deform_conv_flop_jit(weight_index):
    """MMEngine op handle of an mmcv deformable convolution whose weight is
    its ``weight_index``-th traced input: the MACs of the ordinary
    convolution of the same weight and output (as MMEngine counts
    ``aten::_convolution``), under the key ``'deform_conv'``. The bilinear
    sampling at the offsets (and the modulation) is not counted; the conv
    that predicts the offsets is an ordinary conv and counted as such."""

    def handle(inputs, outputs):
        x_shape = get_shape(inputs[0])
        w_shape = get_shape(inputs[weight_index])
        out_shape = get_shape(outputs[0])
        if x_shape is None or w_shape is None or out_shape is None:
            raise ValueError('deformable conv: the trace did not record the '
                             'input, weight and output shapes')
        macs = x_shape[0] * math.prod(w_shape) * math.prod(out_shape[2:])
        return Counter({DEFORM_KEY: macs})

    return handle


_SDPA_OPS = (
    'aten::scaled_dot_product_attention',
    'aten::_scaled_dot_product_flash_attention_for_cpu',
    'aten::_scaled_dot_product_flash_attention',
    'aten::_scaled_dot_product_efficient_attention',
    'aten::_scaled_dot_product_cudnn_attention',
    'aten::_scaled_dot_product_attention_math',
)

#: op handles added to (or replacing those of) MMEngine's FlopAnalyzer
ADDED_FLOP_HANDLES = {
    'aten::einsum': einsum_flop_jit,
    **{name: sdpa_flop_jit for name in _SDPA_OPS},
    'prim::PythonOp.DeformConv2dFunction': deform_conv_flop_jit(2),
    'prim::PythonOp.ModulatedDeformConv2dFunction': deform_conv_flop_jit(3),
}


def flop_analyzer(model, inputs, added_handles=True):
    """An MMEngine :class:`FlopAnalyzer` of ``model(*inputs)``, with
    :data:`ADDED_FLOP_HANDLES` unless ``added_handles`` is False (stock
    MMEngine). Warnings about unsupported ops, uncalled modules and the
    tracer are silenced; :func:`analyze` reports unsupported ops itself."""
    if not isinstance(inputs, tuple):
        inputs = (inputs, )
    analyzer = FlopAnalyzer(model, inputs)
    if added_handles:
        analyzer.set_op_handle(**ADDED_FLOP_HANDLES)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    return analyzer


# --------------------------------------------------------------------------
# model, input and what to trace
# --------------------------------------------------------------------------
def resolve_config_path(path):
    """A config path; ``scope::rel/path.py`` names the config an installed
    OpenMMLab package ships (``<package>/.mim/configs/rel/path.py``)."""
    if '::' not in path:
        return path
    import importlib.util
    scope, rel = path.split('::', 1)
    spec = importlib.util.find_spec(scope)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f'{path}: package {scope!r} is not installed')
    full = os.path.join(list(spec.submodule_search_locations)[0], '.mim',
                        'configs', rel)
    if not os.path.isfile(full):
        raise FileNotFoundError(f'{path}: no such config ({full})')
    return full


def load_config(path, cfg_options=None):
    """``Config.fromfile`` of a path or of a ``scope::path`` config."""
    from mmengine.config import Config
    cfg = Config.fromfile(resolve_config_path(path))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def model_kind(model):
    """``'detector'``, ``'classifier'`` or ``'other'``."""
    try:
        from mmdet.models.detectors import BaseDetector
        if isinstance(model, BaseDetector):
            return 'detector'
    except ImportError:  # pragma: no cover
        pass
    try:
        from mmpretrain.models.classifiers import BaseClassifier
        if isinstance(model, BaseClassifier):
            return 'classifier'
    except ImportError:  # pragma: no cover
        pass
    return 'other'


def _test_pipeline(cfg):
    for key in ('test_dataloader', 'val_dataloader'):
        loader = cfg.get(key)
        dataset = loader.get('dataset') if loader else None
        while dataset is not None and 'pipeline' not in dataset and \
                'dataset' in dataset:  # dataset wrappers
            dataset = dataset['dataset']
        if dataset is not None and dataset.get('pipeline'):
            return dataset['pipeline']
    return cfg.get('test_pipeline') or []


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def default_shape(cfg, kind):
    """``((H, W), reason)``: the input size the config's test pipeline
    fixes, else 224x224 (classifiers) / 1024x1024 (detectors)."""
    for step in _test_pipeline(cfg):
        kind_name = str(step.get('type', ''))
        if kind_name.endswith('CenterCrop') and step.get('crop_size'):
            w, h = _pair(step['crop_size'])
            return (h, w), f'the test pipeline\'s CenterCrop({w}x{h})'
    for step in _test_pipeline(cfg):
        kind_name = str(step.get('type', ''))
        if kind_name.endswith('Resize') and step.get('scale') is not None:
            w, h = _pair(step['scale'])
            if not step.get('keep_ratio', False):
                return (h, w), (f'the test pipeline\'s Resize(scale=({w}, '
                                f'{h}), keep_ratio=False)')
            divisor = (cfg.model.get('data_preprocessor') or {}).get(
                'pad_size_divisor', 1) or 1
            long, short = max(w, h), min(w, h)
            padded = int(math.ceil(long / divisor) * divisor)
            short_padded = int(math.ceil(short / divisor) * divisor)
            return (short_padded, padded), (
                f'the test pipeline\'s Resize(scale=({w}, {h}), '
                f'keep_ratio=True): a {long}x{short} landscape image padded '
                f'to {padded}x{short_padded} (pad_size_divisor={divisor})')
    synthetic = cfg.get('synthetic_data')
    if synthetic and synthetic.get('image_size'):
        h, w = _pair(synthetic['image_size'])
        return (h, w), 'the synthetic data\'s image_size'
    if kind == 'detector':
        return (1024, 1024), 'the default for detectors'
    return (224, 224), 'the default'


@contextlib.contextmanager
def _forward_replaced(model, forward):
    """Make ``model.forward`` (hence ``model(x)``) call ``forward``."""
    had = 'forward' in vars(model)
    saved = vars(model).get('forward')
    model.forward = forward
    try:
        yield model
    finally:
        if had:
            model.forward = saved
        else:
            del model.forward


def _det_data_samples(height, width):
    from mmdet.structures import DetDataSample
    meta = dict(img_shape=(height, width), ori_shape=(height, width),
                pad_shape=(height, width), batch_input_shape=(height, width),
                scale_factor=(1.0, 1.0), img_id=0)
    return [DetDataSample(metainfo=meta)]


def _stage_names(backbone):
    names = list(getattr(backbone, 'res_layers', None) or [])
    if not names:
        names = [n for n, _ in backbone.named_children()
                 if re.fullmatch(r'layer\d+', n)]
    return names


# --------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------
def analyze(model, shape, backbone_only=False, added_handles=True,
            kind=None):
    """Trace ``model`` on a ``(1, 3, *shape)`` random image.

    Returns:
        dict: ``rows`` (list of ``(part, params, flops, added_flops)``:
        stem, stages, ``backbone``, then, unless ``backbone_only``, the
        other top-level parts and ``total``), ``by_operator`` (Counter of the
        traced module), ``unsupported`` (Counter of ops with no handle that
        MMEngine does not ignore: not counted), ``traced`` (what was
        traced), ``seconds``, ``rois`` (the most RoIs an RoI extractor
        saw, None without one).
    """
    kind = kind or model_kind(model)
    height, width = shape
    x = torch.randn(1, 3, height, width)
    model.eval()
    backbone = getattr(model, 'backbone', None)
    if backbone_only:
        if backbone is None:
            raise ValueError('--backbone-only: the model has no backbone')
        target, prefix, traced = backbone, '', 'model.backbone(x)'
        forward = None
    elif kind == 'detector':
        target, prefix = model, 'backbone.'
        forward = functools.partial(model._forward,
                                    batch_data_samples=_det_data_samples(
                                        height, width))
        traced = 'model._forward(x, data_samples with image metadata only)'
    elif kind == 'classifier':
        target, prefix = model, 'backbone.'
        forward = functools.partial(model.forward, mode='tensor')
        traced = "model(x, mode='tensor')"
    else:
        target, prefix, traced = model, 'backbone.', 'model(x)'
        forward = None
    if backbone is None:
        raise ValueError('the model has no backbone to break down by stage')

    # how many RoIs the RoI extractors see (the RoI heads' data-dependent
    # share); the hooks only read the shapes
    rois = []

    def count_rois(module, args):
        if len(args) > 1 and torch.is_tensor(args[1]):
            rois.append(int(args[1].shape[0]))

    hooks = [m.register_forward_pre_hook(count_rois)
             for m in target.modules()
             if type(m).__name__.endswith('RoIExtractor')]
    start = time.perf_counter()
    ctx = (_forward_replaced(target, forward) if forward is not None
           else contextlib.nullcontext())
    try:
        with ctx, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            analyzer = flop_analyzer(target, (x, ), added_handles)
            by_module_op = analyzer.by_module_and_operator()
            unsupported = analyzer.unsupported_ops()
    finally:
        for hook in hooks:
            hook.remove()
    seconds = time.perf_counter() - start

    params = parameter_count(target)

    def flops_of(name):
        counter = by_module_op.get(name, Counter())
        return (sum(counter.values()),
                sum(v for k, v in counter.items() if k in ADDED_KEYS))

    backbone_name = prefix[:-1]  # '' or 'backbone'
    rows = []
    stages = _stage_names(backbone)
    b_flops, b_added = flops_of(backbone_name)
    b_params = params.get(backbone_name, 0)
    stage_rows = []
    for stage in stages:
        f, a = flops_of(prefix + stage)
        stage_rows.append((stage, params.get(prefix + stage, 0), f, a))
    rows.append((STEM, b_params - sum(r[1] for r in stage_rows),
                 b_flops - sum(r[2] for r in stage_rows),
                 b_added - sum(r[3] for r in stage_rows)))
    rows += stage_rows
    rows.append(('backbone', b_params, b_flops, b_added))
    if not backbone_only:
        for name, _ in target.named_children():
            if name in ('backbone', 'data_preprocessor'):
                continue
            f, a = flops_of(name)
            p = params.get(name, 0)
            if f or p:
                rows.append((name, p, f, a))
        f, a = flops_of('')
        rows.append(('total', params.get('', 0), f, a))
    return dict(rows=rows, by_operator=by_module_op.get('', Counter()),
                unsupported=unsupported, traced=traced, seconds=seconds,
                shape=(height, width), kind=kind,
                rois=max(rois) if rois else None)


def flop_unit(flops):
    """``(scale, unit)``: G for totals of at least 1e9 FLOPs, else M."""
    return (1e9, 'G') if flops >= 1e9 else (1e6, 'M')


def format_table(rows):
    """A markdown table of :func:`analyze`'s rows (FLOPs in G, or in M when
    the largest count is below 1e9)."""
    scale, unit = flop_unit(max(r[2] for r in rows))
    lines = [f'| part | params (M) | FLOPs ({unit}) | of which added '
             f'handles ({unit}) |', '|---|---:|---:|---:|']
    for part, params, flops, added in rows:
        name = f'**{part}**' if part in ('backbone', 'total') else part
        lines.append(f'| {name} | {params / 1e6:.3f} | {flops / scale:.3f} '
                     f'| {added / scale:.3f} |')
    return '\n'.join(lines)


def format_report(result, config, shape_reason, stock=None):
    """The tool's whole printout: header, table, operator breakdown, ops
    not counted and, with ``stock``, the stock-MMEngine comparison."""
    h, w = result['shape']
    total_row = result['rows'][-1]
    total = total_row[2]
    lines = [
        f'config: {config}',
        f'input: 1x3x{h}x{w} ({shape_reason})',
        f'traced: {result["traced"]} in eval mode '
        f'({result["seconds"]:.1f} s)',
        'FLOPs: multiply-accumulates (1 MAC = 1 FLOP, MMEngine\'s '
        'convention); stem = backbone outside its stages',
        '',
        format_table(result['rows']),
        '',
    ]
    scale, unit = flop_unit(total)
    ops = result['by_operator']
    breakdown = ', '.join(f'{k} {v / scale:.3f}{unit}'
                          for k, v in sorted(ops.items(),
                                             key=lambda kv: -kv[1]))
    lines.append(f'{total_row[0]} by operator: {breakdown}')
    added = sum(v for k, v in ops.items() if k in ADDED_KEYS)
    share = 100.0 * added / total if total else 0.0
    lines.append(f'{total_row[0]}: {int(total_row[1]):,} parameters, '
                 f'{int(total):,} FLOPs')
    lines.append(f'counted by the added handles (einsum, sdpa, deform_conv): '
                 f'{added / scale:.3f}{unit} = {share:.1f}% of '
                 f'{total / scale:.3f}{unit}')
    if result.get('rois') is not None:
        lines.append(f'RoI heads ran on {result["rois"]} proposals of the '
                     f'random image (data-dependent)')
    unsupported = result['unsupported']
    if unsupported:
        listed = ', '.join(f'{k} x{v}' for k, v in
                           sorted(unsupported.items(), key=lambda kv: -kv[1]))
        lines.append(f'ops not counted (no handle; MMEngine counts no '
                     f'element-wise op): {listed}')
    else:
        lines.append('ops not counted: none')
    if stock is not None:
        s_total = stock['rows'][-1][2]
        gain = total - s_total
        lines.append(
            f'stock MMEngine handles (no added ones): {s_total / scale:.3f}'
            f'{unit} ({int(s_total):,} FLOPs); the added handles change the '
            f'count by {int(gain):+,} FLOPs ('
            f'{100.0 * gain / s_total if s_total else float("inf"):+.2f}%)')
        missed = sorted(set(stock['unsupported']) - set(unsupported))
        if missed:
            lines.append('ops stock MMEngine leaves uncounted that the added '
                         'handles count: ' + ', '.join(missed))
    return '\n'.join(lines)


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='Parameters and FLOPs (MACs) of a model per backbone '
        'stage, with MMEngine analysis plus einsum / SDPA / deformable-conv '
        'handles',
        epilog=__doc__.split('Examples::')[1].split('A model that')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file (or scope::path)')
    parser.add_argument(
        '--shape', type=int, nargs='+', metavar='SIZE',
        help='input size: H W, or one size for a square image (default: '
        'the config\'s fixed test size, else 224 / 1024)')
    parser.add_argument('--backbone-only', action='store_true',
                        help='trace only model.backbone')
    parser.add_argument(
        '--compare-stock', action='store_true',
        help='also trace with stock MMEngine handles (a second trace) and '
        'print the difference the added handles make')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (as in tools/train.py)')
    args = parser.parse_args(argv)
    if args.shape is not None:
        if len(args.shape) == 1:
            args.shape = args.shape * 2
        if len(args.shape) != 2 or min(args.shape) < 1:
            parser.error('--shape takes H W or one positive SIZE')
    return args


def main(argv=None, out=None):
    """Run the tool; returns the exit status (1 when the model rejects
    the input size)."""
    out = out or sys.stdout
    args = parse_args(argv)
    from mmengine.model import revert_sync_batchnorm
    from lesa_mm.utils import build_model_from_config

    cfg = load_config(args.config, args.cfg_options)
    model = revert_sync_batchnorm(build_model_from_config(cfg))
    kind = model_kind(model)
    if args.shape is not None:
        shape, reason = tuple(args.shape), '--shape'
    else:
        shape, reason = default_shape(cfg, kind)
    try:
        result = analyze(model, shape, args.backbone_only, kind=kind)
        stock = (analyze(model, shape, args.backbone_only,
                         added_handles=False, kind=kind)
                 if args.compare_stock else None)
    except ValueError as err:
        print(f'error: the model rejects a 1x3x{shape[0]}x{shape[1]} input: '
              f'{err}', file=sys.stderr)
        return 1
    print(format_report(result, args.config, reason, stock), file=out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
