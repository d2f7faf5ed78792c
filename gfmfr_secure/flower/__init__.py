"""Flower (flwr 1.42) deployment of the federated roles: ClientApp, ServerApp, loopback launcher."""
