import importlib.util
import os
import sys

import pytest
import torch

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


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'slow: long runs kept out of the default suite '
        '(run them with `pytest -m slow`)')


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
