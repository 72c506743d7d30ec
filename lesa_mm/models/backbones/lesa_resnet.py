"""LESA-ResNet family: ResNets whose chosen 3x3 convolutions are LESA layers.

One implementation for both task families: :class:`LESAResNet` and
:class:`LESAResNeXt` are registered in MMEngine's root ``MODELS``, which
MMDetection's and MMPretrain's ``MODELS`` search as their parent
(:mod:`lesa_mm.registry`). Parameter names follow their ResNet (``conv1``, ``bn1`` or the
deep ``stem``, ``layerN.M.conv1..3``, ``bn1..3``, ``downsample``), so with
LESA in no stage each backbone has exactly the state dict of its stock
counterpart (MMDetection's ``ResNet``, ``ResNetV1d``, ``ResNeXt``) and an
ordinary ImageNet checkpoint loads into every non-LESA part.
"""
import math
import numbers
from collections.abc import Sequence

import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init
from mmengine.utils import to_2tuple
from torch.nn.modules.batchnorm import _BatchNorm

from lesa_mm.registry import MODELS
from ..utils import (boolean, init_convs_and_norms, positive_int,
                     registered_layer_cfg, split_dcn_cfg)


def stage_sizes(input_size, strides, owner='LESAResNet'):
    """Each stage's output size ``(h, w)`` for images of ``input_size``
    (side, or height and width) and the stages' ``strides`` (ints): the
    stem (a stride-2 convolution, then a stride-2 max pool) gives
    ``ceil(side / 4)``, each stage of stride ``s`` divides by ``s`` rounding
    up, as the padded strided convolutions and LESA's ``ceil_mode`` pooling
    do."""
    size = to_2tuple(input_size)
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(
            v, numbers.Integral) or v < 1 for v in size):
        raise ValueError(f'{owner} input_size must be an int or (height, '
                         f'width) of ints >= 1, got {input_size!r}')
    size = tuple(math.ceil(v / 4) for v in size)
    sizes = []
    for stride in strides:
        size = tuple(math.ceil(v / stride) for v in size)
        sizes.append(size)
    return tuple(sizes)


class LESABottleneck(BaseModule):
    """ResNet bottleneck (torchvision "v1.5": stride on the 3x3) whose 3x3
    convolution may be a LESA layer.

    With ``lesa`` set, ``conv2`` is the attention layer that config builds
    from the ``MODELS`` registry (:class:`LESA` by default) and the block
    has no ``bn2`` (LESA normalises internally). Without it the block is
    MMDetection's ``Bottleneck`` (``groups > 1``: its ResNeXt bottleneck).

    Args:
        in_channels (int): Input channels.
        planes (int): Base channels of the stage; the output has
            ``planes * 4``.
        width (int): Bottleneck width (``planes`` for ResNet,
            ``2 * planes`` for WRN-50-2 and ResNeXt-50 32x4d).
        stride (int): Stride of the 3x3 convolution / LESA pooling.
        downsample (nn.Module, optional): Projection of the identity.
        conv_cfg (dict, optional): Config of the ordinary convolutions.
        norm_cfg (dict): Config of the norms.
        dcn (dict, optional): Deformable-conv config for the 3x3 (and for
            LESA's unary convolution).
        lesa (dict, optional): Config of the attention layer that replaces
            the 3x3 convolution, e.g. ``dict(type='LESA', feat_size=14,
            groups=8, pe_type='classification')``; the block adds
            ``in_channels``, ``out_channels`` (both the width), ``stride``,
            ``dcn`` and ``norm_cfg``. None keeps the ordinary 3x3 conv.
        groups (int): Groups (cardinality) of the ordinary 3x3 conv; a LESA
            layer takes its own ``groups`` from ``lesa``. Defaults to 1.
        init_cfg (dict, optional): Init config.
    """

    expansion = 4

    def __init__(self,
                 in_channels,
                 planes,
                 width,
                 stride=1,
                 downsample=None,
                 conv_cfg=None,
                 norm_cfg=dict(type='BN', requires_grad=True),
                 dcn=None,
                 lesa=None,
                 groups=1,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        out_channels = planes * self.expansion
        self.with_lesa = lesa is not None
        dcn, fallback_on_stride = split_dcn_cfg(dcn)
        # mmdet's convention: optionally keep strided 3x3s ordinary. LESA's
        # unary conv never strides, so it always takes the DCN.
        if fallback_on_stride and stride > 1 and not self.with_lesa:
            dcn = None
        self.conv1 = build_conv_layer(
            conv_cfg, in_channels, width, 1, bias=False)
        self.add_module('bn1', build_norm_layer(norm_cfg, width)[1])
        if self.with_lesa:
            self.conv2 = MODELS.build(
                dict(lesa, in_channels=width, out_channels=width,
                     stride=stride, dcn=dcn, norm_cfg=norm_cfg))
        else:
            self.conv2 = build_conv_layer(
                dcn or conv_cfg, width, width, 3,
                stride=stride, padding=1, groups=groups, bias=False)
            self.add_module('bn2', build_norm_layer(norm_cfg, width)[1])
        self.conv3 = build_conv_layer(
            conv_cfg, width, out_channels, 1, bias=False)
        self.add_module('bn3', build_norm_layer(norm_cfg, out_channels)[1])
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if not self.with_lesa:
            out = self.bn2(out)
        out = self.relu(out)
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


@MODELS.register_module()
class LESAResNet(BaseModule):
    """ResNet / ResNet-D / Wide-ResNet with LESA layers (arXiv:2107.05637).

    Defaults build the ImageNet LESA-ResNet-50 (output stride 16). The
    detection backbone uses ``strides=(1, 2, 2, 2)``,
    ``pe_type='detection_qr'`` and the feature sizes of its input, e.g.
    ``feat_sizes=(256, 128, 64, 32)`` at 1024x1024. With
    ``stage_with_lesa`` all False it is MMDetection's ``ResNet`` (with
    ``deep_stem=True, avg_down=True``: its ``ResNetV1d``), key for key and
    output for output. :class:`LESAResNeXt` adds grouped bottlenecks.

    A checkpoint loaded into the backbone by any route (``load_state_dict``,
    ``init_cfg=dict(type='Pretrained', ...)``, a runner's ``load_from`` or
    ``resume``) is adapted on the way in
    (:func:`lesa_mm.utils.transfer.adapt_on_load`, ``docs/lesa.md`` section
    9): ``'detection_qr'`` tables trained for another feature size are kept
    (the layers take their shape), a ``'classification'`` ImageNet
    checkpoint is adapted to ``'detection_qr'``, a whole classifier's or
    detector's checkpoint gives its ``backbone.`` part, missing
    deformable-conv offsets start at zero; the log reports what was adapted,
    a re-initialised trained tensor as a WARNING. Anything else that does
    not fit is left to ``load_state_dict`` to report. The LESA recipe's
    ImageNet-to-COCO transfer, which starts the tables afresh, is
    ``init_cfg=dict(type='LESATransfer', ...)``.

    Args:
        depth (int): 50, 101 or 152.
        in_channels (int): Input image channels. Defaults to 3.
        stem_channels (int): Stem output channels. Defaults to 64.
        base_channels (int): ``planes`` of the first stage. Defaults to 64.
        width_per_group (int): Bottleneck base width: the bottleneck of a
            stage with ``planes`` has ``planes * width_per_group // 64``
            channels; 128 gives WRN-50-2. Defaults to 64.
        strides (Sequence[int]): Stride of each stage.
            Defaults to ``(1, 2, 2, 1)``.
        feat_sizes (Sequence[int | tuple[int, int]], optional): Output
            feature size (side, or height and width) of each stage; a LESA
            layer's position tables are built for its *input* size
            (``feat_size * stride`` for a strided first block). Defaults to
            those of ``input_size``.
        input_size (int | tuple[int, int], optional): The image size the
            position tables are built for, as one value: each stage's size
            is derived from it and the strides (the stem divides by 4, a
            stride-2 stage halves, odd sides rounding up, as the layers
            do). Give it or ``feat_sizes``, not both. Defaults to 224 when
            neither is given (``(56, 28, 14, 14)`` with the default strides).
        stage_with_lesa (Sequence[bool]): Stages whose 3x3 convs are LESA
            layers; any stage may. Defaults to ``(False, False, True, True)``.
        stage_with_first_conv (Sequence[bool]): In a LESA stage, whether the
            first block keeps its ordinary 3x3 conv.
            Defaults to ``(True, True, True, False)``.
        pe_type (str): LESA position encoding, ``'classification'`` or
            ``'detection_qr'``. Defaults to ``'classification'``.
        lesa_groups (int): LESA heads, which are also the groups of LESA's
            unary 3x3 conv. Defaults to 8.
        attn_impl (str): LESA binary-term kernel, ``'fused'`` or
            ``'reference'`` (see :class:`LESA`). Defaults to ``'fused'``.
        lesa (dict): Config of the attention layer of the LESA stages,
            built from the ``MODELS`` registry with the arguments
            ``in_channels``, ``out_channels``, ``feat_size``, ``groups``
            (``lesa_groups``), ``stride``, ``pe_type``, ``dcn``,
            ``with_cp``, ``norm_cfg`` and ``attn_impl`` added; a downstream
            project swaps in its own layer by registering it and naming its
            ``type``. Defaults to ``dict(type='LESA')``.
        out_indices (int | Sequence[int]): Stages whose outputs are
            returned. Defaults to ``(3, )``.
        frozen_stages (int): Stages to freeze (stem included when >= 0);
            -1 freezes nothing. Defaults to -1.
        conv_cfg (dict, optional): Config of the ordinary convolutions.
        norm_cfg (dict): Config of every norm, LESA's included.
            Defaults to ``dict(type='BN', requires_grad=True)``.
        norm_eval (bool): Keep the norms in eval mode while training.
            Defaults to False.
        dcn (dict, optional): Deformable-conv config, e.g.
            ``dict(type='DCN', deform_groups=1, fallback_on_stride=False)``,
            applied to the 3x3 convs and LESA unary convs of the stages in
            ``stage_with_dcn``. Defaults to None.
        stage_with_dcn (Sequence[bool]): Stages using ``dcn``.
            Defaults to ``(False, False, False, False)``.
        with_cp (bool): Gradient-checkpoint the unary and binary terms of
            every LESA layer (ordinary blocks are not checkpointed).
            Defaults to False.
        zero_init_residual (bool): Zero-init the last norm of each block
            (without a pretrained checkpoint). The authors' detection
            backbone does, and the detection configs set it; their ImageNet
            models do not. Defaults to False.
        deep_stem (bool): Three 3x3 convs (``stem``) instead of the 7x7
            ``conv1`` (ResNet-D). Defaults to False.
        avg_down (bool): Downsample the identity with an average pool before
            a stride-1 projection (ResNet-D). Defaults to False.
        init_cfg (dict | list[dict], optional): Init config, e.g.
            ``dict(type='Pretrained', checkpoint=...)``, applied after the
            spec's initialisation.
    """

    arch_settings = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                     152: (3, 8, 36, 3)}

    def __init__(self,
                 depth=50,
                 in_channels=3,
                 stem_channels=64,
                 base_channels=64,
                 width_per_group=64,
                 strides=(1, 2, 2, 1),
                 feat_sizes=None,
                 input_size=None,
                 stage_with_lesa=(False, False, True, True),
                 stage_with_first_conv=(True, True, True, False),
                 pe_type='classification',
                 lesa_groups=8,
                 attn_impl='fused',
                 lesa=dict(type='LESA'),
                 out_indices=(3, ),
                 frozen_stages=-1,
                 conv_cfg=None,
                 norm_cfg=dict(type='BN', requires_grad=True),
                 norm_eval=False,
                 dcn=None,
                 stage_with_dcn=(False, False, False, False),
                 with_cp=False,
                 zero_init_residual=False,
                 deep_stem=False,
                 avg_down=False,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        owner = type(self).__name__
        if depth not in self.arch_settings:
            raise ValueError(f'{owner} depth must be one of '
                             f'{tuple(self.arch_settings)}, got {depth!r}')
        stage_blocks = self.arch_settings[depth]
        num_stages = len(stage_blocks)
        in_channels = positive_int(owner, 'in_channels', in_channels)
        stem_channels = positive_int(owner, 'stem_channels', stem_channels,
                                     minimum=2 if deep_stem else 1)
        base_channels = positive_int(owner, 'base_channels', base_channels)
        width_per_group = positive_int(owner, 'width_per_group',
                                       width_per_group)
        lesa_groups = positive_int(owner, 'lesa_groups', lesa_groups)
        for name, value in (('norm_eval', norm_eval), ('with_cp', with_cp),
                            ('zero_init_residual', zero_init_residual),
                            ('deep_stem', deep_stem),
                            ('avg_down', avg_down)):
            boolean(owner, name, value)
        registered_layer_cfg(owner, 'norm_cfg', norm_cfg, dict(type='BN'))
        registered_layer_cfg(owner, 'conv_cfg', conv_cfg, dict(type='Conv2d'),
                             optional=True)
        registered_layer_cfg(owner, 'dcn', dcn,
                             dict(type='DCN', deform_groups=1), optional=True)
        registered_layer_cfg(owner, 'lesa', lesa, dict(type='LESA'))
        if isinstance(out_indices, numbers.Integral):
            out_indices = (out_indices, )
        if feat_sizes is not None and input_size is not None:
            raise ValueError(
                f'{owner} takes feat_sizes or input_size, not both; got '
                f'feat_sizes={feat_sizes!r} and input_size={input_size!r}')
        for name, value in (('strides', strides),
                            ('feat_sizes', strides if feat_sizes is None
                             else feat_sizes),
                            ('stage_with_lesa', stage_with_lesa),
                            ('stage_with_first_conv', stage_with_first_conv),
                            ('stage_with_dcn', stage_with_dcn),
                            ('out_indices', out_indices)):
            if not isinstance(value, Sequence) or isinstance(value, str):
                raise ValueError(f'{owner} {name} must be a sequence, got '
                                 f'{value!r}')
            if name != 'out_indices' and len(value) != num_stages:
                raise ValueError(f'{owner} {name} needs one entry per '
                                 f'stage ({num_stages}), got {value!r}')
        strides = tuple(positive_int(owner, 'strides entry', s)
                        for s in strides)
        if feat_sizes is None:
            feat_sizes = stage_sizes(
                224 if input_size is None else input_size, strides, owner)
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(num_stages)
                                  for i in out_indices):
            raise ValueError(f'{owner} out_indices must be a non-empty '
                             f'subset of {tuple(range(num_stages))}, got '
                             f'{out_indices!r}')
        if frozen_stages not in range(-1, num_stages + 1):
            raise ValueError(f'{owner} frozen_stages must be in '
                             f'[-1, {num_stages}], got {frozen_stages!r}')
        self.depth = depth
        self.stage_blocks = stage_blocks
        self.base_channels = base_channels
        self.width_per_group = width_per_group
        self.out_indices = tuple(int(i) for i in out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.zero_init_residual = zero_init_residual
        self.with_cp = with_cp
        self.deep_stem = deep_stem
        self.avg_down = avg_down

        self._make_stem(in_channels, stem_channels, conv_cfg, norm_cfg)
        in_ch = stem_channels
        self.res_layers = []
        for i, num_blocks in enumerate(stage_blocks):
            planes = base_channels * 2**i
            stage_lesa = None
            if stage_with_lesa[i]:
                stage_lesa = dict(
                    lesa, groups=lesa_groups, pe_type=pe_type,
                    with_cp=with_cp, attn_impl=attn_impl)
            layer = self._make_stage(
                in_ch, planes, num_blocks, strides[i], feat_sizes[i],
                stage_lesa, stage_with_first_conv[i],
                dcn if stage_with_dcn[i] else None, conv_cfg, norm_cfg)
            in_ch = planes * LESABottleneck.expansion
            name = f'layer{i + 1}'
            self.add_module(name, layer)
            self.res_layers.append(name)
        self.feat_dim = in_ch
        self._freeze_stages()
        # adapt whatever checkpoint is loaded, by whichever route
        self._register_load_state_dict_pre_hook(self._adapt_on_load)

    def get_layer_depth(self, param_name, prefix=''):
        """The layer id of a parameter and the number of layer ids, for
        MMPretrain's layer-wise learning-rate decay
        (``LearningRateDecayOptimWrapperConstructor``): MMPretrain's
        ``ResNet`` rule on this backbone's :attr:`stage_blocks` (every
        parameter of a block, its LESA layer's included, has the block's
        depth)."""
        from mmpretrain.models.backbones import ResNet
        return ResNet.get_layer_depth(self, param_name, prefix)

    def block_width(self, planes):
        """Width and groups of the 3x3 conv of a stage's bottlenecks."""
        return planes * self.width_per_group // 64, 1

    def _make_stem(self, in_channels, stem_channels, conv_cfg, norm_cfg):
        def conv_norm(cin, cout, kernel_size, stride):
            return [build_conv_layer(conv_cfg, cin, cout, kernel_size,
                                     stride=stride, padding=kernel_size // 2,
                                     bias=False),
                    build_norm_layer(norm_cfg, cout)[1]]

        if self.deep_stem:  # MMDetection's ResNetV1d stem
            half = stem_channels // 2
            self.stem = nn.Sequential(
                *conv_norm(in_channels, half, 3, 2), nn.ReLU(inplace=True),
                *conv_norm(half, half, 3, 1), nn.ReLU(inplace=True),
                *conv_norm(half, stem_channels, 3, 1), nn.ReLU(inplace=True))
        else:
            conv, norm = conv_norm(in_channels, stem_channels, 7, 2)
            self.conv1 = conv
            self.add_module('bn1', norm)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def _make_stage(self, in_channels, planes, num_blocks, stride, feat_size,
                    lesa, first_conv, dcn, conv_cfg, norm_cfg):
        out_channels = planes * LESABottleneck.expansion
        width, groups = self.block_width(planes)
        downsample = None
        if stride != 1 or in_channels != out_channels:
            # MMDetection's ResLayer, avg_down included
            layers = []
            if self.avg_down:
                layers.append(nn.AvgPool2d(
                    kernel_size=stride, stride=stride, ceil_mode=True,
                    count_include_pad=False))
            layers += [
                build_conv_layer(conv_cfg, in_channels, out_channels, 1,
                                 stride=1 if self.avg_down else stride,
                                 bias=False),
                build_norm_layer(norm_cfg, out_channels)[1]]
            downsample = nn.Sequential(*layers)
        blocks = []
        for b in range(num_blocks):
            block_stride = stride if b == 0 else 1
            block_lesa = None
            if lesa is not None and not (b == 0 and first_conv):
                # a strided LESA layer attends before it pools
                block_lesa = dict(
                    lesa,
                    feat_size=tuple(s * block_stride
                                    for s in to_2tuple(feat_size)))
            blocks.append(
                LESABottleneck(
                    in_channels if b == 0 else out_channels, planes, width,
                    stride=block_stride,
                    downsample=downsample if b == 0 else None,
                    conv_cfg=conv_cfg, norm_cfg=norm_cfg, dcn=dcn,
                    lesa=block_lesa, groups=groups))
        return nn.Sequential(*blocks)

    def _freeze_stages(self):
        if self.frozen_stages >= 0:
            frozen = [self.stem] if self.deep_stem else [self.conv1, self.bn1]
            frozen += [getattr(self, f'layer{i}')
                       for i in range(1, self.frozen_stages + 1)]
            for m in frozen:
                m.eval()
                for param in m.parameters():
                    param.requires_grad = False

    def _attention_layers(self):
        return [m.conv2 for m in self.modules()
                if isinstance(m, LESABottleneck) and m.with_lesa]

    def init_weights(self):
        """The initialisation of ``docs/lesa.md`` for the ordinary layers,
        then the ``init_cfg`` (e.g. ``Pretrained``, whose checkpoint is
        adapted on load, see the class docstring).

        Ordinary convolutions are Kaiming-normal (fan_out, relu), norms 1/0,
        deformable-conv offsets 0, and the last norm of each block 0 with
        ``zero_init_residual``. The attention layers are left as they are:
        a LESA layer initialises itself when built; one with its own
        ``init_cfg`` applies it here.
        """
        if self.init_cfg is None or not self.is_init:
            self._init_from_spec()
        if self.init_cfg is not None:
            super().init_weights()

    def _init_from_spec(self):
        attention = self._attention_layers()
        init_convs_and_norms(self, skip=attention)
        for m in self.modules():
            if not isinstance(m, LESABottleneck):
                continue
            if not m.with_lesa and hasattr(m.conv2, 'conv_offset'):
                constant_init(m.conv2.conv_offset, 0)
            if self.zero_init_residual:
                constant_init(m.bn3, 0)
        for layer in attention:
            if getattr(layer, 'init_cfg', None) is not None:
                layer.init_weights()

    def _adapt_on_load(self, state_dict, prefix, *args):
        from lesa_mm.utils.transfer import adapt_on_load
        adapt_on_load(self, state_dict, prefix)

    def forward(self, x):
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


@MODELS.register_module()
class LESAResNeXt(LESAResNet):
    """ResNeXt with LESA layers: :class:`LESAResNet` whose ordinary 3x3
    convolutions are grouped, as MMDetection's ``ResNeXt`` (which it equals,
    key for key and output for output, with LESA in no stage).

    The bottleneck width is ``floor(planes * base_width / base_channels) *
    groups`` (``planes`` when ``groups == 1``), e.g. 128, 256, 512, 1024 for
    32x4d; a LESA layer replaces the block's grouped 3x3 with the same
    width in and out.

    Cardinality and LESA heads are independent: ``groups`` (the cardinality)
    groups the ordinary 3x3 convolutions only; a LESA layer's heads, and
    the groups of its unary 3x3 convolution, are ``lesa_groups`` (8 by
    default, as in LESA-ResNet). Tying the heads to the cardinality would
    leave each head ``width / (2 * 32)`` query/key channels (8 in stage 3 of
    32x4d) against LESA's 32, and would make the unary term a convolution of
    4-channel groups; the LESA recipes keep 8 heads at any width.

    Args:
        groups (int): Cardinality of the ordinary 3x3 convolutions.
            Defaults to 32.
        base_width (int): Width of each group at ``base_channels`` planes.
            Defaults to 4.
        **kwargs: The arguments of :class:`LESAResNet` (but
            ``width_per_group``: the width follows from ``groups`` and
            ``base_width``).
    """

    def __init__(self, groups=32, base_width=4, **kwargs):
        owner = type(self).__name__
        if 'width_per_group' in kwargs:
            raise ValueError(f'{owner} takes its width from groups and '
                             f'base_width, not width_per_group')
        self.groups = positive_int(owner, 'groups', groups)
        self.base_width = positive_int(owner, 'base_width', base_width)
        super().__init__(**kwargs)

    def block_width(self, planes):
        if self.groups == 1:
            return planes, 1
        width = math.floor(planes * self.base_width / self.base_channels)
        return width * self.groups, self.groups
