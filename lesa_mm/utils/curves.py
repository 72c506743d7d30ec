"""Training curves from what MMEngine records, drawn like MMDetection's
``analyze_logs.py plot_curve``.

MMEngine's ``LocalVisBackend`` writes ``WORK_DIR/<timestamp>/vis_data/
scalars.json`` for each run, one JSON object a line: training lines carry the
losses, ``lr``, ... and the iteration as ``step``; validation lines carry the
metrics (``coco/bbox_mAP``, ``accuracy/top1``, ...). :class:`PlotCurvesHook`
draws ``WORK_DIR/curves.png`` after training, ``tools/analysis_tools/
plot_curves.py WORK_DIR`` redraws it.
"""
import glob
import json
import os.path as osp

from mmengine.dist import master_only
from mmengine.hooks import Hook

from lesa_mm.registry import HOOKS

#: Validation metrics plotted by default, when logged.
METRICS = ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50',
           'accuracy/top1', 'accuracy/top5')
_NOT_PLOTTED = {'step', 'iter', 'epoch', 'time', 'data_time', 'memory'}


def load_scalars(work_dir, runs='all'):
    """``(train, val)``: the records of the runs in ``work_dir``.

    Runs are taken in time order (their ``<timestamp>`` names); a later run,
    resumed or restarted, replaces the records from its first training step
    on. ``runs='latest'`` keeps the newest run only. Runs without training
    lines (a stand-alone test) are left out when others have them.
    LoggerHook logs validation by epoch (``step`` 0 in an iteration-based
    run), so a validation record's ``step`` becomes the training step logged
    before it when that is larger.
    """
    parsed = []
    pattern = osp.join(work_dir, '*', 'vis_data', 'scalars.json')
    for path in sorted(glob.glob(pattern)):
        train, val, last = [], [], 0
        with open(path, encoding='utf-8') as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # e.g. the cut last line of a killed run
                    continue
                if 'lr' in record or any(k.startswith('loss') for k in record):
                    last = record['step']
                    train.append(record)
                else:
                    val.append(dict(record, step=max(record['step'], last)))
        parsed.append((train, val))
    parsed = [r for r in parsed if r[0]] or [r for r in parsed if r[1]]
    if not parsed:
        raise FileNotFoundError(f'no scalars found in {pattern} (written by '
                                "MMEngine's LocalVisBackend)")
    train, val = [], []
    for run_train, run_val in parsed[-1:] if runs == 'latest' else parsed:
        start = run_train[0]['step'] if run_train else float('inf')
        train = [r for r in train if r['step'] < start] + run_train
        val = [r for r in val if r['step'] < start] + run_val
    return train, val


def _keys(records):
    return list(dict.fromkeys(
        k for r in records for k, v in r.items()
        if k not in _NOT_PLOTTED and isinstance(v, (int, float))))


def plot_curves(work_dir, out_file=None, keys=None, runs='all', dpi=100):
    """Plot the curves of ``work_dir`` against the training step.

    One panel holds the losses, one each other training entry asked for
    (``lr``, ...), one the validation metrics.

    Args:
        work_dir (str): Training work dir.
        out_file (str, optional): PNG to write; ``work_dir/curves.png`` by
            default.
        keys (Sequence[str], optional): Entries to plot; by default every
            ``loss*`` entry and the :data:`METRICS` logged (else every
            validation entry).
        runs (str): ``'all'`` or ``'latest'``, see :func:`load_scalars`.
        dpi (int): Resolution; a panel is 5.5 x 4 inches.

    Returns:
        tuple[str, dict]: the PNG written and the plotted series,
        ``{key: (steps, values)}``.
    """
    train, val = load_scalars(work_dir, runs)
    train_keys, val_keys = _keys(train), _keys(val)
    if keys:
        unknown = [k for k in keys if k not in train_keys + val_keys]
        if unknown:
            raise ValueError(f'{unknown} not logged in {work_dir}; training '
                             f'entries: {train_keys}, validation entries: '
                             f'{val_keys}')
        train_keys = [k for k in keys if k in train_keys]
        val_keys = [k for k in keys if k in val_keys and k not in train_keys]
    else:
        train_keys = [k for k in train_keys if k.startswith('loss')]
        val_keys = [k for k in METRICS if k in val_keys] or val_keys
    losses = [k for k in train_keys if k.startswith('loss')]
    panels = ([('training loss', train, losses)] if losses else []) + [
        (k, train, [k]) for k in train_keys if k not in losses
    ] + ([('validation', val, val_keys)] if val_keys else [])
    if not panels:
        raise ValueError(f'no losses or metrics logged in {work_dir}')

    # matplotlib only when drawing: importing lesa_mm does not import it
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.5 * len(panels), 4), layout='constrained')
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    series = {}
    for ax, (title, records, panel_keys) in zip(axes, panels):
        for key in panel_keys:
            xs, ys = zip(*[(r['step'], r[key]) for r in records if key in r])
            series[key] = (list(xs), list(ys))
            ax.plot(xs, ys, 'o-' if records is val else '-', label=key,
                    linewidth=2 if key == 'loss' else 1)
        ax.set(title=title, xlabel='iteration')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(osp.abspath(work_dir), fontsize=10)
    out_file = out_file or osp.join(work_dir, 'curves.png')
    fig.savefig(out_file, dpi=dpi)
    return out_file, series


@HOOKS.register_module()
class PlotCurvesHook(Hook):
    """Draw ``WORK_DIR/curves.png`` (:func:`plot_curves`) after training, on
    the main process; a failure to plot is logged, never raised.

    Args:
        out_file (str): File name in the work dir.
        keys (Sequence[str], optional): Entries to plot, see
            :func:`plot_curves`.
    """

    priority = 'VERY_LOW'

    def __init__(self, out_file='curves.png', keys=None):
        self.out_file, self.keys = out_file, keys

    @master_only
    def after_train(self, runner):
        try:
            out, _ = plot_curves(runner.work_dir,
                                 osp.join(runner.work_dir, self.out_file),
                                 keys=self.keys)
        except Exception as err:  # plotting must never fail a training run
            runner.logger.warning(f'PlotCurvesHook: no curves written '
                                  f'({type(err).__name__}: {err})')
        else:
            runner.logger.info(f'training curves written to {out}')
