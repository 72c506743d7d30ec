# Mask R-CNN + FPN with a LESA-ResNeXt-101 (32x4d) backbone: the reference
# COCO recipe of LESA (mask-rcnn_lesa-r50.py: MMDetection's Mask R-CNN, COCO
# and 20-epoch bases, the shared LESA detection backbone of
# _base_/lesa-detection-backbone.py, 1024x1024 inputs, 8 GPUs x 1 image) on
# the ResNeXt-101 32x4d of MMDetection's X-101 configs, LESA in stages 3-4.
# No published results: the authors' detectors are LESA-ResNet-50 and
# LESA-WRN-50 ones.
#
#   tools/dist_train.sh configs/lesa/mask-rcnn_lesa-x101-32x4d.py 8
#
# The backbone starts, as the reference recipes do, from an ImageNet model
# of the same network with 'detection_qr' positions (its position tables
# re-initialised, docs/lesa.md section 9), e.g. trained with
#   tools/dist_train.sh configs/lesa/lesa-resnext50-32x4d_4xb32_in1k.py 4 \
#       --cfg-options model.backbone.depth=101 \
#       model.backbone.pe_type=detection_qr
# and copied to checkpoints/lesa-resnext101-32x4d-qr_in1k.pth. MMDetection's
# ImageNet ResNeXt-101 initialises the non-LESA layers instead, through
# MMEngine's 'Pretrained' (the LESA layers keep their initialisation; the
# load logs their keys as missing, where 'LESATransfer' refuses them):
#   --cfg-options model.backbone.init_cfg.type=Pretrained \
#       model.backbone.init_cfg.checkpoint=open-mmlab://resnext101_32x4d
_base_ = ['./mask-rcnn_lesa-r50.py']

imagenet_checkpoint = 'checkpoints/lesa-resnext101-32x4d-qr_in1k.pth'

model = dict(
    backbone=dict(
        type='LESAResNeXt',
        depth=101,
        groups=32,
        base_width=4,
        init_cfg=dict(type='LESATransfer', checkpoint=imagenet_checkpoint)))
