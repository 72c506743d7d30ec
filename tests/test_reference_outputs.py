"""Outputs on fixed weights stay bit-identical: the layers and backbones,
with every tensor of their state dicts set from a fixed generator (so the
initialisation does not matter), computed now, against the SHA-256 of their
float32 bytes saved in ``tests/reference_outputs.json`` (on this project's
CI machine: other processors may round differently).

A change that moves any of them moves the arithmetic: if that is intended,
say so in the commit and regenerate the file with

    .venv/bin/python tests/test_reference_outputs.py --regenerate
"""
import hashlib
import json
import os
import sys

import pytest
import torch

from lesa_mm.models import LESA, LESAResNet, LESAResNeXt

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         'reference_outputs.json')


def fixed_weights(module, seed):
    """Every floating tensor of the state dict from one generator: weights
    and tables in [-0.5, 0.5), running variances in [0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if not value.is_floating_point():
                continue
            fresh = torch.rand(value.shape, generator=gen) - 0.5
            if name.endswith('running_var'):
                fresh = fresh + 1.0
            value.copy_(fresh)
    return module


def layers():
    """name -> (module, input shape)."""
    return {
        'lesa_qr': (LESA(16, 32, 6, groups=4), (2, 16, 5, 7)),
        'lesa_qr_stride2': (LESA(16, 32, 6, groups=4, stride=2),
                            (2, 16, 7, 6)),
        'lesa_qr_reference': (LESA(16, 32, 6, groups=4,
                                   attn_impl='reference'), (2, 16, 5, 7)),
        'lesa_cls': (LESA(16, 32, 4, groups=4, pe_type='classification'),
                     (2, 16, 4, 4)),
        'lesa_sum': (LESA(16, 32, 6, groups=4, fusion=dict(type='Sum')),
                     (2, 16, 6, 6)),
        'lesa_deep_gate': (LESA(16, 32, 6, groups=4, fusion=dict(
            type='DynamicGate', shrinks=(2, 2), kernel_sizes=(3, 1),
            groups=(1, 4))), (2, 16, 6, 6)),
        'self_attention': (LESA(16, 32, 6, groups=4, with_unary=False,
                                fusion=None), (2, 16, 6, 6)),
        'backbone_cls': (LESAResNet(depth=50, stem_channels=16,
                                    base_channels=16,
                                    feat_sizes=(16, 8, 4, 4)), (1, 3, 64, 64)),
        'backbone_det': (LESAResNet(
            depth=50, stem_channels=16, base_channels=16,
            strides=(1, 2, 2, 2), feat_sizes=(16, 8, 4, 2),
            pe_type='detection_qr', out_indices=(0, 1, 2, 3),
            dcn=dict(type='DCN', deform_groups=1),
            stage_with_dcn=(False, True, True, True)), (1, 3, 72, 88)),
        'backbone_resnext_d': (LESAResNeXt(
            depth=50, groups=4, base_width=4, stem_channels=16,
            base_channels=16, deep_stem=True, avg_down=True,
            strides=(1, 2, 2, 2), feat_sizes=(16, 8, 4, 2),
            pe_type='detection_qr', out_indices=(3, )), (1, 3, 64, 64)),
    }


def compute():
    """name -> ``dict(sha256, size, sum)`` of every output (eval forward,
    train forward, and the train-mode input gradient), concatenated as
    float32."""
    torch.manual_seed(0)
    results = {}
    for seed, (name, (module, shape)) in enumerate(sorted(layers().items())):
        fixed_weights(module, seed)
        x = torch.rand(shape, generator=torch.Generator().manual_seed(100 +
                                                                      seed))
        parts = []
        module.eval()
        with torch.no_grad():
            out = module(x)
        parts += list(out) if isinstance(out, tuple) else [out]
        module.train()
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        outs = list(out) if isinstance(out, tuple) else [out]
        sum(o.sum() for o in outs).backward()
        parts += outs + [xg.grad]
        values = torch.cat([p.detach().flatten() for p in parts]).float()
        results[name] = dict(
            sha256=hashlib.sha256(values.numpy().tobytes()).hexdigest(),
            size=values.numel(), sum=values.double().sum().item())
    return results


def test_outputs_are_bit_identical_to_the_saved_reference():
    if not os.path.isfile(REFERENCE):
        pytest.fail(f'{REFERENCE} is missing; generate it with '
                    f'{os.path.relpath(__file__)} --regenerate')
    with open(REFERENCE) as f:
        saved = json.load(f)
    now = compute()
    assert sorted(saved) == sorted(now)
    changed = {name: (saved[name], value) for name, value in now.items()
               if value != saved[name]}
    assert not changed, f'outputs changed (saved, now): {changed}'



if __name__ == '__main__':
    if sys.argv[1:] != ['--regenerate']:
        raise SystemExit(__doc__)
    with open(REFERENCE, 'w') as f:
        json.dump(compute(), f, indent=1, sort_keys=True)
        f.write('\n')
    print(f'wrote {REFERENCE}')
