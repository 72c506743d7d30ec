from .config import build_model_from_config, load_model
from .official_checkpoint import (check_against_model, convert,
                                  extract_state_dict)

__all__ = [
    'convert', 'extract_state_dict', 'check_against_model',
    'build_model_from_config', 'load_model'
]
from .curves import PlotCurvesHook  # noqa: F401  (registers the hook)
from .transfer import LESATransferInit  # noqa: F401  (registers the init)
