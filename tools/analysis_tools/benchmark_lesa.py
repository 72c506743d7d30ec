"""Benchmark LESA's fused attention kernel against the reference kernel.

Times and measures the peak memory of the binary term's two kernels,
``attn_impl='fused'`` (exact, no ``L x L`` tensor; on the CPU, maps whose
key blocks at least halve its head width, such as 64x64, run in key blocks)
and ``attn_impl='reference'`` (the spec's direct formulation), on

* ``layer``: one :class:`lesa_mm.models.LESA` layer (``detection_qr``
  position encoding, ``--channels`` in and out, ``--groups`` heads) on a
  ``--size H [W]`` feature map;
* ``backbone``: the LESA-ResNet-50 detection backbone
  (``strides=(1, 2, 2, 2)``, ``detection_qr``, all four outputs) on an
  ``--image-size H [W]`` image;

in ``eval`` mode (``model.eval()`` under ``torch.no_grad()``) and ``train``
mode (``model.train()``, forward + backward of the sum of the outputs'
means), on the CPU and, when available, on CUDA. Every comparison also
checks that both kernels, from the same weights and input, give the same
outputs (and, in train mode, input gradients): the ``rel err`` columns show
``||fused - reference|| / ||reference||``.

Time is the median (and the minimum) of the wall times of ``--repeats``
runs after ``--warmup`` runs; ``--rounds N`` measures each kernel N times,
alternating the kernels, which evens out a shared machine's changing load.
Memory:

* CPU: each cell runs in a fresh Python process, which builds the model and
  input, then records its resident set (and resets the kernel's high-water
  mark) before the first forward; the figure is the peak RSS of the warm-up
  and timed runs above that pre-run resident set
  (``getrusage(RUSAGE_SELF).ru_maxrss``).
* CUDA: ``torch.cuda.max_memory_allocated()`` after
  ``torch.cuda.reset_peak_memory_stats()``, above the allocation before the
  first forward (weights and input).

A cell that runs out of memory or fails prints ``OOM`` / ``failed: ...`` in
its row; the other cells still run.

Examples (the defaults reproduce the project targets)::

    # everything: layer eval at 64x64 (batch 1), layer train at 48x48
    # (batch 2), backbone at 256x256 (batch 1), CPU (+ CUDA if present)
    python tools/analysis_tools/benchmark_lesa.py

    # target 1: layer eval forward, 64x64 map, batch 1
    python tools/analysis_tools/benchmark_lesa.py --subject layer --mode eval

    # target 2: layer train forward + backward, 48x48 map, batch 2
    python tools/analysis_tools/benchmark_lesa.py --subject layer --mode train

    # the detection backbone at 512x512, fused kernel only
    python tools/analysis_tools/benchmark_lesa.py --subject backbone \\
        --image-size 512 --impl fused

    # the stage-3 map of a 1333x800 keep-ratio input (padded to 800x1344)
    python tools/analysis_tools/benchmark_lesa.py --subject layer --size 50 84

    # a custom layer
    python tools/analysis_tools/benchmark_lesa.py --subject layer --size 32 \\
        --batch 4 --channels 128 --groups 4 --repeats 10 --threads 2
"""
import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time

# the tool runs from a checkout as well as with lesa_mm installed
_REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

SUBJECTS = ('layer', 'backbone')
MODES = ('eval', 'train')
DEVICES = ('cpu', 'cuda')
IMPLS = ('fused', 'reference')

# defaults of the project targets: (size, batch) per subject and mode
LAYER_DEFAULTS = dict(eval=(64, 1), train=(48, 2))
BACKBONE_DEFAULTS = dict(eval=(256, 1), train=(256, 1))

_RESULT_MARK = '@@lesa-benchmark-result@@'
_MIB = 2.0**20


# --------------------------------------------------------------------------
# subjects
# --------------------------------------------------------------------------
def _randomise_norms(model, seed):
    """Give the BatchNorms of every LESA layer non-trivial affine parameters
    and running statistics, so that eval-mode comparisons exercise the
    folding of the norm over logits into the softmax (the default init
    would make it the identity)."""
    from lesa_mm.models import LESA
    gen = torch.Generator().manual_seed(seed)
    norms = [m for layer in model.modules() if isinstance(layer, LESA)
             for m in layer.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            for t, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.3, 0.3),
                                 (m.running_mean, -0.3, 0.3),
                                 (m.running_var, 0.5, 1.5)):
                if t is not None:
                    t.copy_(torch.empty(t.shape).uniform_(
                        low, high, generator=gen))


def _height_width(size):
    """``(H, W)`` of a size given as one side or as height and width."""
    if isinstance(size, int):
        return size, size
    height, width = size if len(size) == 2 else (size[0], size[0])
    return int(height), int(width)


def build_subject(spec, impl):
    """Build the model and input of one cell.

    Args:
        spec (dict): Cell description (see :func:`cell_specs`): ``subject``,
            ``size``, ``batch``, ``channels``, ``groups``, ``seed``.
        impl (str): ``'fused'`` or ``'reference'``.

    Returns:
        tuple[nn.Module, Tensor]: The model (on the CPU) and its input; the
        same ``seed`` gives the same weights and input for either kernel.
    """
    from lesa_mm.models import LESA, LESAResNet
    torch.manual_seed(spec['seed'])
    (height, width), batch = _height_width(spec['size']), spec['batch']
    if spec['subject'] == 'layer':
        channels = spec['channels']
        model = LESA(channels, channels, (height, width),
                     groups=spec['groups'], pe_type='detection_qr',
                     attn_impl=impl)
        x = torch.randn(batch, channels, height, width)
    elif spec['subject'] == 'backbone':
        model = LESAResNet(
            depth=50, strides=(1, 2, 2, 2),
            feat_sizes=tuple((height // s, width // s)
                             for s in (4, 8, 16, 32)),
            pe_type='detection_qr', lesa_groups=spec['groups'],
            out_indices=(0, 1, 2, 3), attn_impl=impl)
        x = torch.randn(batch, 3, height, width)
    else:
        raise ValueError(f"subject must be one of {SUBJECTS}, got "
                         f"{spec['subject']!r}")
    _randomise_norms(model, spec['seed'] + 1)
    return model, x


def set_attn_impl(model, impl):
    """Switch every LESA layer of ``model`` to the kernel ``impl``."""
    from lesa_mm.models import LESA
    for m in model.modules():
        if isinstance(m, LESA):
            m.binary.attn_impl = impl
    return model


def _outputs(y):
    """The outputs of a layer (a tensor) or a backbone (a tuple) as a list."""
    return list(y) if isinstance(y, (tuple, list)) else [y]


# --------------------------------------------------------------------------
# one measurement
# --------------------------------------------------------------------------
def make_step(model, x, mode):
    """A closure running one eval forward or one train forward + backward.

    Train mode: ``model.train()``, ``loss = sum(out.mean() for out in
    outputs)``, ``loss.backward()``; gradients are dropped before each step
    so that every step holds the same memory.
    """
    if mode == 'eval':
        model.eval()

        def step():
            with torch.no_grad():
                return model(x)
    elif mode == 'train':
        model.train()
        x = x.requires_grad_(True)

        def step():
            model.zero_grad(set_to_none=True)
            x.grad = None
            loss = sum(out.float().mean() for out in _outputs(model(x)))
            loss.backward()
            return loss
    else:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    return step


def _sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def time_step(step, device, warmup, repeats):
    """Wall times in ms of ``repeats`` runs of ``step`` after ``warmup``
    untimed runs (CUDA is synchronised before each clock read)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _current_rss_kib():
    """The resident set now in KiB (``VmRSS``), or None off Linux."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_high_water():
    """Reset the kernel's RSS high-water mark to the current RSS (Linux
    ``clear_refs``), so that ``ru_maxrss`` then reports the peak from now
    on; returns whether it worked."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _max_rss_kib():
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == 'darwin' else rss


def measure(spec):
    """Time and peak memory of one cell in this process.

    Args:
        spec (dict): Cell description with ``impl``, ``mode``, ``device``,
            ``warmup``, ``repeats`` and what :func:`build_subject` needs.

    Returns:
        dict: ``times_ms`` (wall time of each timed run) and ``peak_mib``
        (peak above the pre-run
        footprint: resident set on the CPU, allocated memory on CUDA).
    """
    device = spec['device']
    model, x = build_subject(spec, spec['impl'])
    model, x = model.to(device), x.to(device)
    step = make_step(model, x, spec['mode'])
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = time_step(step, device, spec['warmup'], spec['repeats'])
        peak = torch.cuda.max_memory_allocated() - base
        return dict(times_ms=times, peak_mib=peak / _MIB)
    base = _current_rss_kib()
    before = _max_rss_kib()
    if not _reset_rss_high_water() or base is None:
        # without a reset, ru_maxrss may hold an older, higher peak
        base = before
    times = time_step(step, device, spec['warmup'], spec['repeats'])
    peak = max(_max_rss_kib() - base, 0)
    return dict(times_ms=times, peak_mib=peak / 1024)


def rel_error(actual, expected):
    """``||actual - expected|| / ||expected||`` in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() /
            expected.norm().clamp_min(1e-30)).item()


def _run_for_check(model, x, mode, weights_seed, device, dtype):
    """Outputs (flattened, float64) and, in train mode, the input gradient
    of ``sum(out * w)`` (fixed random ``w``) of ``model`` in ``dtype``."""
    model = model.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    if mode == 'eval':
        model.eval()
        with torch.no_grad():
            outs = _outputs(model(x))
        return torch.cat([o.double().flatten() for o in outs]), None
    model.train()
    x = x.clone().requires_grad_(True)
    outs = _outputs(model(x))
    gen = torch.Generator().manual_seed(weights_seed)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum()
               for o in outs)
    loss.backward()
    return (torch.cat([o.detach().double().flatten() for o in outs]),
            x.grad.double())


def check(spec):
    """Run both kernels from the same weights on the same input.

    Eval mode compares the outputs; train mode compares the outputs and
    the input gradients of ``sum(out * w)`` for a fixed random ``w``. Both
    float32 kernels are compared with each other and with the reference
    kernel run in float64 (the ground truth): float32 round-off in the
    reference's BatchNorm over ``N * L * L`` logits grows with ``L``, so
    the float64 columns tell which kernel a float32 disagreement comes from.

    Returns:
        dict: ``out_err``/``grad_err`` (fused vs reference, float32),
        ``fp64`` with the same errors of each float32 kernel against the
        float64 reference, and ``fused64`` those of the fused kernel run in
        float64 (``None`` both when ``spec['fp64']`` is false).
    """
    device, mode, seed = spec['device'], spec['mode'], spec['seed'] + 2
    fused, x = build_subject(spec, 'fused')
    models = dict(fused=fused,
                  reference=set_attn_impl(copy.deepcopy(fused), 'reference'))
    truth = fused64 = None
    if spec.get('fp64', True):
        truth = _run_for_check(copy.deepcopy(models['reference']), x, mode,
                               seed, device, torch.float64)
        fused64 = _run_for_check(copy.deepcopy(models['fused']), x, mode,
                                 seed, device, torch.float64)
    runs = {impl: _run_for_check(model, x, mode, seed, device, torch.float32)
            for impl, model in models.items()}

    def errors(actual, expected):
        out = dict(out_err=rel_error(actual[0], expected[0]))
        if mode == 'train':
            out['grad_err'] = rel_error(actual[1], expected[1])
        return out

    result = errors(runs['fused'], runs['reference'])
    result['fp64'] = None if truth is None else {
        impl: errors(run, truth) for impl, run in runs.items()}
    result['fused64'] = None if truth is None else errors(fused64, truth)
    return result


# --------------------------------------------------------------------------
# running cells (CPU cells in fresh processes)
# --------------------------------------------------------------------------
def _describe_error(exc):
    """``'OOM'`` for out-of-memory errors, else ``'failed: ...'``."""
    text = f'{type(exc).__name__}: {exc}'.strip()
    oom_types = (MemoryError, getattr(torch.cuda, 'OutOfMemoryError', ()))
    if isinstance(exc, oom_types) or 'out of memory' in text.lower() or \
            "can't allocate memory" in text.lower():
        return 'OOM'
    # one line, no '|' (it would split the markdown cell)
    return 'failed: ' + text.splitlines()[0][:120].replace('|', '/')


def run_task(task, spec):
    """Run ``measure`` or ``check`` in this process; errors become a dict
    ``{'error': 'OOM' | 'failed: ...'}``."""
    torch.set_num_threads(spec['threads'])
    try:
        return dict(measure=measure, check=check)[task](spec)
    except Exception as exc:  # noqa: BLE001 (one cell must not stop all)
        return dict(error=_describe_error(exc))
    finally:
        if spec['device'] == 'cuda':
            torch.cuda.empty_cache()


def run_in_subprocess(task, spec, timeout):
    """Run ``task`` for ``spec`` in a fresh Python process (``--worker``).

    Returns:
        dict: The worker's result, or ``{'error': ...}`` when it was killed
        (``OOM (killed)`` for SIGKILL, as the kernel's OOM killer does),
        timed out or printed no result.
    """
    payload = json.dumps(dict(task=task, spec=spec))
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', payload]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=timeout or None)
    except subprocess.TimeoutExpired:
        return dict(error=f'timeout (> {timeout:g} s)')
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    if proc.returncode == -9:
        return dict(error='OOM (killed)')
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    tail = tail[:100].replace('|', '/')
    return dict(error=f'failed (exit {proc.returncode}): {tail}')


def run_cell(task, spec, timeout, in_process=False):
    """CPU cells run in a fresh process (unless ``in_process``), CUDA cells
    in this one."""
    if spec['device'] == 'cpu' and not in_process:
        return run_in_subprocess(task, spec, timeout)
    return run_task(task, spec)


def worker_main(payload):
    """Entry point of a ``--worker`` process: print one result line."""
    job = json.loads(payload)
    result = run_task(job['task'], job['spec'])
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------
# the benchmark plan and its tables
# --------------------------------------------------------------------------
def cell_specs(args, subject, mode, device):
    """The common description of one (subject, mode, device) comparison."""
    if subject == 'layer':
        size, batch = LAYER_DEFAULTS[mode]
        size = args.size or size
    else:
        size, batch = BACKBONE_DEFAULTS[mode]
        size = args.image_size or size
    size = list(_height_width(size))
    return dict(subject=subject, mode=mode, device=device, size=size,
                batch=args.batch or batch, channels=args.channels,
                groups=args.groups, warmup=args.warmup, repeats=args.repeats,
                threads=args.threads, seed=args.seed)


def combine_rounds(rounds):
    """One kernel's figures over its rounds: the median and the minimum of
    all timed runs, the largest peak; the first error if any round
    failed."""
    for result in rounds:
        if 'error' in result:
            return result
    times = [t for result in rounds for t in result['times_ms']]
    return dict(time_ms=statistics.median(times), min_ms=min(times),
                peak_mib=max(result['peak_mib'] for result in rounds),
                runs=len(times))


def describe_input(spec):
    """E.g. ``1x256x64x64`` (the input shape)."""
    channels = spec['channels'] if spec['subject'] == 'layer' else 3
    height, width = _height_width(spec['size'])
    return f"{spec['batch']}x{channels}x{height}x{width}"


def _fmt(value, pattern):
    return '-' if value is None else pattern.format(value)


def _cell_text(result, key, pattern):
    if 'error' in result:
        return result['error']
    return _fmt(result.get(key), pattern)


def _error_cells(errors, key, impl):
    """The two error cells (outputs, gradients) of one row."""
    if errors is None:
        return ['-', '-']
    if 'error' in errors:  # the check failed: say so once, in the fused row
        return [errors['error'] if key == 'fp32' and impl == 'fused' else '-',
                '-']
    if key == 'fp64':
        if errors.get('fp64') is None:
            return ['-', '-']
        errors = errors['fp64'][impl]
    elif impl != 'fused':
        return ['-', '-']
    return [_fmt(errors.get('out_err'), '{:.1e}'),
            _fmt(errors.get('grad_err'), '{:.1e}')]


def table_rows(spec, results, errors):
    """Markdown rows of one comparison: one per kernel; the fused row holds
    the speed-up, memory ratio and the fused-vs-reference errors; every
    row holds its kernel's error against the float64 reference."""
    rows = []
    ok = {impl: r for impl, r in results.items() if 'error' not in r}
    speedup = mem_ratio = None
    if 'fused' in ok and 'reference' in ok:
        speedup = '{:.2f}x (min {:.2f}x)'.format(
            ok['reference']['time_ms'] / ok['fused']['time_ms'],
            ok['reference']['min_ms'] / ok['fused']['min_ms'])
        if ok['reference']['peak_mib'] > 0:
            mem_ratio = ok['fused']['peak_mib'] / ok['reference']['peak_mib']
    for impl, result in results.items():
        first = impl == 'fused'
        rows.append('| ' + ' | '.join([
            spec['mode'], describe_input(spec), impl,
            _cell_text(result, 'time_ms', '{:.1f}'),
            _cell_text(result, 'min_ms', '{:.1f}'),
            _cell_text(result, 'peak_mib', '{:.1f}'),
            _fmt(speedup, '{}') if first else '-',
            _fmt(mem_ratio, '{:.3f}') if first else '-',
            *_error_cells(errors, 'fp32', impl),
            *_error_cells(errors, 'fp64', impl)]) + ' |')
    return rows


def fp64_note(spec, errors):
    """A line under the table: the fused kernel in float64 against the
    reference in float64 (their agreement without float32 round-off)."""
    if not errors or not errors.get('fused64'):
        return None
    fused64 = errors['fused64']
    grad = '' if spec['mode'] == 'eval' else \
        ', grad ' + _fmt(fused64.get('grad_err'), '{:.1e}')
    return (f"- {spec['mode']} {describe_input(spec)}: both kernels in "
            f"float64, fused vs reference: out "
            f"{_fmt(fused64.get('out_err'), '{:.1e}')}{grad}")


def _load_average():
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def table_header(subject, device, args, loads=(None, None)):
    """Title, legend and column header of one (subject, device) table;
    ``loads`` are the 1-minute load averages before and after its runs."""
    if device == 'cpu' and not args.in_process:
        memory = ('peak RSS above the pre-run resident set, each kernel and '
                  'round in a fresh process (the largest over the rounds)')
    elif device == 'cpu':
        memory = ('peak RSS above the pre-run resident set, all cells in '
                  'one process (--in-process: memory freed by earlier cells '
                  'may be reused, so figures can be low)')
    else:
        memory = ('torch.cuda.max_memory_allocated above the pre-run '
                  'allocation')
    if subject == 'layer':
        what = (f'LESA layer, C={args.channels} in/out, groups={args.groups}, '
                f'detection_qr')
    else:
        what = (f'LESA-ResNet-50 detection backbone, groups={args.groups}, '
                f'detection_qr, strides (1, 2, 2, 2), 4 outputs')
    threads = f', {args.threads} threads' if device == 'cpu' else ''
    rounds = '' if args.rounds == 1 else \
        f' in each of {args.rounds} rounds (kernels alternating)'
    return [
        f'### {what} on {device.upper()}{threads}, float32',
        '',
        f'- time: wall time, median and min of the {args.repeats} timed runs '
        f'after {args.warmup} warm-up runs{rounds}; eval = forward under '
        f'no_grad, train = forward + backward',
        f'- peak mem: {memory}',
        '- speed-up = reference time / fused time (medians, and in brackets '
        'minima); mem ratio = fused peak / reference peak',
        '- rel err = ||a - b|| / ||b|| of the outputs (out) and, in train '
        'mode, the input gradients (grad): fused vs reference in float32 '
        '(a = fused, b = reference), and each kernel vs the reference kernel '
        'run in float64 (b = float64 reference); the lines under the table '
        'compare the two kernels both run in float64',
    ] + ([
        f'- CPU load average (1 min) before / after the runs: '
        f'{_fmt(loads[0], "{:.2f}")} / {_fmt(loads[1], "{:.2f}")} on '
        f'{os.cpu_count()} cores (it counts these runs\' own threads; a '
        f'figure well above --threads means other busy processes, which '
        f'slow the runs down; on a shared or virtual machine, compare the '
        f'minima or use --rounds)'
    ] if device == 'cpu' else []) + [
        '',
        '| mode | input (NxCxHxW) | kernel | time (ms) | min (ms) '
        '| peak mem (MiB) '
        '| speed-up | mem ratio | rel err out | rel err grad '
        '| vs fp64 out | vs fp64 grad |',
        '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]


def _log(message):
    print(message, file=sys.stderr, flush=True)


def run_benchmark(args, out=None):
    """Run every requested comparison and print one table per subject and
    device to ``out`` (default: stdout); returns the results as a list of
    dicts."""
    out = sys.stdout if out is None else out
    devices = DEVICES if args.device == 'all' else (args.device, )
    if 'cuda' in devices and not torch.cuda.is_available():
        if args.device == 'cuda':
            raise SystemExit('error: --device cuda but CUDA is not available')
        devices = ('cpu', )
    subjects = SUBJECTS if args.subject == 'all' else (args.subject, )
    modes = MODES if args.mode == 'all' else (args.mode, )
    collected = []
    for subject in subjects:
        for device in devices:
            rows, notes, load_before = [], [], _load_average()
            for mode in modes:
                spec = cell_specs(args, subject, mode, device)
                rounds = {impl: [] for impl in args.impl}
                for r in range(args.rounds):
                    for impl in args.impl:
                        _log(f'[benchmark] {subject} {mode} {device} '
                             f'{describe_input(spec)} {impl} (round '
                             f'{r + 1}/{args.rounds}) ...')
                        rounds[impl].append(run_cell(
                            'measure', dict(spec, impl=impl), args.timeout,
                            args.in_process))
                results = {impl: combine_rounds(rounds[impl])
                           for impl in args.impl}
                errors = None
                if len(args.impl) == 2 and not args.no_check:
                    _log(f'[benchmark] {subject} {mode} {device} '
                         f'{describe_input(spec)} correctness check ...')
                    errors = run_cell(
                        'check', dict(spec, fp64=not args.no_fp64),
                        args.timeout, args.in_process)
                rows += table_rows(spec, results, errors)
                notes.append(fp64_note(spec, errors))
                collected.append(dict(spec=spec, results=results,
                                      errors=errors))
            lines = table_header(subject, device, args,
                                 (load_before, _load_average())) + rows
            if any(notes):
                lines += [''] + [note for note in notes if note]
            print('\n'.join(lines) + '\n', file=out, flush=True)
    return collected


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def _int_at_least(minimum):
    """argparse type: an integer >= ``minimum``."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f'expected an integer, got {text!r}')
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f'expected an integer >= {minimum}, got {value}')
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _impl_list(text):
    impls = [s.strip() for s in text.split(',') if s.strip()]
    bad = [s for s in impls if s not in IMPLS]
    if not impls or bad or len(set(impls)) != len(impls):
        raise argparse.ArgumentTypeError(
            f'expected a comma-separated subset of {",".join(IMPLS)} without '
            f'repeats, got {text!r}')
    # fused first: its row carries the comparison
    return [impl for impl in IMPLS if impl in impls]


def build_parser():
    """The command-line parser (``--help`` shows the module's examples)."""
    summary, _, rest = __doc__.partition('\n\n')
    examples = rest[rest.index('Examples'):].replace('::', ':')
    parser = argparse.ArgumentParser(
        description=textwrap.fill(
            summary + ' Prints markdown tables of time, peak memory and '
            'agreement on a LESA layer and the LESA-ResNet-50 detection '
            'backbone.', 79),
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--subject', choices=SUBJECTS + ('all', ),
                        default='all',
                        help='what to benchmark (default: %(default)s)')
    parser.add_argument('--mode', choices=MODES + ('all', ), default='all',
                        help='eval forward (no_grad) and/or train forward + '
                        'backward (default: %(default)s)')
    parser.add_argument('--device', choices=DEVICES + ('all', ),
                        default='all',
                        help="'all' is the CPU plus CUDA when available "
                        '(default: %(default)s)')
    parser.add_argument('--size', type=_positive_int, nargs='+',
                        default=None, metavar=('H', 'W'),
                        help='layer: feature-map height and width, W '
                        'defaulting to H (default: 64 in eval, 48 in train '
                        'mode)')
    parser.add_argument('--image-size', type=_positive_int, nargs='+',
                        default=None, metavar=('H', 'W'),
                        help='backbone: input height and width, W defaulting '
                        'to H, multiples of 32 (default: 256)')
    parser.add_argument('--batch', type=_positive_int, default=None,
                        help='batch size (default: layer 1 in eval, 2 in '
                        'train mode; backbone 1)')
    parser.add_argument('--channels', type=_positive_int, default=256,
                        help='layer: input = output channels, a multiple of '
                        '2 * groups (default: %(default)s)')
    parser.add_argument('--groups', type=_positive_int, default=8,
                        help='LESA heads of the layer and the backbone '
                        '(default: %(default)s)')
    parser.add_argument('--impl', type=_impl_list, default=','.join(IMPLS),
                        help='kernels to run, comma-separated; the '
                        'comparison columns need both (default: '
                        '%(default)s)')
    parser.add_argument('--repeats', type=_positive_int, default=5,
                        help='timed runs; the median is reported (default: '
                        '%(default)s)')
    parser.add_argument('--rounds', type=_positive_int, default=1,
                        help='measure each kernel this many times, '
                        'alternating the kernels (fresh processes on the '
                        'CPU); times pool the rounds, memory takes the '
                        'largest peak (default: %(default)s)')
    parser.add_argument('--warmup', type=_non_negative_int, default=2,
                        help='untimed runs before the timed ones (default: '
                        '%(default)s)')
    parser.add_argument('--threads', type=_positive_int,
                        default=torch.get_num_threads(),
                        help='torch.set_num_threads of the runs (default: '
                        "torch's, here %(default)s)")
    parser.add_argument('--timeout', type=float, default=1800,
                        help='seconds allowed to one CPU cell, 0 for no '
                        'limit (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the weights and inputs (default: '
                        '%(default)s)')
    parser.add_argument('--no-check', action='store_true',
                        help='skip the fused-vs-reference correctness check')
    parser.add_argument('--no-fp64', action='store_true',
                        help='skip the float64 reference run of the check '
                        '(it needs twice the memory of the reference)')
    parser.add_argument('--in-process', action='store_true',
                        help='run the CPU cells in this process instead of '
                        'fresh ones: faster start, less reliable memory')
    parser.add_argument('--worker', metavar='JSON', help=argparse.SUPPRESS)
    return parser


def validate_args(args):
    """Cross-argument checks; raises ValueError with a clear message."""
    if args.subject in ('layer', 'all') and \
            args.channels % (2 * args.groups) != 0:
        raise ValueError(
            f'--channels ({args.channels}) must be a multiple of 2 * --groups '
            f'({2 * args.groups}): half of each head is query/key')
    for name, size in (('--size', args.size),
                       ('--image-size', args.image_size)):
        if size is not None and len(size) > 2:
            raise ValueError(f'{name} takes a height and at most a width, '
                             f'got {len(size)} numbers: {size}')
    if args.subject in ('backbone', 'all'):
        size = args.image_size or [BACKBONE_DEFAULTS['eval'][0]]
        if any(s % 32 != 0 for s in size):
            raise ValueError(f'--image-size ({" ".join(map(str, size))}) '
                             f'must be multiples of 32 (the backbone has '
                             f'output stride 32)')
        if 256 % (2 * args.groups) != 0:
            raise ValueError(f'--groups ({args.groups}) must divide 128 for '
                             f'the backbone (its narrowest LESA stage has '
                             f'256 channels)')
    if args.timeout < 0 or not math.isfinite(args.timeout):
        raise ValueError(f'--timeout must be a finite number >= 0, got '
                         f'{args.timeout}')


def main(argv=None, out=None):
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    try:
        validate_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    run_benchmark(args, out=out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
