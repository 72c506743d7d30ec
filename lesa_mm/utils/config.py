"""Building models from OpenMMLab configs outside a Runner."""
import copy
import os.path as osp
import sys

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from mmengine.utils import import_modules_from_strings


#: The task family of each OpenMMLab scope whose configs lesa_mm serves.
SCOPE_TASKS = {'mmdet': 'detection', 'mmpretrain': 'classification'}


def default_scope(cfg):
    """The registry scope ``cfg`` builds in: its ``default_scope``, else
    MMEngine's root (``'mmengine'``, where lesa_mm registers its modules)."""
    return cfg.get('default_scope', 'mmengine')


def config_task(cfg):
    """``'detection'`` (an ``mmdet`` config), ``'classification'`` (an
    ``mmpretrain`` config) or None (another scope)."""
    return SCOPE_TASKS.get(default_scope(cfg))


def model_task(model):
    """``'detection'`` for an MMDetection detector, ``'classification'`` for
    an MMPretrain classifier, None for anything else (a backbone, a
    layer)."""
    from mmdet.models.detectors import BaseDetector
    if isinstance(model, BaseDetector):
        return 'detection'
    from mmpretrain.models.classifiers import BaseClassifier
    if isinstance(model, BaseClassifier):
        return 'classification'
    return None


def register_config_package():
    """Let MMEngine resolve ``'lesa_mm::lesa/mask-rcnn_lesa-r50.py'``
    (``_base_``, ``Config.fromfile``, ``mmengine.hub.get_config``).

    MMEngine 0.10 accepts only the packages of its ``MODULE2PACKAGE`` table
    as a ``package::`` scope, then reads the package's ``.mim/configs``. The
    table is fixed in MMEngine and filled here, so the scope works in
    configs parsed after ``import lesa_mm`` (this package's tools, a script
    that imports it); MMDetection's and MMPretrain's ``tools/train.py``
    parse the config before its ``custom_imports``, where only a path
    works.
    """
    from mmengine.config import utils
    utils.MODULE2PACKAGE.setdefault('lesa_mm', 'lesa_mm')


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
    init_default_scope(default_scope(cfg))
    return MODELS.build(cfg.model)


def load_model(config, checkpoint, device='cpu'):
    """``(cfg, model)``: the model of ``config`` (a file or a loaded
    ``Config``) with the checkpoint's weights, in eval mode."""
    from mmengine.runner import load_checkpoint
    files = [('checkpoint', checkpoint)]
    if not isinstance(config, Config):
        files.insert(0, ('config', config))
    for kind, path in files:
        if not osp.isfile(path):
            raise FileNotFoundError(f'{kind} file {path!r} not found')
    cfg = copy.deepcopy(config) if isinstance(config, Config) else \
        Config.fromfile(config)
    model = build_model_from_config(cfg)
    ckpt = load_checkpoint(model, checkpoint, map_location='cpu',
                           strict=False, logger='silent')
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else {}
    loaded = {k[len('module.'):] if k.startswith('module.') else k: v
              for k, v in state.items()}
    own = model.state_dict()
    if not loaded.keys() & own.keys():
        raise ValueError(f'checkpoint {checkpoint!r} has no weights of the '
                         f'model of {cfg.filename or "the config"!r}')
    wrong = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}'
             for k, v in loaded.items()
             if k in own and hasattr(v, 'shape') and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f'checkpoint {checkpoint!r} does not fit the model '
                         f'of {cfg.filename or "the config"!r}: '
                         f'{len(wrong)} weights of other shapes, e.g. '
                         f'{wrong[:3]}')
    missing = [k for k in own if k not in loaded]
    if missing:
        print(f'warning: {len(missing)} weights not in the checkpoint, e.g. '
              f'{missing[:3]}', file=sys.stderr)
    return cfg, model.to(device).eval()
