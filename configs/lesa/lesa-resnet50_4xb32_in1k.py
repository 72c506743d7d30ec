# LESA-ResNet-50 on ImageNet-1k, the reference recipe (arXiv:2107.05637):
# 4 GPUs x 32 images, SGD + Nesterov, 95 epochs (5 linear warm-up, then
# cosine annealing per iteration).
_base_ = [
    'mmpretrain::_base_/models/resnet50.py',
    'mmpretrain::_base_/datasets/imagenet_bs32.py',
    'mmpretrain::_base_/default_runtime.py',
]

custom_imports = dict(imports=['lesa_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='LESAResNet',
        depth=50,
        strides=(1, 2, 2, 1),  # output stride 16: 14x14 at 224
        feat_sizes=(56, 28, 14, 14),
        stage_with_lesa=(False, False, True, True),
        stage_with_first_conv=(True, True, True, False),
        pe_type='classification',
        lesa_groups=8,
        out_indices=(3, )),
    head=dict(in_channels=2048))

# The authors resize with torchvision on PIL images: resize with Pillow
# (MMPretrain's default, cv2, interpolates differently).
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224, backend='pillow'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=256, edge='short', backend='pillow'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# stop at the first non-finite loss ("loss become infinite or NaN!"):
# MMDetection's hook, from this MMPretrain config by its scope
custom_hooks = [dict(type='mmdet.CheckInvalidLossHook', interval=1)]

optim_wrapper = dict(
    optimizer=dict(
        type='SGD', lr=0.05, momentum=0.9, nesterov=True,
        weight_decay=8e-5))

# MMEngine's LinearLR cannot start at exactly 0 (its chained update divides
# by the start factor); 1e-6 of the base lr is the reference's "from 0".
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=True, begin=0, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=90, eta_min=0, by_epoch=True,
         begin=5, end=95, convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=95, val_interval=1)
val_cfg = dict()
test_cfg = dict()

# keep the latest epoch (to resume) and the best validation top-1, as the
# authors keep their last and best checkpoints
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=1,
                    save_last=True, save_best='accuracy/top1',
                    rule='greater'))

# the recipe's total batch: 4 GPUs x 32 images
auto_scale_lr = dict(base_batch_size=128)
