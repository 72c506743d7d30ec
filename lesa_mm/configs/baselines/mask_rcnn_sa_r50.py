# Pure-Python config entry to configs/baselines/mask-rcnn_sa-r50.py (same settings).
globals().update(
    __import__('lesa_mm.configs.loader',
               fromlist=['load']).load('baselines/mask-rcnn_sa-r50.py'))
