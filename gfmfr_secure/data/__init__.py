"""Data layer: loaders, validation, filters, leave-one-out splits, negatives, synthetic data.

Public API::

    data = load_dataset(path)                 # InteractionData
    data = kcore(to_implicit(data, 4.0), 5)
    split = leave_one_out(data)               # Split (CSR training lists, val/test items)
    samples = sample_training(split, 4, rng)  # TrainingSamples
    describe(data, split)                     # dict
"""

from gfmfr_secure.data.dataset import IdMap, InteractionData
from gfmfr_secure.data.load import detect_format, load_dataset
from gfmfr_secure.data.negatives import TrainingSamples, sample_training
from gfmfr_secure.data.preprocess import kcore, to_implicit
from gfmfr_secure.data.split import Split, leave_one_out
from gfmfr_secure.data.stats import describe
from gfmfr_secure.data.synthetic import make_synthetic

__all__ = [
    "IdMap",
    "InteractionData",
    "Split",
    "TrainingSamples",
    "describe",
    "detect_format",
    "kcore",
    "leave_one_out",
    "load_dataset",
    "make_synthetic",
    "sample_training",
    "to_implicit",
]
