"""Loading a shipped classic config as plain data for pure-Python configs.

MMEngine parses pure-Python configs lazily (imports become lazy objects), so
the entry modules call :func:`load` through ``__import__``. The classic
configs are the package's OpenMIM copy, ``lesa_mm/.mim/configs`` (a link to
the repository's ``configs/`` in an editable install, a copy in a wheel):
one shipped copy serves ``mim``, ``lesa_mm::`` configs and these entries.
"""
import os.path as osp

CLASSIC_ROOT = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                        '.mim', 'configs')


def config_path(name):
    """Absolute path of a shipped classic config, e.g.
    ``config_path('lesa/mask-rcnn_lesa-r50.py')``."""
    path = osp.join(CLASSIC_ROOT, name)
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'no shipped config {name!r} under {CLASSIC_ROOT} (an install '
            f'of lesa_mm creates it: pip install [-e] PATH_TO_LESA_MM)')
    return path


def load(name):
    """The settings of a shipped classic config as a plain dict (importing
    its ``custom_imports``, i.e. registering lesa_mm)."""
    from mmengine.config import Config
    return Config.fromfile(config_path(name)).to_dict()
