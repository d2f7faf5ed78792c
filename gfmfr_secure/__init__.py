"""gfmfr-secure: privacy-preserving multimodal federated recommendation (GFMFR)."""

import os as _os

# torch's OpenMP threads spin while waiting for work by default. On a small machine
# shared with other processes, every parallel region then waits for a descheduled
# spinner, which made a 2-core round 20-30x slower in our measurements. Passive
# waiting is the safe default. On cores nothing else uses, a short spin is faster:
# GOMP_SPINCOUNT=10000 took a default GFMFR client round from 3.4-4.4 s to 2.9-3.0 s
# on 2 cores, but made two concurrent runs 2x slower (README, "Performance"). Setting
# GOMP_SPINCOUNT (or OMP_WAIT_POLICY) in the environment skips this default. It only
# takes effect before torch loads OpenMP (at ``import torch``), hence here: import
# this package before torch.
if "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
