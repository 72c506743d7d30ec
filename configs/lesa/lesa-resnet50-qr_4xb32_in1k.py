# LESA-ResNet-50 on ImageNet-1k with 'detection_qr' position encodings: the
# ImageNet model that pre-trains the detection backbone, as the authors do
# (arXiv:2107.05637). The recipe of lesa-resnet50_4xb32_in1k.py; only the
# position encodings differ. Its checkpoint initialises
# configs/lesa/mask-rcnn_lesa-r50.py (and the keep-ratio variant), which
# re-initialise the position tables (other feature sizes) and load every
# other tensor unchanged (docs/lesa.md, section 9):
#
#   tools/dist_train.sh configs/lesa/lesa-resnet50-qr_4xb32_in1k.py 4
#   cp work_dirs/lesa-resnet50-qr_4xb32_in1k/best_accuracy_top1_epoch_*.pth \
#       checkpoints/lesa-resnet50-qr_in1k.pth
_base_ = ['./lesa-resnet50_4xb32_in1k.py']

model = dict(backbone=dict(pe_type='detection_qr'))
