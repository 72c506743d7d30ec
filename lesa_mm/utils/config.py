"""Building models from OpenMMLab configs outside a Runner."""
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from mmengine.utils import import_modules_from_strings


def build_model_from_config(cfg):
    """Build ``cfg.model`` the way MMEngine's Runner does: honour the
    config's ``custom_imports`` and ``default_scope``.

    Args:
        cfg (str | Config): A config file or a loaded config.
    """
    if not isinstance(cfg, Config):
        cfg = Config.fromfile(cfg)
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    return MODELS.build(cfg.model)
