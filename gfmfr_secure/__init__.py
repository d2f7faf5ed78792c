"""gfmfr-secure: privacy-preserving multimodal federated recommendation (GFMFR)."""

import os as _os

# torch's OpenMP threads spin while waiting for work by default. On a small machine
# shared with other processes, every parallel region then waits for a descheduled
# spinner, which made a 2-core round 20-30x slower in our measurements. Passive
# waiting is the safe default; on otherwise idle cores a short spin
# (GOMP_SPINCOUNT=10000) can be faster, at a large cost when runs share the cores
# (README, "Performance"). Setting GOMP_SPINCOUNT or OMP_WAIT_POLICY in the
# environment skips this default. It only takes effect before torch loads OpenMP
# (at ``import torch``), hence here: import this package before torch.
if "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gfmfr_secure._runtime import keep_freed_memory as _keep_freed_memory

# Reuse freed ~100 MB blocks instead of faulting in fresh pages every round (README,
# "Performance"); any MALLOC_* setting in the environment, or GFMFR_KEEP_MALLOC, skips it.
_keep_freed_memory()

__version__ = "0.1.0"
