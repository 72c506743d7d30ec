"""Optional TensorBoard logging and end-of-training curves.

Both classes live in MMEngine's root registries, so configs of every
downstream scope (mmdet, mmpretrain) find them by name once ``lesa_mm`` is
imported (``custom_imports=dict(imports=['lesa_mm'])``)::

    visualizer = dict(vis_backends=[
        dict(type='LocalVisBackend'),
        dict(type='OptionalTensorboardVisBackend')])
    custom_hooks = [dict(type='PlotCurvesHook')]
"""
import importlib.util
import logging
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS, VISBACKENDS
from mmengine.visualization import TensorboardVisBackend
from mmengine.visualization.vis_backend import force_init_env


def tensorboard_available():
    """Whether ``torch.utils.tensorboard`` can write events (it needs the
    ``tensorboard`` package)."""
    return importlib.util.find_spec('tensorboard') is not None


@VISBACKENDS.register_module()
class OptionalTensorboardVisBackend(TensorboardVisBackend):
    """MMEngine's TensorBoard backend where ``tensorboard`` is installed;
    otherwise it writes nothing, after one logged warning.

    Like :class:`~mmengine.visualization.TensorboardVisBackend` it writes to
    ``save_dir`` (``WORK_DIR/<timestamp>/vis_data`` in a Runner) and a
    Visualizer without a ``save_dir`` (e.g. an inferencer's) leaves it out.

    Args:
        save_dir (str): Directory of the event files.
    """

    def _init_env(self):
        if not tensorboard_available():
            self._disable('the `tensorboard` package is not installed')
            return
        try:
            super()._init_env()
        except ImportError as err:  # e.g. a broken tensorboard install
            self._disable(f'TensorBoard is not usable ({err})')

    def _disable(self, reason):
        self._tensorboard = None
        print_log(
            f'{reason}: {type(self).__name__} writes nothing; '
            'scalars are still logged by the other backends '
            '(`pip install tensorboard` to get event files)',
            logger='current', level=logging.WARNING)

    @property  # type: ignore
    @force_init_env
    def experiment(self):
        """The ``SummaryWriter``, or None without tensorboard."""
        return self._tensorboard

    @property
    def enabled(self):
        """Whether events are written (initialises the backend)."""
        return self.experiment is not None

    @force_init_env
    def add_config(self, config, **kwargs):
        if self._tensorboard is not None:
            super().add_config(config, **kwargs)

    @force_init_env
    def add_image(self, name, image, step=0, **kwargs):
        if self._tensorboard is not None:
            super().add_image(name, image, step, **kwargs)

    @force_init_env
    def add_scalar(self, name, value, step=0, **kwargs):
        if self._tensorboard is not None:
            super().add_scalar(name, value, step, **kwargs)

    @force_init_env
    def add_scalars(self, scalar_dict, step=0, file_path=None, **kwargs):
        if self._tensorboard is not None:
            super().add_scalars(scalar_dict, step, file_path, **kwargs)

    def close(self):
        if getattr(self, '_tensorboard', None) is not None:
            self._tensorboard.close()


@HOOKS.register_module()
class PlotCurvesHook(Hook):
    """Write ``WORK_DIR/curves.png`` (losses and validation metrics, see
    ``tools/analysis_tools/plot_curves.py``) at the end of a training run.

    Only after training (not after a stand-alone test or validation), on the
    main process; a failure to plot is logged, never raised.

    Args:
        out_file (str): File name, relative to the work dir.
            Defaults to ``'curves.png'``.
        keys (Sequence[str], optional): Entries to plot (default: the losses
            and main validation metrics).
    """

    priority = 'VERY_LOW'

    def __init__(self, out_file='curves.png', keys=None):
        self.out_file = out_file
        self.keys = keys
        self._trained = False

    def before_train(self, runner):
        self._trained = True

    def after_run(self, runner):
        if not self._trained or not is_main_process():
            return
        from .curves import plot_curves
        out_file = osp.join(runner.work_dir, self.out_file)
        try:
            plot_curves(runner.work_dir, out_file, keys=self.keys)
        except Exception as err:  # plotting must never fail a training run
            runner.logger.warning(f'PlotCurvesHook: no curves written '
                                  f'({type(err).__name__}: {err})')
            return
        runner.logger.info(f'training curves written to {out_file}')
