"""The browser console served by ``aigc serve`` at ``/console``: pages in ``pages.py`` (Jinja2 templates), the front end in
``static/`` (the console's own CSS and script, plus htmx and uPlot vendored unmodified: no CDN, no web fonts, so it works on
a machine with no internet)."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles


def mount(app: FastAPI) -> None:
    """Add the console's pages, its static files and its two error pages (sign in; forbidden or missing) to ``app``."""
    from aigc.serve.console import pages

    app.include_router(pages.router)
    app.mount("/console/static", StaticFiles(directory=Path(__file__).resolve().parent / "static"), name="console-static")
    app.add_exception_handler(pages.PageError, pages.page_error)
    app.add_exception_handler(pages.SignIn, pages.sign_in_redirect)
