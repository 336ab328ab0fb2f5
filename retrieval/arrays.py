"""The array types every stage passes around, named once: models make Embeddings, the index stores Vectors.

numpy only, so the numpy-only stages (evaluation, the index) can use them without torch.
"""

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

Embeddings: TypeAlias = npt.NDArray[np.float32]  # (n, D), unit norm: encode_image / encode_text
Vectors: TypeAlias = npt.NDArray[np.float32]  # (n, 2D): fused [e(x1), e(x2)] per item, as the index stores them
