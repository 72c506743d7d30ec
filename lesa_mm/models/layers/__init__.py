from .attention import fused_attention, reference_attention
from .logit_norm import LogitBatchNorm
from .fusion import FUSIONS, DynamicGateFusion, SumFusion
from .lesa import LESA, LESABinary, LESAUnary
from .position import DecomposedRelPos2d, FlattenedRelPos1d

__all__ = [
    'LESA', 'LESAUnary', 'LESABinary', 'DynamicGateFusion', 'SumFusion',
    'FUSIONS', 'DecomposedRelPos2d',
    'FlattenedRelPos1d', 'LogitBatchNorm', 'reference_attention',
    'fused_attention'
]
