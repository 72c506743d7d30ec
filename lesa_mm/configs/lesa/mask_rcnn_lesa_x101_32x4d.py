# Pure-Python config entry to configs/lesa/mask-rcnn_lesa-x101-32x4d.py (same settings).
globals().update(
    __import__('lesa_mm.configs.loader',
               fromlist=['load']).load('lesa/mask-rcnn_lesa-x101-32x4d.py'))
