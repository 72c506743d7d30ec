"""LESA's unary (local) term: ``u = BN_x(Conv1x1(GroupConv3x3(x)))``
(``docs/lesa.md``, section 2)."""
import torch.nn as nn
# importing mmcv.ops registers the deformable convs ('DCN', 'DCNv2') that
# `dcn` configs name
import mmcv.ops  # noqa: F401
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.model.weight_init import constant_init

from ..utils import init_convs_and_norms, split_dcn_cfg


class LESAUnary(nn.Module):
    """Local (unary) term: ``BN_x(Conv1x1(GroupConv3x3(x)))``.

    Args:
        in_channels (int): Input channels.
        channels (int): Output channels ``C``.
        groups (int): Groups of the 3x3 convolution. The 1x1 convolution that
            mixes the groups exists only when ``groups != 1``.
        dcn (dict, optional): mmcv config of a deformable convolution used as
            the 3x3 convolution, e.g. ``dict(type='DCN', deform_groups=1)``.
        norm_cfg (dict): Config of the BatchNorm.
        dilation (int): Dilation of the 3x3 convolution (padded by as much,
            so the map keeps its size). Defaults to 1.
    """

    def __init__(self, in_channels, channels, groups, dcn=None,
                 norm_cfg=dict(type='BN'), dilation=1):
        super().__init__()
        # LESA's unary conv never strides: fallback_on_stride has no use
        conv_cfg, _ = split_dcn_cfg(dcn)
        self.conv = build_conv_layer(
            conv_cfg, in_channels, channels, kernel_size=3, padding=dilation,
            dilation=dilation, groups=groups, bias=False)
        self.pointwise = (nn.Conv2d(channels, channels, 1, bias=False)
                    if groups != 1 else None)
        self.norm = build_norm_layer(norm_cfg, channels)[1]
        init_convs_and_norms(self)
        offset = getattr(self.conv, 'conv_offset', None)
        if offset is not None:  # a deformable conv starts undeformed
            constant_init(offset, 0)

    def forward(self, x):
        x = self.conv(x)
        if self.pointwise is not None:
            x = self.pointwise(x)
        return self.norm(x)
