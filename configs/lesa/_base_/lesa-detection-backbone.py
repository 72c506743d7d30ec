# The LESA detection backbone of the COCO recipes of LESA (arXiv:2107.05637),
# shared by configs/lesa/mask-rcnn_lesa-*.py and htc_lesa-wrn50.py: a
# LESA-ResNet-50 with LESA in stages 3-4 (the first block of stage 3 keeps
# its 3x3 conv), 'detection_qr' positions, output strides 4-32, DCN in
# stages 2-4 (LESA's unary conv included), gradient checkpointing of the
# LESA terms, frozen stem and stage 1, frozen norm statistics.
#
# A detection config lists this file among its bases and builds its backbone
# from the variable, overriding what differs (the feature sizes of its
# input, the width or type, the ImageNet checkpoint):
#
#   model = dict(backbone=dict(_base_.lesa_backbone, _delete_=True,
#                              feat_sizes=..., init_cfg=...))
#
# (a variable, not `model`: MMEngine refuses a key defined by two bases, and
# the mmdet:: model bases define `model`)
lesa_backbone = dict(
    type='LESAResNet',
    depth=50,
    strides=(1, 2, 2, 2),
    # stage output sizes at 1024x1024 (strides 4, 8, 16, 32)
    feat_sizes=(256, 128, 64, 32),
    stage_with_lesa=(False, False, True, True),
    stage_with_first_conv=(True, True, True, False),
    pe_type='detection_qr',
    lesa_groups=8,
    out_indices=(0, 1, 2, 3),
    frozen_stages=1,
    norm_cfg=dict(type='BN', requires_grad=True),
    norm_eval=True,
    dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
    stage_with_dcn=(False, True, True, True),
    with_cp=True,
    # each residual branch starts at zero (its last norm), as in the
    # authors' detection backbone and MMDetection's ResNet: from scratch
    # (init_cfg=None), norm_eval and frozen_stages would otherwise let the
    # activations blow up; a Pretrained checkpoint overwrites these
    zero_init_residual=True,
    # the detection configs name their ImageNet checkpoint
    init_cfg=None)
