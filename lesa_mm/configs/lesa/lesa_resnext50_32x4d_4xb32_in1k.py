# Pure-Python config entry to configs/lesa/lesa-resnext50-32x4d_4xb32_in1k.py (same settings).
globals().update(
    __import__('lesa_mm.configs.loader',
               fromlist=['load']).load('lesa/lesa-resnext50-32x4d_4xb32_in1k.py'))
