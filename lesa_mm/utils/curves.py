"""Training curves from MMEngine's ``scalars.json`` logs.

MMEngine's ``LocalVisBackend`` writes ``WORK_DIR/<timestamp>/vis_data/
scalars.json``, one JSON object per line: training lines carry ``loss``,
``lr``, ... and the iteration as ``step``; validation lines carry the
metrics (``coco/bbox_mAP``, ``accuracy/top1``, ...). By default LoggerHook
logs validation metrics by *epoch* (``step: 0`` throughout an iteration-based
run), so a validation line is placed at the last training step logged before
it whenever its own step is smaller.

Every ``train.py`` run (a resumed one included) makes a new ``<timestamp>``
directory. :func:`load_curves` merges them in time order: a later run
replaces the records of earlier runs from its first logged training step on,
which gives the full history of a resumed run and only the newest history of
a run restarted from scratch.

Used by ``tools/analysis_tools/plot_curves.py`` and
:class:`lesa_mm.utils.vis_backends.PlotCurvesHook`.
"""
import glob
import json
import os
import os.path as osp
import warnings

#: Validation metrics plotted by default, when the logs have them.
DEFAULT_METRICS = ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50',
                   'accuracy/top1', 'accuracy/top5')
#: Bookkeeping entries that are never metrics.
_NOT_METRICS = {'step', 'iter', 'epoch', 'time', 'data_time', 'memory'}


def find_scalar_files(work_dir):
    """The ``scalars.json`` files of ``work_dir``, oldest run first.

    ``work_dir`` may be a training work dir (``<timestamp>/vis_data/
    scalars.json`` below it), one run's directory, or a ``scalars.json``.
    """
    if osp.isfile(work_dir):
        return [work_dir]
    found = glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
    own = osp.join(work_dir, 'vis_data', 'scalars.json')
    if osp.isfile(own):
        found.append(own)
    # MMEngine names runs by their start time (YYYYMMDD_HHMMSS): the name
    # orders them; the modification time breaks ties of odd names
    return sorted(found, key=lambda p: (osp.basename(osp.dirname(
        osp.dirname(p))), osp.getmtime(p)))


def _is_train_record(record):
    return 'lr' in record or any(k.startswith('loss') for k in record)


def read_scalars(path):
    """``(train, val)`` records of one ``scalars.json``.

    Each record is a dict of its numbers plus ``x``: the training step it
    belongs to. Unreadable lines (e.g. the last line of a killed run) are
    skipped with a warning.
    """
    train, val = [], []
    last_step = None
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f'{path}:{number}: skipping a line that is not '
                              'JSON')
                continue
            if not isinstance(record, dict) or 'step' not in record:
                continue
            step = record['step']
            if _is_train_record(record):
                last_step = step
                train.append(dict(record, x=step))
            else:
                x = step if last_step is None or step >= last_step \
                    else last_step
                val.append(dict(record, x=x))
    return train, val


def load_curves(work_dir, runs='all'):
    """Training and validation records of a work dir.

    Args:
        work_dir (str): See :func:`find_scalar_files`.
        runs (str): ``'all'`` merges the runs in time order (resumed runs),
            ``'latest'`` keeps the newest run with records.

    Returns:
        tuple[list[dict], list[dict], list[str]]: train records, validation
        records (both sorted by ``x``) and the files they came from.

    Raises:
        FileNotFoundError: if there are no records.
    """
    if runs not in ('all', 'latest'):
        raise ValueError(f"runs must be 'all' or 'latest', got {runs!r}")
    parsed = [(p, ) + read_scalars(p) for p in find_scalar_files(work_dir)]
    parsed = [item for item in parsed if item[1] or item[2]]
    if not parsed:
        expected = osp.join(work_dir, '<timestamp>', 'vis_data',
                            'scalars.json')
        raise FileNotFoundError(
            f'no scalars found under {work_dir!r}: expected MMEngine logs '
            f'in {expected} (written by LocalVisBackend during training)')
    if any(item[1] for item in parsed):
        # runs without training lines (a stand-alone validation) have no
        # place on the training axis
        parsed = [item for item in parsed if item[1]]
    if runs == 'latest':
        parsed = parsed[-1:]
    train, val, used = [], [], []
    for path, run_train, run_val in parsed:
        if run_train:
            cut = min(r['x'] for r in run_train)
            train = [r for r in train if r['x'] < cut]
            val = [r for r in val if r['x'] < cut]
        train += run_train
        val += run_val
        used.append(path)
    train.sort(key=lambda r: r['x'])
    val.sort(key=lambda r: r['x'])
    return train, val, used


def _keys(records):
    keys = []
    for record in records:
        for key, value in record.items():
            if key not in keys and key != 'x' and key not in _NOT_METRICS \
                    and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                keys.append(key)
    return keys


def plot_curves(work_dir, out_file=None, keys=None, runs='all', dpi=100,
                title=None):
    """Plot the loss curve(s) and validation metric(s) of a work dir.

    One panel holds the training losses (``loss`` bold, its terms thin),
    one panel each other requested training value (``lr``, ...), and one the
    validation metrics.

    Args:
        work_dir (str): Work dir (see :func:`find_scalar_files`).
        out_file (str, optional): PNG to write. Defaults to
            ``work_dir/curves.png``.
        keys (Sequence[str], optional): Entries to plot. Defaults to every
            ``loss*`` entry and the main validation metrics present
            (:data:`DEFAULT_METRICS`, else every validation entry).
        runs (str): ``'all'`` or ``'latest'``, see :func:`load_curves`.
        dpi (int): Resolution of the PNG.
        title (str, optional): Figure title. Defaults to the work dir.

    Returns:
        str: The PNG written.
    """
    train, val, used = load_curves(work_dir, runs)
    train_keys, val_keys = _keys(train), _keys(val)
    if keys:
        unknown = [k for k in keys if k not in train_keys + val_keys]
        if unknown:
            raise KeyError(
                f'{unknown} not in the logs of {work_dir!r}; training '
                f'entries: {train_keys}, validation entries: {val_keys}')
        train_keys = [k for k in keys if k in train_keys]
        val_keys = [k for k in keys if k in val_keys and k not in train_keys]
    else:
        train_keys = [k for k in train_keys if k.startswith('loss')]
        main = [k for k in DEFAULT_METRICS if k in val_keys]
        val_keys = main or val_keys

    loss_keys = [k for k in train_keys if k.startswith('loss')]
    panels = []
    if loss_keys:
        panels.append(('training loss', train, loss_keys))
    panels += [(k, train, [k]) for k in train_keys if k not in loss_keys]
    if val_keys:
        panels.append(('validation', val, val_keys))
    if not panels:
        raise ValueError(f'nothing to plot in {used}: no loss or metric '
                         'entries')

    # a Figure on the Agg canvas: no pyplot, no global backend state
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(panels), 4), dpi=dpi,
                 layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, records, panel_keys) in zip(axes[0], panels):
        for key in panel_keys:
            points = [(r['x'], r[key]) for r in records if key in r]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            if records is val:
                ax.plot(xs, ys, 'o-', label=key, markersize=5)
                ax.annotate(f'{ys[-1]:.3g}', (xs[-1], ys[-1]),
                            textcoords='offset points', xytext=(-4, 5),
                            ha='right', fontsize=8)
            elif key == 'loss' or len(panel_keys) == 1:
                ax.plot(xs, ys, '-', label=key, linewidth=2)
            else:
                ax.plot(xs, ys, '-', label=key, linewidth=1, alpha=0.7)
        ax.set_title(name)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
        if name == 'lr':
            ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 2))
        if len(panel_keys) > 1 or records is val:
            ax.legend(fontsize=8)
    if train and val_keys and len(panels) > 1:
        # metrics on the training axis (one validation point is a dot at the
        # iteration it was computed)
        axes[0][-1].set_xlim(axes[0][0].get_xlim())
    if not val_keys and not keys:
        axes[0][-1].text(0.98, 0.98, 'no validation metrics logged',
                         transform=axes[0][-1].transAxes, ha='right',
                         va='top', fontsize=8, color='gray')
    runs_note = f'{len(used)} runs' if len(used) > 1 else osp.basename(
        osp.dirname(osp.dirname(osp.abspath(used[0]))))
    fig.suptitle(f'{title or osp.abspath(work_dir)}  ({runs_note})',
                 fontsize=10)
    if out_file is None:
        base = work_dir if osp.isdir(work_dir) else osp.dirname(work_dir)
        out_file = osp.join(base, 'curves.png')
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    fig.savefig(out_file, dpi=dpi)
    return out_file
