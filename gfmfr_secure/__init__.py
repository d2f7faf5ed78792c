"""gfmfr-secure: privacy-preserving multimodal federated recommendation (GFMFR)."""

__version__ = "0.1.0"
