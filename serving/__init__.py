"""Adapters around the BentoML service in service.py: the HTTP guard (`http/`), the gRPC endpoint (`grpc/`),
and what both share: access control (`security`), the request log (`request_log`), start-up and readiness (`lifecycle`)."""
