"""Developer harness: what tests, load tests and scripts share to drive real servers (never shipped).

- `paths`: the repository, the shared data set, the virtual environment's tools;
- `servers`: free ports, `bentoml serve` (and any server) as a subprocess that is always stopped, model stores;
- `processes`: probes of a running server's process tree (workers, memory, CPU, connections, logs);
- `payloads`: real X-rays and the request mix (samples cached under results/samples);
- `loadgen`: the load generator besides Locust (asyncio HTTP/1.1, closed and open loop);
- `faults`: fault drills under load (a worker killed, SIGTERM), shared by tests/test_faults.py and scripts/;
- `fuzz`: the property of the decode path, shared by tests/test_fuzz_decode.py and scripts/fuzz_decode.py.

May import any package of the project, never tests/.
"""
