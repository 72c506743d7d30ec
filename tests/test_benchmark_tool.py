"""tools/analysis_tools/benchmark_lesa.py with tiny inputs: the structure of
the results and their ratios, never the timings."""
import os

import pytest
import torch

from conftest import REPO_ROOT, load_tool
from lesa_mm.analysis import complexity_info
from lesa_mm.benchmark import build_subject, measure

CLS_DEMO = os.path.join(REPO_ROOT, 'configs', 'demo',
                        'lesa-resnet50-slim_shapes.py')
QUICK = ['--warmup', '0', '--min-run-time', '0',
         '--device', 'cpu']


@pytest.fixture(scope='module')
def tool():
    return load_tool('tools/analysis_tools/benchmark_lesa.py')


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_layer_in_this_process(tool, mode):
    """Both kernels of a tiny layer, measured in this process: positive
    times and peaks, the same FLOPs (the method's, whatever the kernel)."""
    args = tool.parse_args(['--size', '8', '6', '--channels', '32',
                            '--groups', '4', '--batch', '2', '--mode',
                            mode] + QUICK)
    specs = tool.specs(args)
    assert [s['name'] for s in specs] == ['fused', 'reference']
    assert all(s['shape'] == [8, 6] for s in specs)
    results = [tool.measure(s) for s in specs]
    for result in results:
        assert result['time'] > 0 and result['runs'] >= 1
        assert result['peak_mib'] >= result['base_mib'] > 0
    from lesa_mm.models import LESA
    layer = LESA(32, 32, (8, 6), groups=4).eval()
    expected = complexity_info(layer, torch.randn(1, 32, 8, 6),
                               show_table=False)['flops']
    assert results[0]['flops'] == results[1]['flops'] == expected


def test_profile_of_a_step(tool):
    """``--profile``: the operators of one step of ours (the fused layer
    runs its attention through scaled_dot_product_attention at 8x6)."""
    events = tool.main(['--size', '8', '6', '--channels', '32', '--groups',
                        '4', '--profile', '5'] + QUICK, out=open(os.devnull,
                                                                 'w'))
    names = {e.key for e in events}
    assert 'aten::scaled_dot_product_attention' in names
    assert 'aten::softmax' not in names  # the reference kernel's


def test_model_against_stock(tool):
    """``--subject model`` on the slim classification demo (64x64, its
    trained size): ours and the stock ResNet-50 of the same widths, each in
    its own process; the ratios are ours / stock."""
    rows = tool.main(['--subject', 'model', CLS_DEMO, '--shape', '64'] +
                     QUICK)
    assert [r['name'] for r in rows] == ['ours', 'stock']
    ours, stock = rows
    for row in rows:
        assert row['time'] > 0 and row['runs'] >= 1
        assert row['peak_mib'] >= row['base_mib'] > 0
    assert ours['time_ratio'] == pytest.approx(ours['time'] / stock['time'])
    assert ours['mem_ratio'] == pytest.approx(ours['peak_mib'] /
                                              stock['peak_mib'])
    assert stock['time_ratio'] == stock['flops_ratio'] == 1
    # the FLOPs: the package's count of either backbone
    args = tool.parse_args(['--subject', 'model', CLS_DEMO, '--shape', '64'])
    flops = []
    for spec in tool.specs(args):
        model, _ = build_subject(spec)
        model.eval()
        flops.append(complexity_info(model, torch.randn(1, 3, 64, 64),
                                     show_table=False)['flops'])
    assert [ours['flops'], stock['flops']] == flops
    assert ours['flops_ratio'] == pytest.approx(flops[0] / flops[1])
    assert model.base_channels == 16  # the stock one, sized like the demo


def test_model_against_the_reference_kernel(tool):
    """``--baseline reference``: the same backbone with
    ``attn_impl='reference'``, measured in its own process; same FLOPs
    (the method's, whatever the kernel)."""
    args = tool.parse_args(['--subject', 'model', CLS_DEMO, '--shape', '64',
                            '--baseline', 'reference'] + QUICK)
    specs = tool.specs(args)
    assert [s['name'] for s in specs] == ['ours', 'reference']
    models = [build_subject(spec)[0] for spec in specs]
    kernels = [{m.attn_impl for m in model.modules()
                if type(m).__name__ == 'LESABinary'} for model in models]
    assert kernels == [{'fused'}, {'reference'}]
    rows = tool.run(args, out=open(os.devnull, 'w'))
    assert rows[0]['flops'] == rows[1]['flops']
    assert rows[1]['time_ratio'] == 1


def test_compile_mode(tool):
    """``--mode compile`` of a tiny layer, measured in this process (the
    tool runs the same function in a fresh process per subject; the slow
    test below runs it whole): the eval forward captured in one graph,
    without breaks, and compiled."""
    args = tool.parse_args(['--size', '6', '--channels', '16', '--groups',
                            '2', '--mode', 'compile'] + QUICK)
    row = measure(tool.specs(args)[0])  # fused
    assert (row['graphs'], row['graph_breaks']) == (1, 0)
    assert row['ops'] > 0 and row['compile_s'] > 0 and row['time'] > 0


def test_threads_reach_the_measuring_processes_in_every_round(tool):
    """``--threads`` sets each worker's environment (the tool never calls
    ``torch.set_num_threads``); the workers report PyTorch's count.
    ``--repeat 2``: two alternating rounds, the ratio their median."""
    import io
    printed = io.StringIO()
    rows = tool.main(['--size', '8', '--channels', '32', '--groups', '4',
                      '--threads', '1', '--repeat', '2'] + QUICK,
                     out=printed)
    assert [r['threads'] for r in rows] == [1, 1]
    fused, reference = rows
    assert len(fused['time_ratios']) == 2
    assert fused['time_ratio'] == pytest.approx(
        sum(fused['time_ratios']) / 2)
    assert reference['time_ratios'] == [1.0, 1.0]
    assert '2 alternating rounds; time ratio per round' in printed.getvalue()


def test_failure_names_the_subject(tool):
    # 30 channels: not a multiple of 2 * groups
    args = tool.parse_args(['--size', '8', '--channels', '30', '--groups',
                            '4'] + QUICK)
    with pytest.raises(RuntimeError, match='fused failed'):
        tool.run_in_subprocess(tool.specs(args)[0])


@pytest.mark.parametrize('argv', [
    ['--subject', 'model'],  # no config
    [CLS_DEMO],  # a config without --subject model
    ['--size', '8', '8', '8'],
    ['--batch', '0'],
    ['--mode', 'predict'],
    ['--with-cp', 'yes'],
    ['--profile', '0'],
    ['--repeat', '0'],
    ['--baseline', 'reference'],  # a layer has no baseline
    ['--mode', 'compile', '--profile', '3'],
])
def test_bad_arguments(tool, argv):
    with pytest.raises(SystemExit) as exc:
        tool.parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.slow
def test_compile_mode_on_the_imagenet_backbone(tool):
    """``--mode compile`` of the full LESA-ResNet-50 ImageNet backbone (eval,
    batch 1) against ResNet-50: each captured in one graph, without breaks,
    and compiled (the compile times are printed by the tool, not checked
    here)."""
    config = os.path.join(REPO_ROOT, 'configs', 'lesa',
                          'lesa-resnet50_4xb32_in1k.py')
    rows = tool.main(['--subject', 'model', config, '--mode', 'compile'] +
                     QUICK, out=open(os.devnull, 'w'))
    assert [r['name'] for r in rows] == ['ours', 'stock']
    for row in rows:
        assert (row['graphs'], row['graph_breaks']) == (1, 0)
        assert row['compile_s'] > 0 and row['time'] > 0
    assert rows[0]['ops'] > rows[1]['ops']  # the attention is in the graph
