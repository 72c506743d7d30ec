from .attention import fused_attention, reference_attention
from .lesa import LESA, LESABinary, LESAFusion, LESAUnary
from .position import DecomposedRelPos2d, FlattenedRelPos1d

__all__ = [
    'LESA', 'LESAUnary', 'LESABinary', 'LESAFusion', 'DecomposedRelPos2d',
    'FlattenedRelPos1d', 'reference_attention', 'fused_attention'
]
