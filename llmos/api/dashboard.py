"""GET /dashboard: one page served by llmos itself, with its script, styles and the chart library
as static files (llmos/api/static, shipped with the package; nothing is built at install)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


def install(app: FastAPI) -> None:
    def dashboard() -> FileResponse:
        """Loss curves, trainer and queue state, checkpoints with rollback, and a prompt box."""
        return FileResponse(STATIC / "dashboard.html", headers={"Cache-Control": "no-cache"})

    app.add_api_route("/dashboard", dashboard, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")
