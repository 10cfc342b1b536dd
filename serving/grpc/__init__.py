"""The gRPC endpoint of every worker: `pneumonia.v1.Classifier`, health checking and reflection.

- `servicer.py`: Classify and GetModelInfo, answered by the service instance of this worker;
- `interceptors.py`: metrics, API keys and rate limits;
- `server.py`: the `grpc.aio` server's life cycle (start, readiness of its health service, stop).
"""
