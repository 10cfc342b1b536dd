"""BentoML's HTTP traffic metrics, labelled by route rather than by the path a client sent.

BentoML's own middleware (`RunnerTrafficMetricsMiddleware`, the outermost layer of every worker) labels
`bentoml_service_request_total`, its duration histogram and its in-progress gauge with the raw request path. Every
distinct URL anyone tries, 404s and `/ui/<anything>` included, then adds about 20 series to `/metrics` for the
life of the worker and to Prometheus after it: a scanner or a typo loop grows both without bound. The subclass
here gives BentoML the route's name instead (`route_label`): an API or system route as itself, the web page's
files as `/ui`, anything else as `unmatched`. The app underneath still sees the path as sent.

`label_by_route` installs it; service.py calls it at import, before BentoML builds the worker's app.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from bentoml._internal.server.http import instruments

from serving.http.admission import SYSTEM_PATHS
from serving.http.responses import ASGIApp, Receive, Scope, Send, route_label

SENT_PATH = "pneumonia.sent_path"  # scope key: the path as sent, while the metrics layer sees the label


def _with_sent_path(app: ASGIApp) -> ASGIApp:
    """The app below BentoML's metrics layer, given back the path the client sent."""

    async def restored(scope: Scope, receive: Receive, send: Send) -> None:
        if SENT_PATH in scope:
            scope = {key: value for key, value in scope.items() if key != SENT_PATH} | {"path": scope[SENT_PATH]}
        await app(scope, receive, send)

    return restored


class RouteLabelledTrafficMetrics(instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's traffic metrics with a bounded `endpoint` label (see the module docstring)."""

    known_routes: frozenset[str] = frozenset()

    def __init__(self, app: ASGIApp, **kwargs: Any) -> None:
        super().__init__(_with_sent_path(app), **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == "http":
            label = route_label(scope["path"], self.known_routes)
            if label != scope["path"]:
                scope = {**scope, "path": label, SENT_PATH: scope["path"]}
        await super().__call__(scope, receive, send)


def label_by_route(api_routes: Collection[str]) -> None:
    """Make BentoML build its traffic metrics middleware from `RouteLabelledTrafficMetrics`, knowing `api_routes`
    and BentoML's own system routes. BentoML imports the class when it builds the app, so this must run first."""
    RouteLabelledTrafficMetrics.known_routes = frozenset(SYSTEM_PATHS | set(api_routes))
    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledTrafficMetrics  # type: ignore[misc]
