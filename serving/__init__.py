"""Serving-side adapters around the BentoML service in service.py (the gRPC endpoint)."""
