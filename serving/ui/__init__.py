"""The web page: pick or drop chest X-rays, see each verdict, its reasons and a heatmap, in any browser.

Static files only (`static/`: index.html, app.js, style.css, written by hand: no
framework, no build step, nothing loaded from another origin), served by the same
`bentoml serve` at /ui (service.py mounts `app`). The page calls `POST /explain` of
this server for each image, with the API key the user typed (kept in the tab's
sessionStorage only). The HTTP guard gives it a Content-Security-Policy that allows
nothing but these files and data: images (serving/http/responses.py).
"""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles

PATH = "/ui"
STATIC_DIR = Path(__file__).resolve().parent / "static"

app = StaticFiles(directory=STATIC_DIR, html=True)  # /ui/ serves index.html
