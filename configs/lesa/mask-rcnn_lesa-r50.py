# Mask R-CNN + FPN with a LESA-ResNet-50 backbone: the reference COCO recipe
# of LESA (arXiv:2107.05637). 1024x1024 fixed-size inputs, DCN in stages 2-4
# (LESA's unary conv included), gradient checkpointing of the LESA terms,
# 8 GPUs x 1 image, 20 epochs.
#
#   tools/dist_train.sh configs/lesa/mask-rcnn_lesa-r50.py 8
#
# The backbone starts, as the authors' does, from a LESA-ResNet-50 ImageNet
# checkpoint with 'detection_qr' positions (trained with
# configs/lesa/lesa-resnet50-qr_4xb32_in1k.py, or the authors' "ImageNet
# pretrained" weights converted with
# tools/model_converters/lesa_official_to_mm.py), through 'LESATransfer': as
# in the authors' recipe, its position tables, trained for other feature
# sizes, start afresh at the detector's ('Pretrained' would keep them). A
# classification checkpoint (lesa-resnet50_4xb32_in1k.py) is adapted instead
# (docs/lesa.md, section 9). Point elsewhere with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_20e.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/lesa-detection-backbone.py',
]

custom_imports = dict(imports=['lesa_mm'], allow_failed_imports=False)

image_size = (1024, 1024)
imagenet_checkpoint = 'checkpoints/lesa-resnet50-qr_in1k.pth'

model = dict(
    backbone=dict(
        _base_.lesa_backbone,  # LESA-ResNet-50, sized for 1024x1024
        _delete_=True,
        init_cfg=dict(type='LESATransfer', checkpoint=imagenet_checkpoint)))

backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_size, keep_ratio=False),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=image_size, keep_ratio=False),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor')),
]
train_dataloader = dict(
    batch_size=1, num_workers=2, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# stop at the first non-finite loss ("loss become infinite or NaN!")
custom_hooks = [dict(type='CheckInvalidLossHook', interval=1)]

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4))

# 20 epochs, lr x0.1 after epochs 16 and 19, 500 iterations of linear
# warm-up: the schedule of mmdet::_base_/schedules/schedule_20e.py

# 8 GPUs x 1 image
auto_scale_lr = dict(enable=False, base_batch_size=8)
