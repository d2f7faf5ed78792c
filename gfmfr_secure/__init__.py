"""gfmfr-secure: privacy-preserving multimodal federated recommendation (GFMFR)."""

import os as _os

# torch's OpenMP threads spin while waiting for work by default. On a small machine
# shared with other processes, every parallel region then waits for a descheduled
# spinner, which made a 2-core round 20-30x slower in our measurements. Passive
# waiting costs nothing measurable when the cores are free. It only takes effect if
# set before torch initialises OpenMP, hence here; an explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
