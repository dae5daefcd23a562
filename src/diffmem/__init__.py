"""diffmem: diffusion models as dense associative memories.

The public API re-exports the pure core (diffmem.core): the dense memory, the noise schedules,
the denoiser contract with the exact empirical denoiser, and the samplers. docs/api.md lists the
public API of every layer, grouped by task: data, training, sampling and loading models, evaluation,
studies and reports.

    >>> import torch, diffmem
    >>> xi = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    >>> am = diffmem.DenseAM(xi)
    >>> # the memory of xi_1 sits at x = tanh(beta x), pulled slightly off the pattern
    >>> am.run(torch.tensor([[0.3, 0.2]], dtype=torch.float64), beta=4.0).x
    tensor([[0.9993, 0.0000]], dtype=torch.float64)
"""

from diffmem.core import *  # noqa: F403
from diffmem.core import __all__ as _core_all

__version__ = "0.1.0"
__all__ = [*_core_all, "__version__"]
