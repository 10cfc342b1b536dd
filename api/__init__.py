"""The wire contract that the server and the client share, in one place.

- `api.models`: the JSON bodies (predictions, model info, the error body);
- `api.reasons`: the machine-readable reason codes of refusals;
- `api.status`: how an HTTP status and a refusal map to a gRPC status, and the
  header and metadata names both transports use;
- `api.grpc`: the generated protobuf stubs (`api/_proto`, built from
  `api/proto` by scripts/gen_proto.py) and the conversions between them and `api.models`.

Imports libraries only: the server (service.py, serving/) and the client
(client/) import this package, never each other.
"""
