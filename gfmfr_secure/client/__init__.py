"""Client side: private state, local training (vectorised cohort and per-client paths)."""
