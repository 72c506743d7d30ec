"""FLOP counting of LESA models on MMEngine's :class:`FlopAnalyzer`.

Convention: MMEngine's, one multiply-accumulate (MAC) is one FLOP. Two
additions to MMEngine's handles:

* :data:`OP_HANDLES` counts the ops LESA models run that MMEngine leaves
  uncounted or rounds: ``scaled_dot_product_attention`` (and its CPU/CUDA
  backend kernels), mmcv's deformable convolutions and an exact
  ``aten::einsum``;
* :class:`LESAFlopAnalyzer` counts every :class:`LESABinary`'s attention as
  the method's own MACs (:meth:`LESABinary.attention_macs`), whichever
  kernel (``attn_impl``) was traced: the traced ops of the attention are
  replaced, under the operator key ``'lesa_attention'``.

Example:
    >>> from lesa_mm.analysis import complexity_info
    >>> model.eval()
    >>> info = complexity_info(model, torch.randn(1, 3, 224, 224))
    >>> info['flops'], info['params'], info['by_module']['backbone']
"""
import math
from collections import Counter, defaultdict
from functools import partial

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import get_shape
from mmengine.analysis.print_helper import (_format_size,
                                            complexity_stats_str,
                                            complexity_stats_table)

from lesa_mm.models.layers.binary import LESABinary

EINSUM_KEY, SDPA_KEY, DEFORM_KEY = 'einsum', 'sdpa', 'deform_conv'
ATTENTION_KEY = 'lesa_attention'


def _label_dims(term, ndim):
    """Index labels of one einsum operand of ``ndim`` dimensions; the
    dimensions under an ellipsis are labelled ``('...', k)`` counted from
    the right, so that they broadcast as einsum broadcasts them."""
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

    The product of the sizes of all distinct indices (kept and summed), one
    MAC per term of the sum behind each output element: for two operands
    what ``bmm`` counts for the same contraction, for three or more the
    naive single-loop cost. Size-1 dimensions broadcast. One operand with no
    summed index (a permutation, a diagonal) costs 0.

    Args:
        equation (str): The equation, explicit (``->``) or implicit.
        shapes (list[Sequence[int]]): The operands' shapes.

    Returns:
        int: The MACs.
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


def sdpa_macs(q_shape, k_shape, v_shape):
    """Multiply-accumulates of ``scaled_dot_product_attention(q, k, v)``.

    ``q (..., L, E)``, ``k (..., S, E)``, ``v (..., S, Ev)``: the products
    ``q k^T`` and ``softmax(.) v``, ``batch * L * S * (E + Ev)``, as ``bmm``
    counts an unfused attention; the scaling, mask and softmax are
    element-wise and not counted. The batch is the queries' broadcast
    against the keys' (the queries' alone for grouped-query attention).

    Returns:
        int: The MACs.
    """
    *q_batch, length, e = q_shape
    *k_batch, source, _ = k_shape
    try:
        batch = torch.broadcast_shapes(tuple(q_batch), tuple(k_batch))
    except RuntimeError:  # grouped-query attention: fewer key heads
        batch = q_batch
    return math.prod(batch) * length * source * (e + v_shape[-1])


def _shapes(values, op):
    shapes = [get_shape(v) for v in values]
    if any(s is None for s in shapes):
        raise ValueError(f'{op}: the trace did not record every operand '
                         f'shape')
    return shapes


def einsum_flop_jit(inputs, outputs):
    """Op handle of ``aten::einsum``: :func:`einsum_macs` of the traced
    equation and operands (MMEngine's own handle parses numpy's estimate,
    rounded to 4 significant digits)."""
    equation = inputs[0].toIValue()
    shapes = _shapes(inputs[1].node().inputs(), f'einsum {equation!r}')
    return Counter({EINSUM_KEY: einsum_macs(equation, shapes)})


def sdpa_flop_jit(inputs, outputs):
    """Op handle of the scaled-dot-product-attention ops, all of which take
    ``query, key, value`` first: :func:`sdpa_macs`."""
    shapes = _shapes(inputs[:3], 'scaled_dot_product_attention')
    return Counter({SDPA_KEY: sdpa_macs(*shapes)})


def deform_conv_flop_jit(weight_index):
    """Op handle of an mmcv deformable convolution whose weight is its
    ``weight_index``-th traced input: the MACs of the ordinary convolution
    of that weight and output (as MMEngine counts ``aten::_convolution``).
    The bilinear sampling and the modulation are not counted; the conv
    predicting the offsets is an ordinary conv."""

    def handle(inputs, outputs):
        x, w, out = _shapes([inputs[0], inputs[weight_index], outputs[0]],
                            'deformable conv')
        return Counter({DEFORM_KEY: x[0] * math.prod(w) * math.prod(out[2:])})

    return handle


_SDPA_OPS = (
    'aten::scaled_dot_product_attention',
    'aten::_scaled_dot_product_flash_attention_for_cpu',
    'aten::_scaled_dot_product_flash_attention',
    'aten::_scaled_dot_product_efficient_attention',
    'aten::_scaled_dot_product_cudnn_attention',
    'aten::_scaled_dot_product_attention_math',
)

#: Op handles added to (or replacing) MMEngine's.
OP_HANDLES = {
    'aten::einsum': einsum_flop_jit,
    **{name: sdpa_flop_jit for name in _SDPA_OPS},
    'prim::PythonOp.DeformConv2dFunction': deform_conv_flop_jit(2),
    'prim::PythonOp.ModulatedDeformConv2dFunction': deform_conv_flop_jit(3),
}


class LESAFlopAnalyzer(FlopAnalyzer):
    """MMEngine's :class:`FlopAnalyzer` with :data:`OP_HANDLES`, counting
    LESA's attention as the method defines it.

    A forward pre-hook records the input size of every :class:`LESABinary`
    call. After the trace, everything counted inside a ``LESABinary``
    except its :attr:`KEPT` children (the qkv projection and its norm, the
    output norm: ordinary modules, counted by the ordinary handles) is the
    kernel's work; it is taken out of the module and of its ancestors and
    replaced by :meth:`LESABinary.attention_macs`, under the operator
    ``'lesa_attention'``; the replaced children (``position``,
    ``logit_norm``) read 0. The BatchNorm over the logits is replaced too:
    the reference kernel applies it to the ``L x L`` logits, the fused one
    folds it into per-head scales, and the method's MACs count neither. The
    count is therefore the same for ``attn_impl='fused'`` and
    ``'reference'``; so are the ops left uncounted
    (:meth:`unsupported_ops`).

    Args:
        model (nn.Module): The model to analyse.
        inputs (tuple): Its inputs.
    """

    KEPT = ('qkv', 'qkv_norm', 'out_norm')

    def __init__(self, model, inputs):
        super().__init__(model, inputs)
        self.set_op_handle(**OP_HANDLES)

    def _analyze(self):
        if self._stats is not None:
            return self._stats
        calls = defaultdict(list)

        def record(module, args):
            calls[module].append(tuple(int(s) for s in args[0].shape))

        hooks = [m.register_forward_pre_hook(record)
                 for m in self._model.modules() if isinstance(m, LESABinary)]
        warn = self._enable_warn_unsupported_ops
        self._enable_warn_unsupported_ops = False  # warn once, below
        try:
            stats = super()._analyze()
        finally:
            self._enable_warn_unsupported_ops = warn
            for hook in hooks:
                hook.remove()
        for module, shapes in calls.items():
            name = self._aliases[module]
            kept = [f'{name}.{c}'.lstrip('.') for c in self.KEPT]
            macs = sum(module.attention_macs(n, h, w) for n, _, h, w in shapes)
            inside = [m for m in stats.counts
                      if m.startswith(f'{name}.'.lstrip('.')) and m != name
                      and not any(m == c or m.startswith(f'{c}.')
                                  for c in kept)]
            for table, added in ((stats.counts, macs),
                                 (stats.unsupported_ops, 0)):
                kernel = Counter(table[name])
                for child in kept:
                    kernel.subtract(table.get(child, Counter()))
                for module_name in inside:  # e.g. logit_norm, position
                    table[module_name] = Counter()
                for ancestor in self._get_all_ancestors(name):
                    counter = table[ancestor]
                    counter.subtract(kernel)
                    if added:
                        counter[ATTENTION_KEY] += added
                    table[ancestor] = Counter(
                        {k: v for k, v in counter.items() if v})
        self._warn_unsupported_ops(stats.unsupported_ops[''])
        return stats


def complexity_info(model, inputs, show_table=True, show_arch=False,
                    max_depth=3):
    """FLOPs and parameters of ``model(*inputs)``, as MMEngine's
    :func:`~mmengine.analysis.get_model_complexity_info` returns them
    (without activations), counted by :class:`LESAFlopAnalyzer`.

    The model is traced as it is (put it in eval mode first) under
    ``torch.no_grad()``.

    Args:
        model (nn.Module): The model.
        inputs (Tensor | tuple): Its input(s).
        show_table (bool): Build MMEngine's per-module table
            (``out_table``). Defaults to True.
        show_arch (bool): Build MMEngine's annotated architecture
            (``out_arch``). Defaults to False.
        max_depth (int): Depth of the table. Defaults to 3.

    Returns:
        dict: ``flops``, ``params`` (ints) and their ``*_str``;
        ``by_module`` and ``by_operator`` (Counters of FLOPs);
        ``unsupported_ops`` (Counter of ops with no handle, not counted);
        ``out_table`` and ``out_arch`` (``''`` unless asked for).
    """
    if not isinstance(inputs, tuple):
        inputs = (inputs, )
    analyzer = LESAFlopAnalyzer(model, inputs)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    with torch.no_grad():
        flops = analyzer.total()
    params = parameter_count(model)['']
    return dict(
        flops=flops, flops_str=_format_size(flops),
        params=params, params_str=_format_size(params),
        by_module=analyzer.by_module(),
        by_operator=analyzer.by_operator(),
        unsupported_ops=analyzer.unsupported_ops(),
        out_table=(complexity_stats_table(analyzer, max_depth=max_depth)
                   if show_table else ''),
        out_arch=complexity_stats_str(analyzer) if show_arch else '')


def build_eval_model(config, cfg_options=None):
    """Build ``config``'s model (eval mode) as the OpenMMLab tools do;
    ``scope::path`` names a config an installed package ships."""
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmengine.model import revert_sync_batchnorm

    from lesa_mm.utils import build_model_from_config
    cfg = get_config(config) if '::' in config else Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return revert_sync_batchnorm(build_model_from_config(cfg)).eval()


def traced_inputs(model, shape):
    """Make ``model(inputs)`` the traced forward of a ``shape`` image:
    returns ``(model, inputs)``. Classifiers run ``model(x, mode='tensor')``,
    detectors ``model._forward(x, data_samples)`` as MMDetection's
    ``get_flops`` does, on a random image through the model's data
    preprocessor (padding included)."""
    from lesa_mm.utils.config import model_task
    h, w = shape
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    data = dict(inputs=[image])
    if model_task(model) == 'detection':
        from mmdet.structures import DetDataSample
        data['data_samples'] = [DetDataSample(metainfo=dict(
            img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.)))]
    data = model.data_preprocessor(data)
    model.forward = partial(model.forward, data_samples=data['data_samples'],
                            mode='tensor')
    return model, data['inputs']
