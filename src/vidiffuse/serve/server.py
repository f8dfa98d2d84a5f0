"""`vidiffuse serve`: the API under uvicorn plus supervised worker processes (the embedded SQLite queue)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading

from .settings import ServeSettings

logger = logging.getLogger("vidiffuse.serve.server")


def _die_with_parent() -> None:
    # Linux: a worker gets SIGTERM (finish the current job, then exit) if the server is killed, even by -9
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def worker_env(settings: ServeSettings) -> dict[str, str]:
    """The server's settings, handed to its workers the way they read them: VIDIFFUSE_* variables."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        env[f"VIDIFFUSE_{name.upper()}"] = str(value)
    return env


class WorkerPool:
    """Keeps `n` worker processes alive: one that dies (crash, OOM kill) is replaced within a second."""

    def __init__(self, settings: ServeSettings, n: int):
        self.settings, self.n = settings, n
        self.procs: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-pool", daemon=True)

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "vidiffuse.cli", "worker"], env=worker_env(self.settings),
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def start(self) -> "WorkerPool":
        self.procs = [self._spawn() for _ in range(self.n)]
        self._thread.start()
        return self

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stop.is_set():
                    logger.warning("worker exited, restarting", extra={"event": "worker_restart", "pid": proc.pid,
                                                                       "returncode": proc.returncode})
                    self.procs[i] = self._spawn()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: each worker finishes its current job (or hands it back) and exits."""
        self._stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    import uvicorn

    from .app import configure_logging, create_app

    configure_logging()
    app = create_app(settings)  # creates the database before the workers open it
    pool = WorkerPool(settings, workers).start()
    # uvicorn shuts down on SIGTERM, then re-raises it under the handler it found: make that handler an
    # exit that unwinds through `finally`, so the workers are stopped (each finishes its job) before we go
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        pool.stop()
