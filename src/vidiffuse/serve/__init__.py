"""The HTTP service: FastAPI app, durable job store, workers. See `vidiffuse serve --help`."""

from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "run_worker"]


def __getattr__(name: str):
    # importing the package must stay cheap: the CLI imports it for `keys` without FastAPI or torch
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "run_worker":
        from .worker import run_worker

        return run_worker
    raise AttributeError(name)
