# Mask R-CNN LESA-R50 with MMDetection's usual keep-ratio pipeline (1333x800)
# and 2 images per GPU, which the fused LESA attention makes affordable: it
# never materialises an L x L attention tensor, and 'detection_qr' positions
# serve any map size (the centre of the tables for shorter sides).
#
# Differences from the reference recipe (mask-rcnn_lesa-r50.py):
# - images resized to fit 1333x800 keeping their aspect ratio (not 1024x1024);
# - position tables sized for the longest padded side (1344), i.e. feature
#   sizes (336, 168, 84, 42);
# - 8 GPUs x 2 images, lr 0.02 (linear scaling of the reference 0.01 at 8).
#
#   tools/dist_train.sh configs/lesa/mask-rcnn_lesa-r50_keep-ratio.py 8
_base_ = ['./mask-rcnn_lesa-r50.py']

model = dict(backbone=dict(feat_sizes=(336, 168, 84, 42)))

backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor')),
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=0.02))
auto_scale_lr = dict(enable=False, base_batch_size=16)
