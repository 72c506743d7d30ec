"""What each term of the attention layers contributes (``docs/lesa.md``,
section 10), measured on a trained model.

For every attention layer (:class:`~lesa_mm.models.LESA`, with or without
its unary term), on the layer's input ``x`` in eval mode:

* ``self_share``: the share of the binary term's value aggregate
  ``o_i = sum_j a_ij v_j`` that comes from the query's own position,
  ``||a_ii v_i|| / (||a_ii v_i|| + ||o_i - a_ii v_i||)``, and ``self_weight``,
  the attention weight ``a_ii`` itself (``uniform`` = ``1 / L`` for scale);
* LESA layers also give ``unary_norm`` = ``||u||``, ``binary_norm`` =
  ``||gate * b||`` (L2 norms over channels at each position) and ``gate``,
  the mean gate.

Each is the mean over heads, positions and images.

Example:
    >>> cfg, model = load_model(config, checkpoint)
    >>> stats = measure_terms(model, dataset_inputs(cfg, model, 16))
    >>> stats['backbone.layer3.1.conv2']['self_share']
"""
from collections import OrderedDict

import torch

from lesa_mm.models.layers.lesa import LESA

#: the measurements, in the order the tools print them
FIELDS = ('unary_norm', 'binary_norm', 'gate', 'self_share', 'self_weight',
          'uniform')


def attention_layers(model):
    """Name -> attention layer (:class:`LESA`), in module order."""
    return OrderedDict((name, m) for name, m in model.named_modules()
                       if isinstance(m, LESA))


@torch.no_grad()
def layer_terms(layer, x):
    """The measurements of one layer on the batch ``x`` (its input), each a
    tensor ``(N,)`` of per-image means (``uniform`` a float)."""
    binary = layer.binary
    n, _, h, w = x.shape
    length = h * w
    # (N, g, L, L) over (query, key), from the norms' running statistics
    attention = binary.attention_maps(x, range(length)).view(
        n, binary.groups, length, length)
    _, _, v = binary.split_heads(x)  # (N, g, dv, L)
    out = torch.matmul(v, attention.transpose(-1, -2))  # o_i, (N, g, dv, L)
    own_weight = attention.diagonal(dim1=-2, dim2=-1)  # a_ii, (N, g, L)
    own = own_weight.unsqueeze(2) * v
    own_norm, rest_norm = own.norm(dim=2), (out - own).norm(dim=2)
    share = own_norm / (own_norm + rest_norm).clamp_min(
        torch.finfo(own_norm.dtype).tiny)
    stats = dict(self_share=share.mean(dim=(1, 2)),
                 self_weight=own_weight.mean(dim=(1, 2)),
                 uniform=1.0 / length)
    if layer.unary is not None:
        u, b = layer.unary(x), binary(x)
        gate = layer.fusion.gate(u, b)
        stats.update(unary_norm=u.norm(dim=1).mean(dim=(1, 2)),
                     binary_norm=(gate * b).norm(dim=1).mean(dim=(1, 2)),
                     gate=gate.mean(dim=(1, 2, 3)))
    return stats


def extract_features(model, inputs):
    """Run the model's feature extraction (a detector's or classifier's
    ``extract_feat``; a bare backbone is run whole) on a preprocessed
    batch."""
    if hasattr(model, 'extract_feat'):
        return model.extract_feat(inputs)
    return model(inputs)


@torch.no_grad()
def measure_terms(model, batches):
    """Mean measurements of every attention layer of ``model`` (eval mode)
    over the images of ``batches`` (preprocessed input tensors).

    Returns:
        OrderedDict: layer name -> ``dict(kind, images, **measurements)``;
        ``kind`` is ``'LESA'`` or ``'self-attention'``.
    """
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no attention (LESA) '
                         f'layers to measure')
    sums = {name: {} for name in layers}
    counts = dict.fromkeys(layers, 0)

    def hook(name):
        def record(module, args):
            stats = layer_terms(module, args[0])
            for key, value in stats.items():
                total = value.sum().item() if torch.is_tensor(value) else \
                    value * args[0].shape[0]
                sums[name][key] = sums[name].get(key, 0.0) + total
            counts[name] += args[0].shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for inputs in batches:
            extract_features(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    result = OrderedDict()
    for name, layer in layers.items():
        if counts[name] == 0:
            raise ValueError(f'attention layer {name} was not run by the '
                             f"model's feature extraction")
        result[name] = dict(
            kind='LESA' if layer.unary is not None else 'self-attention',
            images=counts[name],
            **{k: v / counts[name] for k, v in sums[name].items()})
    return result


def dataset_inputs(cfg, model, num_images, batch_size=4):
    """Preprocessed input batches of the first ``num_images`` images of the
    config's test dataset (its test pipeline, then the model's data
    preprocessor), as a generator."""
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DATASETS, init_default_scope

    from lesa_mm.utils.config import default_scope
    init_default_scope(default_scope(cfg))
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    if not 1 <= num_images <= len(dataset):
        raise ValueError(f'num_images must be in [1, {len(dataset)}] (the '
                         f'test set), got {num_images}')
    for start in range(0, num_images, batch_size):
        samples = [dataset[i] for i in
                   range(start, min(start + batch_size, num_images))]
        yield model.data_preprocessor(pseudo_collate(samples), False)['inputs']


def format_table(stats):
    """A Markdown table of :func:`measure_terms`' result."""
    header = ['layer', 'kind', '\\|\\|u\\|\\|', '\\|\\|gate * b\\|\\|',
              'gate', 'self share', 'a_ii', '1/L']
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '---|' * 2 + '---:|' * (len(header) - 2)]
    for name, row in stats.items():
        cells = [f'{row[k]:.3g}' if k in row else '-' for k in FIELDS]
        lines.append(f'| {name} | {row["kind"]} | ' + ' | '.join(cells) +
                     ' |')
    return '\n'.join(lines)


def measure_checkpoint(config, checkpoint, num_images=16):
    """:func:`measure_terms` of ``config``'s model with ``checkpoint``'s
    weights over the first ``num_images`` images of its test set."""
    from lesa_mm.utils import load_model
    cfg, model = load_model(config, checkpoint)
    return measure_terms(model, dataset_inputs(cfg, model, num_images))
