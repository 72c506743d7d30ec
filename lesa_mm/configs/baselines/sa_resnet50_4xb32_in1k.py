# Pure-Python config entry to configs/baselines/sa-resnet50_4xb32_in1k.py (same settings).
globals().update(
    __import__('lesa_mm.configs.loader',
               fromlist=['load']).load('baselines/sa-resnet50_4xb32_in1k.py'))
