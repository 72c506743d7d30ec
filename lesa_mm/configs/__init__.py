"""Pure-Python (``read_base``) entries to the shipped configs.

Downstream projects that use MMEngine's pure-Python config style import
them, e.g.::

    from mmengine.config import read_base

    with read_base():
        from lesa_mm.configs.lesa.mask_rcnn_lesa_r50 import *

    model.backbone.frozen_stages = 2

Each module loads the corresponding classic config (``configs/`` in the
repository, shipped as ``lesa_mm/.mim/configs``), so the two styles share
one definition of every recipe.
"""
