"""Property: a checkpoint loaded into a LESA backbone keeps every trained
tensor, by every load route.

A ``detection_qr`` backbone trained at some feature sizes, loaded into the
same network built for other sizes (as a user testing or fine-tuning at
another resolution does), by ``load_state_dict``, by
``init_cfg=dict(type='Pretrained')`` or by MMEngine's ``load_checkpoint``
(what a runner's ``load_from`` and ``resume`` and ``tools/test.py`` call),
holds exactly the checkpoint's tensors, and computes exactly what the
checkpoint's model computes at every input size. Re-initialising trained
tables happens only where it is asked for (``LESATransfer``, the recipe's
ImageNet-to-COCO transfer) and is a WARNING that names them.
"""
import pytest
import torch
from hypothesis import strategies as st

from conftest import PROFILES, check_property, randomize_norms
from lesa_mm.models import LESAResNet

ROUTES = ('load_state_dict', 'Pretrained', 'load_checkpoint')


def backbone(feat_sizes, seed, **kwargs):
    torch.manual_seed(seed)
    return LESAResNet(depth=50, stem_channels=8, base_channels=8,
                      strides=(1, 2, 2, 2), feat_sizes=feat_sizes,
                      pe_type='detection_qr', out_indices=(2, 3), **kwargs)


def trained(feat_sizes, seed):
    """A backbone whose every tensor is non-trivial (random tables,
    norms)."""
    model = randomize_norms(backbone(feat_sizes, seed), seed)
    return model.eval()


def load(route, feat_sizes, path, seed):
    if route == 'Pretrained':
        model = backbone(feat_sizes, seed,
                         init_cfg=dict(type='Pretrained', checkpoint=path))
        model.init_weights()
        return model
    model = backbone(feat_sizes, seed)
    if route == 'load_state_dict':
        model.load_state_dict(torch.load(path)['state_dict'], strict=True)
    else:
        from mmengine.runner import load_checkpoint
        detector = torch.nn.Module()
        detector.backbone = model
        load_checkpoint(detector, path, strict=True)
    return model


@st.composite
def load_cases(draw):
    def stage_sizes():
        side = draw(st.integers(1, 12))
        return (8 * side, 4 * side, 2 * side, side)
    return dict(source=stage_sizes(), target=stage_sizes(),
                route=draw(st.sampled_from(ROUTES)),
                size=(draw(st.integers(8, 72)), draw(st.integers(8, 72))),
                seed=draw(st.integers(0, 2**16)))


def check_load(case, tmp_path):
    source = trained(case['source'], case['seed'])
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in
                               source.state_dict().items()}}, path)
    model = load(case['route'], case['target'], path, case['seed'] + 1)
    expected = source.state_dict()
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    # the layers report the checkpoint's sizes
    assert model.layer3[1].conv2.feat_size == source.layer3[1].conv2.feat_size
    x = torch.randn(1, 3, *case['size'])
    with torch.no_grad():
        for out, ref in zip(model.eval()(x), source(x)):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize('profile', PROFILES)
def test_every_route_keeps_every_trained_tensor(profile, tmp_path):
    check_property(profile, dict(default=25, thorough=400),
                   lambda case: check_load(case, tmp_path), case=load_cases())


def test_resized_tables_keep_their_parameter_objects(tmp_path):
    """The tables take the checkpoint's shape in place: an optimizer built
    before the load (as MMEngine's runner builds it) still holds them."""
    source = trained((16, 8, 4, 2), 0)
    model = backbone((32, 16, 8, 4), 1)
    table = model.layer3[1].conv2.binary.position.rel_height
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.load_state_dict(source.state_dict())
    assert table is model.layer3[1].conv2.binary.position.rel_height
    assert table.shape == (2 * 4 - 1, table.shape[1])
    model.train()(torch.randn(2, 3, 32, 32))[-1].sum().backward()
    before = table.detach().clone()
    optimizer.step()
    assert not torch.equal(table, before)


def test_recipe_transfer_reinitialises_tables_with_a_warning(tmp_path):
    """LESATransfer (the detection configs' ImageNet init) re-initialises
    the tables at the model's sizes and names each in a WARNING."""
    from mmengine.logging import MMLogger
    source = trained((16, 8, 4, 4), 0)
    path = str(tmp_path / 'in1k.pth')
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in
                               source.state_dict().items()}}, path)
    log_file = tmp_path / 'transfer.log'
    MMLogger.get_instance('test_recipe_transfer', log_file=str(log_file))
    model = backbone((32, 16, 8, 4), 1,
                     init_cfg=dict(type='LESATransfer', checkpoint=path))
    model.init_weights()
    state, expected = model.state_dict(), source.state_dict()
    built = backbone((32, 16, 8, 4), 1).state_dict()
    tables = [k for k in state if '.binary.position.' in k]
    assert len(tables) == 16
    for key in tables:  # the model's sizes
        assert state[key].shape == built[key].shape
    for key in set(state) - set(tables):
        assert torch.equal(state[key], expected[key]), key
    # the fresh tables differ from the checkpoint's where shapes differ
    log = log_file.read_text()
    assert 'WARNING' in log and 're-initialised 10 trained position ' \
        'tables' in log
    for key in tables:
        if state[key].shape != expected[key].shape:
            assert key in log


def test_other_widths_are_not_reported_as_other_sizes(tmp_path):
    """Tables of other channel widths (another network) are a mismatch
    that load_state_dict reports, not a feature size to adapt to."""
    source = trained((8, 4, 2, 1), 0)
    state = source.state_dict()
    key = 'layer3.1.conv2.binary.position.rel_height'
    state[key] = torch.randn(state[key].shape[0], state[key].shape[1] // 2)
    model = backbone((8, 4, 2, 1), 1)
    with pytest.raises(RuntimeError, match=r'size mismatch for '
                       r'layer3\.1\.conv2\.binary\.position\.rel_height'):
        model.load_state_dict(state)


def test_resizing_in_a_distributed_run_names_the_sizes_to_build(tmp_path):
    """A DistributedDataParallel wrapper built before the load cannot train
    a table that changed shape: in a distributed run a WARNING names the
    checkpoint's feature sizes to build the model with."""
    import torch.distributed as dist
    from mmengine.logging import MMLogger
    from torch.distributed import FileStore
    log_file = tmp_path / 'dist.log'
    MMLogger.get_instance('test_resize_dist', log_file=str(log_file))
    store = FileStore(str(tmp_path / 'store'), 1)
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        model = backbone((32, 16, 8, 4), 1)
        model.load_state_dict(trained((16, 8, 4, 2), 0).state_dict())
    finally:
        dist.destroy_process_group()
    log = log_file.read_text()
    assert 'WARNING' in log and 'DistributedDataParallel' in log
    assert 'layer3.1.conv2: 4x4' in log and 'layer4.1.conv2: 2x2' in log
