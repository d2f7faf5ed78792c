"""Cryptographic building blocks of secure aggregation (masking, CKKS), independent of the training loop."""
