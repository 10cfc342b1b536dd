"""Load tests and performance measurements (developer tools, not shipped in the Bento).

    python -m loadtests.run_locust --users 32 --duration 60   # Locust against a service it starts
    python -m loadtests.benchmark                             # one-run benchmark table, JSON and plot

See docs/performance.md.
"""
