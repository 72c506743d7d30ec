"""lesa_mm: LESA (Locally Enhanced Self-Attention) for MMDetection 3.x and
MMPretrain 1.x. Importing the package registers the LESA layer and the
LESA-ResNet backbones (``custom_imports=dict(imports=['lesa_mm'])``)."""
__version__ = '0.1.0'

from .version import check_versions  # noqa: E402

# fail here, naming the installed version and the supported range, rather
# than somewhere inside mmcv, mmdet or mmpretrain
check_versions()

from . import datasets, models  # noqa: F401,E402  (registers everything)
from .utils.config import register_config_package  # noqa: E402
from .utils.safe_load import allow_mmengine_checkpoints  # noqa: E402

# MMEngine training checkpoints load with torch's weights_only=True default
allow_mmengine_checkpoints()
# `_base_ = 'lesa_mm::lesa/...'` in configs parsed after this import
register_config_package()
