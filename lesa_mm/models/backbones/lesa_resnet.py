"""LESA-ResNet family: ResNets whose chosen 3x3 convolutions are LESA layers.

One implementation for both task families: :class:`LESAResNet` and
:class:`LESAResNeXt` subclass MMDetection's ``ResNet``/``ResNeXt`` and are
registered in MMEngine's root ``MODELS``, which MMDetection's and
MMPretrain's ``MODELS`` search as their parent (:mod:`lesa_mm.registry`;
:mod:`lesa_mm.models.backbones` registers them on first use). Parameter
names are their ResNet's (``conv1``, ``bn1`` or the deep ``stem``,
``layerN.M.conv1..3``, ``bn1..3``, ``downsample``), so with LESA in no
stage each backbone has exactly the state dict of its stock counterpart
(MMDetection's ``ResNet``, ``ResNetV1d``, ``ResNeXt``) and an ordinary
ImageNet checkpoint loads into every non-LESA part.
"""
import inspect
import math

import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmdet.models.backbones import ResNet, ResNeXt
from mmdet.models.backbones.resnet import Bottleneck
from mmdet.models.layers import ResLayer
from mmengine.model.weight_init import constant_init
from mmengine.utils import to_2tuple

from lesa_mm.registry import MODELS
from ..utils import init_convs_and_norms, positive_int, split_dcn_cfg
from .arguments import checked_arguments


class LESABottleneck(Bottleneck):
    """MMDetection's ResNet bottleneck whose 3x3 convolution may be a LESA
    layer, at the bottleneck width of a WRN or ResNeXt.

    The stock block is built first; what LESA changes is then put in place:
    with ``lesa`` set, ``conv2`` is the attention layer that config builds
    from the ``MODELS`` registry (:class:`LESA` by default), in the 3x3's
    place (its width, the 3x3's stride ``conv2_stride``, its dilation). The
    layer normalises its own output, so the block's ``bn2`` is an identity
    (no state). Without ``lesa`` it is MMDetection's ``Bottleneck``
    (``groups > 1``: its ResNeXt bottleneck), key for key and output for
    output. ``stride``, ``dilation``, ``style``, ``plugins`` and ``with_cp``
    act as in the stock block.

    Args:
        inplanes (int): Input channels.
        planes (int): Base channels of the stage; the output has
            ``planes * 4``.
        width (int, optional): Bottleneck width (``2 * planes`` for
            WRN-50-2 and ResNeXt-50 32x4d). Defaults to ``planes``.
        groups (int): Groups (cardinality) of the ordinary 3x3 conv; a LESA
            layer takes its own ``groups`` from ``lesa``. Defaults to 1.
        lesa (dict, optional): Config of the attention layer that replaces
            the 3x3 convolution, e.g. ``dict(type='LESA', groups=8,
            pe_type='classification')``; the block adds ``in_channels``,
            ``out_channels`` (both the width), ``feat_size``, ``stride``,
            ``dcn``, ``norm_cfg``, and ``dilation`` when it is > 1. None
            keeps the ordinary 3x3 conv.
        feat_size (int | tuple[int, int], optional): The block's output
            size; a LESA layer is built for its input size, ``feat_size``
            times ``conv2_stride`` (it attends, then pools).
        dcn (dict, optional): Deformable-conv config of the 3x3 (and of a
            LESA layer's unary convolution), e.g. ``dict(type='DCN',
            deform_groups=1, fallback_on_stride=False)``;
            ``fallback_on_stride=True`` keeps a strided ordinary 3x3 a plain
            convolution (a LESA layer's unary conv never strides).
        **kwargs: The other arguments of MMDetection's ``Bottleneck``
            (``stride``, ``dilation``, ``downsample``, ``style``,
            ``with_cp``, ``conv_cfg``, ``norm_cfg``, ``plugins``,
            ``init_cfg``).
    """

    expansion = 4

    def __init__(self,
                 inplanes,
                 planes,
                 width=None,
                 groups=1,
                 lesa=None,
                 feat_size=None,
                 dcn=None,
                 **kwargs):
        super().__init__(inplanes, planes, **kwargs)
        width = planes if width is None else width
        dcn, fallback_on_stride = split_dcn_cfg(dcn)
        self.with_lesa = lesa is not None
        if fallback_on_stride and self.conv2_stride > 1 and not self.with_lesa:
            dcn = None
        self.dcn, self.with_dcn = dcn, dcn is not None
        if width != planes:
            self._widen(width)
        if self.with_lesa:
            extra = dict(dilation=self.dilation) if self.dilation > 1 else {}
            self.conv2 = MODELS.build(dict(
                lesa, in_channels=width, out_channels=width,
                feat_size=tuple(s * self.conv2_stride
                                for s in to_2tuple(feat_size)),
                stride=self.conv2_stride, dcn=dcn, norm_cfg=self.norm_cfg,
                **extra))
            self.add_module(self.norm2_name, nn.Identity())
        elif width != planes or groups != 1 or dcn is not None:
            self.conv2 = build_conv_layer(
                dcn or self.conv_cfg, width, width, 3,
                stride=self.conv2_stride, padding=self.dilation,
                dilation=self.dilation, groups=groups, bias=False)

    def _widen(self, width):
        """The layers around the 3x3 at the bottleneck width, as
        MMDetection's ResNeXt bottleneck rebuilds them."""
        self.conv1 = build_conv_layer(self.conv_cfg, self.inplanes, width, 1,
                                      stride=self.conv1_stride, bias=False)
        for name in (self.norm1_name, self.norm2_name):
            self.add_module(name, build_norm_layer(self.norm_cfg, width)[1])
        self.conv3 = build_conv_layer(self.conv_cfg, width,
                                      self.planes * self.expansion, 1,
                                      bias=False)
        if self.with_plugins:
            for name in (self.after_conv1_plugin_names +
                         self.after_conv2_plugin_names +
                         self.after_conv3_plugin_names):
                del self._modules[name]
            self.after_conv1_plugin_names = self.make_block_plugins(
                width, self.after_conv1_plugins)
            self.after_conv2_plugin_names = self.make_block_plugins(
                width, self.after_conv2_plugins)
            self.after_conv3_plugin_names = self.make_block_plugins(
                self.planes * self.expansion, self.after_conv3_plugins)


@MODELS.register_module(force=True)  # in place of its first-use builder
class LESAResNet(ResNet):
    """ResNet / ResNet-D / Wide-ResNet with LESA layers (arXiv:2107.05637).

    MMDetection's ``ResNet`` whose stages are built of
    :class:`LESABottleneck`: the stem, the downsampling, stage freezing,
    ``norm_eval``, dilation, ``style`` and plugins are the stock ones. With
    ``stage_with_lesa`` all False it is MMDetection's ``ResNet`` (with
    ``deep_stem=True, avg_down=True``: its ``ResNetV1d``), key for key and
    output for output. :class:`LESAResNeXt` adds grouped bottlenecks.

    Defaults build the ImageNet LESA-ResNet-50 (output stride 16). The
    detection backbone uses ``strides=(1, 2, 2, 2)``,
    ``pe_type='detection_qr'`` and the size of its input, e.g.
    ``input_size=1024``. A LESA layer in a dilated stage (``dilations``)
    dilates its unary 3x3 convolution as the stage dilates its ordinary
    ones; its binary term is global and needs no dilation.

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
        depth (int): 50, 101 or 152. Defaults to 50.
        stem_channels (int): Stem output channels. Defaults to 64.
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
            ``groups`` (``lesa_groups``), ``pe_type``, ``with_cp``,
            ``attn_impl`` and those :class:`LESABottleneck` adds; a
            downstream project swaps in its own layer by registering it and
            naming its ``type``. Defaults to ``dict(type='LESA')``.
        out_indices (int | Sequence[int]): Stages whose outputs are
            returned. Defaults to ``(3, )``.
        norm_eval (bool): Keep the norms in eval mode while training.
            Defaults to False.
        with_cp (bool): Gradient-checkpoint the unary and binary terms of
            every LESA layer (ordinary blocks are not checkpointed).
            Defaults to False.
        zero_init_residual (bool): Zero-init the last norm of each block
            (without a pretrained checkpoint). The authors' detection
            backbone does, and the detection configs set it; their ImageNet
            models do not. Defaults to False.
        init_cfg (dict | list[dict], optional): Init config, e.g.
            ``dict(type='Pretrained', checkpoint=...)``, applied after the
            spec's initialisation.
        **kwargs: The other arguments of MMDetection's ``ResNet``, with its
            defaults: ``in_channels``, ``base_channels``, ``num_stages``,
            ``dilations``, ``style``, ``deep_stem``, ``avg_down``,
            ``frozen_stages``, ``conv_cfg``, ``norm_cfg`` (every norm,
            LESA's included), ``dcn`` with ``stage_with_dcn`` (the 3x3
            convs and LESA unary convs of those stages), ``plugins``.
    """

    arch_settings = {50: (LESABottleneck, (3, 4, 6, 3)),
                     101: (LESABottleneck, (3, 4, 23, 3)),
                     152: (LESABottleneck, (3, 8, 36, 3))}

    def __init__(self,
                 depth=50,
                 stem_channels=64,
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
                 norm_eval=False,
                 with_cp=False,
                 zero_init_residual=False,
                 init_cfg=None,
                 **kwargs):
        stock = {name: p.default for name, p in
                 inspect.signature(ResNet).parameters.items()}
        args = checked_arguments(type(self).__name__,
                                 tuple(self.arch_settings), dict(
            stock, **kwargs, depth=depth, stem_channels=stem_channels,
            width_per_group=width_per_group, strides=strides,
            feat_sizes=feat_sizes, input_size=input_size,
            stage_with_lesa=stage_with_lesa,
            stage_with_first_conv=stage_with_first_conv,
            lesa_groups=lesa_groups, lesa=lesa, out_indices=out_indices,
            norm_eval=norm_eval, with_cp=with_cp,
            zero_init_residual=zero_init_residual))
        self.width_per_group = int(width_per_group)
        # what make_res_layer reads while ResNet builds the stages
        self._stage_lesa = [
            dict(lesa, groups=lesa_groups, pe_type=pe_type, with_cp=with_cp,
                 attn_impl=attn_impl) if with_lesa else None
            for with_lesa in stage_with_lesa]
        self._stage_first_conv = tuple(stage_with_first_conv)
        self._feat_sizes = args['feat_sizes']
        super().__init__(
            depth=depth, stem_channels=stem_channels,
            strides=args['strides'], out_indices=args['out_indices'],
            norm_eval=norm_eval, with_cp=with_cp,
            zero_init_residual=zero_init_residual, init_cfg=init_cfg,
            **kwargs)
        if init_cfg is None and args['pretrained'] is None:
            # the spec's initialisation (init_weights), not ResNet's list
            self.init_cfg = None
        # adapt whatever checkpoint is loaded, by whichever route
        self._register_load_state_dict_pre_hook(self._adapt_on_load)

    def make_res_layer(self, block, planes, num_blocks, with_cp, **kwargs):
        """One stage: MMDetection's ``ResLayer`` of :class:`LESABottleneck`
        at the stage's bottleneck width, the attention layer in each block
        of a LESA stage but, with ``stage_with_first_conv``, the first."""
        stage = len(self.res_layers)  # ResNet builds the stages in order
        width, groups = self.block_width(planes)
        lesa = self._stage_lesa[stage]
        block_lesa = iter(
            None if lesa is None or (b == 0 and self._stage_first_conv[stage])
            else lesa for b in range(num_blocks))

        def build_block(**block_args):  # ResLayer builds them in order
            return block(width=width, groups=groups, lesa=next(block_lesa),
                         feat_size=self._feat_sizes[stage], **block_args)

        build_block.expansion = block.expansion
        layer = ResLayer(build_block, planes=planes, num_blocks=num_blocks,
                         **kwargs)
        layer.block = block
        return layer

    def get_layer_depth(self, param_name, prefix=''):
        """The layer id of a parameter and the number of layer ids, for
        MMPretrain's layer-wise learning-rate decay
        (``LearningRateDecayOptimWrapperConstructor``): MMPretrain's
        ``ResNet`` rule on this backbone's :attr:`stage_blocks` (every
        parameter of a block, its LESA layer's included, has the block's
        depth)."""
        from mmpretrain.models.backbones import ResNet as MMPretrainResNet
        return MMPretrainResNet.get_layer_depth(self, param_name, prefix)

    def block_width(self, planes):
        """Width and groups of the 3x3 conv of a stage's bottlenecks."""
        return planes * self.width_per_group // 64, 1

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

    def train(self, mode=True):
        super().train(mode)  # MMDetection's ResNet.train returns None
        return self


@MODELS.register_module(force=True)
class LESAResNeXt(LESAResNet, ResNeXt):
    """ResNeXt with LESA layers: :class:`LESAResNet` whose ordinary 3x3
    convolutions are grouped, an MMDetection ``ResNeXt`` (which it equals,
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
        super().__init__(groups=positive_int(owner, 'groups', groups),
                         base_width=positive_int(owner, 'base_width',
                                                 base_width), **kwargs)

    def block_width(self, planes):
        if self.groups == 1:
            return planes, 1
        width = math.floor(planes * self.base_width / self.base_channels)
        return width * self.groups, self.groups
