"""Time, peak memory and graph capture of LESA against its counterpart: the
measurements behind ``tools/analysis_tools/benchmark_lesa.py``.

A subject is described by a ``spec`` dict (the tool's parsed arguments plus
the subject's ``name``):

* ``subject='layer'``: one LESA layer (``detection_qr``) on a ``shape`` map,
  ``name`` its ``attn_impl`` (``'fused'`` or ``'reference'``);
* ``subject='model'``: the backbone of ``config``, ``name`` ``'ours'``, or
  the subject it is compared with: ``'stock'``, the stock backbone of its
  family (MMPretrain's ``ResNet`` of depth 50, or for MMDetection configs
  MMDetection's R50-DCN, DCN in stages 2-4, with the config backbone's
  widths, outputs, frozen stages and norms), or ``'reference'``, the same
  backbone with ``attn_impl='reference'`` (the direct formulation of the
  attention, as the authors compute it).

A step is a forward in eval mode under ``no_grad`` (``mode='eval'``) or, in
train mode, a forward, the backward of the sum of the outputs and zeroed
gradients (``mode='train'``); ``mode='compile'`` measures the eval step
compiled with :func:`torch.compile`. Times are medians of single steps
(:class:`timeit.Timer` on PyTorch's synchronising clock) repeated for
``min_run_time`` seconds. Nothing here calls ``torch.set_num_threads``:
after that call, even with the count unchanged, PyTorch's CPU
flash-attention kernel ran about 25 % slower on a 2-core machine.
"""
import resource
import statistics
import sys
import timeit

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch.utils.benchmark.utils.timer import timer as clock

from lesa_mm.analysis import complexity_info
from lesa_mm.utils.config import SCOPE_TASKS, config_task, default_scope

R50_DCN = dict(dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
               stage_with_dcn=(False, True, True, True))
#: The stock backbone of each task family (:func:`config_task`).
STOCK = dict(classification=dict(type='ResNet', depth=50),
             detection=dict(type='ResNet', depth=50, **R50_DCN))
#: Keys of the config's backbone the stock backbone takes over.
SHARED = ('stem_channels', 'base_channels', 'out_indices', 'frozen_stages',
          'norm_cfg', 'norm_eval')
#: What ``--subject model`` compares ours with.
BASELINES = ('stock', 'reference')


def build_subject(spec):
    """Build one measured subject.

    Returns:
        tuple[nn.Module, int]: The model and its input channels.
    """
    if spec['subject'] == 'layer':
        from lesa_mm.models import LESA
        c = spec['channels']
        return LESA(c, c, tuple(spec['shape']), groups=spec['groups'],
                    pe_type='detection_qr', attn_impl=spec['name']), c
    cfg = Config.fromfile(spec['config'])
    cfg.merge_from_dict(spec['cfg_options'] or {})
    task = config_task(cfg)
    if task not in STOCK:
        raise ValueError(f'no stock backbone for default_scope '
                         f'{default_scope(cfg)!r} of {spec["config"]}; '
                         f'known: {sorted(SCOPE_TASKS)}')
    init_default_scope(default_scope(cfg))
    backbone = cfg.model.backbone
    if spec['name'] == 'stock':
        backbone = dict(STOCK[task],
                        **{k: backbone[k] for k in SHARED if k in backbone})
    elif spec['name'] == 'reference':
        backbone = dict(backbone, attn_impl='reference')
    return MODELS.build(dict(backbone, with_cp=spec['with_cp'])), 3


def subject_and_step(spec):
    """The built subject on its device, in the spec's mode, its input and
    its step (``mode='compile'``: the eval step, uncompiled)."""
    device = torch.device(spec['device'])
    model, channels = build_subject(spec)
    model = model.to(device)
    x = torch.randn(spec['batch'], channels, *spec['shape'], device=device)
    training = spec['mode'] == 'train'

    def step():
        if not training:
            with torch.no_grad():
                return model(x)
        outs = model(x)
        outs = outs if isinstance(outs, (tuple, list)) else [outs]
        sum(o.sum() for o in outs).backward()
        model.zero_grad(set_to_none=True)

    model.train(training)
    return model, x, step


def profile(spec):
    """The operators of one step (after a warm-up step), as
    ``torch.profiler``'s averages per operator, and the key that sorts them
    by self time on the spec's device."""
    _, _, step = subject_and_step(spec)
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if spec['device'].startswith('cuda'):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    key = 'self_cuda_time_total' if len(activities) > 1 else \
        'self_cpu_time_total'
    return prof.key_averages(), key


def median_step_time(step, warmup, min_run_time):
    """``(median seconds of single steps, number of timed steps)``."""
    timer = timeit.Timer(step, timer=clock)
    timer.timeit(warmup)
    times, end = [], clock() + min_run_time
    while not times or clock() < end:
        times.append(timer.timeit(1))
    return statistics.median(times), len(times)


def measure(spec):
    """Time, peak memory and FLOPs of one subject, in this process.

    Returns:
        dict: ``time`` (median seconds per step), ``runs`` (timed steps),
        ``peak_mib`` (:func:`peak_memory` after the steps), ``base_mib``
        (the same before them: interpreter, libraries, weights, input),
        ``flops`` (of a batch of one) and ``threads`` (PyTorch's
        intra-op threads).
    """
    if spec['mode'] == 'compile':
        return measure_compile(spec)
    device = torch.device(spec['device'])
    model, x, step = subject_and_step(spec)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_memory(device)
    time, runs = median_step_time(step, spec['warmup'], spec['min_run_time'])
    peak = peak_memory(device)
    model.eval()  # (some backbones' train() does not return the model)
    flops = complexity_info(model, x[:1], show_table=False)['flops']
    return dict(time=time, runs=runs, base_mib=base / 2**20,
                peak_mib=peak / 2**20, flops=flops,
                threads=torch.get_num_threads())


def measure_compile(spec):
    """Graph capture and compilation of one subject's eval forward, in this
    process.

    Returns:
        dict: ``graphs``, ``graph_breaks`` and ``ops`` (the operators of
        the captured graphs) from :func:`torch._dynamo.explain`,
        ``compile_s`` (seconds of the first call of the
        :func:`torch.compile`\\ d model, compilation included, inductor's
        caches disabled), ``time`` and
        ``runs`` (median seconds and count of the compiled steps after it)
        and ``threads``.
    """
    import torch._inductor.config as inductor_config
    model, x, _ = subject_and_step(dict(spec, mode='eval'))
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    compiled = torch.compile(model)

    def step():
        with torch.no_grad():
            return compiled(x)

    # a cold compilation: inductor's caches (on disk, shared by processes)
    # would otherwise serve a graph compiled by an earlier run
    with inductor_config.patch(force_disable_caches=True):
        start = clock()
        step()
        compile_s = clock() - start
    time, runs = median_step_time(step, 0, spec['min_run_time'])
    return dict(graphs=explanation.graph_count,
                graph_breaks=explanation.graph_break_count,
                ops=explanation.op_count, compile_s=compile_s, time=time,
                runs=runs, threads=torch.get_num_threads())


def peak_memory(device):
    """Bytes: the peak allocation on CUDA, else the peak RSS of this
    process."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == 'darwin' else rss * 1024  # Linux: KiB
