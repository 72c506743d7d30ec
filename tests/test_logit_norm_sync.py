"""LogitBatchNorm(sync=True) in a real two-process gloo group equals
BatchNorm2d on the whole batch: outputs, input and parameter gradients,
running statistics, through its forward (the reference kernel's path) and
its scales (the fused kernels' path)."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lesa_mm.models.layers import LogitBatchNorm

CHANNELS = 6


def whole_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, CHANNELS, 5, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return 3 * x + 1, weight


def _rank(rank, store, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank,
                            world_size=2)
    try:
        x, weight = whole_batch()
        part = slice(2 * rank, 2 * rank + 2)
        norm = LogitBatchNorm(CHANNELS, sync=True).double().train()
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
        xr = x[part].clone().requires_grad_(True)
        out = norm(xr)
        (out * weight[part]).sum().backward()
        # the fused kernels' path: scales from all-reduced moments
        fused = LogitBatchNorm(CHANNELS, sync=True).double().train()
        dims = (0, 2, 3)
        scales = fused.scales(lambda: (x[part].sum(dims),
                                       x[part].square().sum(dims),
                                       x[part].numel() // CHANNELS))
        torch.save({k: v.detach().clone() for k, v in dict(
            out=out, grad=xr.grad, weight_grad=norm.weight.grad,
            bias_grad=norm.bias.grad, mean=norm.running_mean,
            var=norm.running_var, scales=scales,
            fused_var=fused.running_var).items()},
            os.path.join(out_dir, f'{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_sync_equals_batchnorm_on_the_whole_batch(tmp_path):
    store = str(tmp_path / 'store')
    mp.start_processes(_rank, args=(store, str(tmp_path)), nprocs=2,
                       start_method='spawn')
    results = [torch.load(tmp_path / f'{rank}.pt') for rank in range(2)]
    x, weight = whole_batch()
    bn = torch.nn.BatchNorm2d(CHANNELS).double().train()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
    xr = x.clone().requires_grad_(True)
    out = bn(xr)
    (out * weight).sum().backward()
    for rank in range(2):
        got = results[rank]
        part = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(got['out'], out.detach()[part])
        torch.testing.assert_close(got['grad'], xr.grad[part])
        torch.testing.assert_close(got['mean'], bn.running_mean)
        torch.testing.assert_close(got['var'], bn.running_var)
        torch.testing.assert_close(got['fused_var'], bn.running_var)
        # (the fused norm keeps its initial weight 1)
        torch.testing.assert_close(got['scales'], 1 / torch.sqrt(
            x.var(dim=(0, 2, 3), unbiased=False) + bn.eps))
    # each rank's parameter gradient is its part's; DDP sums them
    torch.testing.assert_close(
        results[0]['weight_grad'] + results[1]['weight_grad'], bn.weight.grad)
    torch.testing.assert_close(
        results[0]['bias_grad'] + results[1]['bias_grad'], bn.bias.grad)
