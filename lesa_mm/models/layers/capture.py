"""Whether the running forward is being captured as a graph, and how: the
kernels of the binary term choose their formulation by it."""
import torch


def is_graph_capture():
    """Whether the running forward is being traced (``torch.jit.trace``,
    the TorchScript ONNX exporter), exported (``torch.export``, the dynamo
    ONNX exporter) or compiled (``torch.compile``): then only
    shape-generic formulations may run (no Python loops over the data, no
    private CPU kernels)."""
    return torch.compiler.is_compiling() or is_shape_generic_capture()


def is_shape_generic_capture():
    """Whether the running forward is being traced or exported: the graph
    must then serve every input size without a Python branch on a size
    (``torch.compile`` instead guards such a branch and recompiles)."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_exporting())
