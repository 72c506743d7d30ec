from .attention import fused_attention, reference_attention
from .logit_norm import LogitBatchNorm
from .lesa import LESA, LESABinary, LESAFusion, LESAUnary
from .position import DecomposedRelPos2d, FlattenedRelPos1d

__all__ = [
    'LESA', 'LESAUnary', 'LESABinary', 'LESAFusion', 'DecomposedRelPos2d',
    'FlattenedRelPos1d', 'LogitBatchNorm', 'reference_attention',
    'fused_attention'
]
