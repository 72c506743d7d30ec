# Pure-Python config entry to configs/lesa/htc_lesa-wrn50.py (same settings).
globals().update(
    __import__('lesa_mm.configs.loader',
               fromlist=['load']).load('lesa/htc_lesa-wrn50.py'))
