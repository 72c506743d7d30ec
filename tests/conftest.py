import importlib.util
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings

# Property-based tests draw their cases with hypothesis. Each property runs
# in two profiles: 'default', a bounded number of examples drawn from a
# fixed seed (derandomised: every run draws the same cases), in the default
# suite; 'thorough', thousands of freshly drawn examples, marked `slow`
# (`pytest -m slow -k thorough`). No example database is written.
_PROFILE_SETTINGS = dict(
    deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow,
                           HealthCheck.data_too_large,
                           HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture])
settings.register_profile('default', derandomize=True, **_PROFILE_SETTINGS)
settings.register_profile('thorough', derandomize=False, **_PROFILE_SETTINGS)

#: ``@pytest.mark.parametrize('profile', PROFILES)`` runs a property test
#: in both profiles; the thorough one is `slow`.
PROFILES = [pytest.param('default', id='default'),
            pytest.param('thorough', id='thorough', marks=pytest.mark.slow)]


def check_property(profile, examples, check, explicit=(), **strategies):
    """Run ``check(**drawn)`` on examples drawn from ``strategies``:
    ``examples[profile]`` of them (e.g. ``dict(default=25,
    thorough=2000)``), with the profile's settings, after the ``explicit``
    ones (dicts of arguments: inputs that once found a defect). A failing
    example is shrunk and reported with the seed that reproduces it."""
    runs = []

    def counted(**kwargs):
        runs.append(1)
        return check(**kwargs)

    test = given(**strategies)(counted)
    for kwargs in explicit:
        test = example(**kwargs)(test)
    settings(settings.get_profile(profile),
             max_examples=examples[profile])(test)()
    # shown with `pytest -s` (or -rP): how many examples the property ran
    print(f'property ran {len(runs)} examples ({profile} profile)')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.join(REPO_ROOT, 'tests')
for path in (REPO_ROOT, TESTS_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)


def load_tool(relpath):
    """Import the script ``relpath`` (relative to the repository root) as a
    module named after its file."""
    path = os.path.join(REPO_ROOT, relpath)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def classification_checkpoint(tmp_path, width=16):
    """An MMPretrain-style checkpoint (backbone + head) of a slim
    classification LESA-ResNet-50 with non-trivial norms, saved as
    ``tmp_path / 'cls.pth'``; returns the backbone and the path."""
    from lesa_mm.models import LESAResNet
    torch.manual_seed(1)
    backbone = LESAResNet(depth=50, stem_channels=width, base_channels=width,
                          feat_sizes=(16, 8, 4, 4))
    for m in backbone.modules():  # non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.weight.data.uniform_(0.5, 1.5)
    state = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    state['head.fc.weight'] = torch.randn(3, width * 32)
    state['head.fc.bias'] = torch.randn(3)
    path = tmp_path / 'cls.pth'
    torch.save({'state_dict': state, 'meta': {}}, path)
    return backbone, str(path)


def detection_backbone(width=16, seed=None, **kwargs):
    """A slim LESA-ResNet-50 detection backbone (``detection_qr``, DCN in
    stages 2-4) for 128x128 inputs; ``seed`` makes the fresh position tables
    of every copy the same."""
    from lesa_mm.models import LESAResNet
    if seed is not None:
        torch.manual_seed(seed)
    return LESAResNet(depth=50, stem_channels=width, base_channels=width,
                      strides=(1, 2, 2, 2), feat_sizes=(32, 16, 8, 4),
                      pe_type='detection_qr', out_indices=(0, 1, 2, 3),
                      dcn=dict(type='DCN', deform_groups=1),
                      stage_with_dcn=(False, True, True, True), **kwargs)


def spy_kernel(monkeypatch, module, name, position):
    """Replace ``<module>.<name>`` (a module of ``lesa_mm.models.layers``)
    by a pass-through that records the positional argument at ``position``
    of every call; the list of them."""
    module = importlib.import_module(f'lesa_mm.models.layers.{module}')
    calls = []
    kernel = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args[position])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture
def block_calls(monkeypatch):
    """The ``blocks`` argument of every CPU key-block attention call."""
    return spy_kernel(monkeypatch, 'key_blocks', 'key_block_attention', 7)


@pytest.fixture
def folded_calls(monkeypatch):
    """The ``block_w`` argument of every folded-key attention call."""
    return spy_kernel(monkeypatch, 'folded_rows', 'folded_attention', 9)


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'slow: long runs kept out of the default suite '
        '(run them with `pytest -m slow`)')


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def rel_error(actual, expected):
    """``||actual - expected|| / ||expected||`` in float64, of tensors or
    arrays."""
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    return ((actual - expected).norm() /
            expected.norm().clamp_min(1e-30)).item()


def dense_attention(q_s, k, v, row_s, col_s, height, width):
    """``softmax_j(q_s[i].k[j] + row_s[i, r_j] + col_s[i, c_j]) v[j]`` with
    explicit ``L x L`` logits, key ``j`` at ``(j // W, j % W)``."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    logits = q_s @ k.transpose(-1, -2) + row_s[..., rows] + col_s[..., cols]
    return logits.softmax(dim=-1) @ v


def randomize_norms(model, seed=0):
    """Non-trivial weights, biases and running statistics in every
    BatchNorm of ``model`` (fresh norms are the identity in eval mode, and
    zero-initialised residual norms would hide whole branches)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    gen = torch.Generator().manual_seed(seed)

    def uniform(t, low, high):
        t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                uniform(m.weight, 0.5, 1.5)
                uniform(m.bias, -0.3, 0.3)
                uniform(m.running_mean, -0.3, 0.3)
                uniform(m.running_var, 0.5, 1.5)
    return model


def calibrate_norms(model, *inputs, seed=0):
    """Random BatchNorm weights and biases, and running statistics measured
    on ``inputs`` (a forward pass in training mode, cumulative averages):
    a deep model in eval mode then sees normalised activations, as a trained
    one does, rather than the chaotic ones random statistics give. As in a
    trained ResNet, the last norm of each residual branch (``bn3``) is
    small (weights 0.1-0.3), which keeps float32 round-off from growing
    through the blocks."""
    from torch.nn.modules.batchnorm import _BatchNorm
    randomize_norms(model, seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith('bn3'):
                m.weight.mul_(0.2)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in inputs:
            model(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()
