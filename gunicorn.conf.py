"""Gunicorn settings: what the Dockerfile's CMD and `make run` start."""

import atexit
import os
import shutil
import tempfile

from gunicorn.glogging import Logger

from bridge.stopping import hold_stop_signals, ignore_late_stop_signals, stop_gracefully


def scratch_dir() -> str | None:
    """Where gunicorn's scratch files go: TMPDIR if set, else /dev/shm (memory, and writable in a
    container whose root filesystem is read-only), else Python's default temporary folder."""
    shm = "/dev/shm"  # noqa: S108  # only ever used through mkstemp/mkdtemp: private, unique names
    if os.environ.get("TMPDIR") or not os.access(shm, os.W_OK | os.X_OK):
        return None
    return shm


# Each worker's heartbeat file, which gunicorn touches about once a second: better not on disk.
worker_tmp_dir = scratch_dir()
# Prometheus counters shared by the workers live in files here; a fresh folder per start keeps
# them from adding up across restarts. It must exist before the app is imported (preload, below).
_metrics_dir = tempfile.mkdtemp(prefix="bridge-metrics-", dir=worker_tmp_dir)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def _remove_metrics_dir(master: int, folder: str) -> None:
    """Removes the metrics folder as the master's interpreter exits: after a clean stop, and also
    after a refused start (a bad config, a port in use), where gunicorn's on_exit never runs.
    Workers are forked with this hook registered, and must leave the folder alone."""
    if os.getpid() == master:
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(_remove_metrics_dir, os.getpid(), _metrics_dir)

wsgi_app = "app:serve()"


def post_fork(server: object, worker: object) -> None:
    """A stop signal that comes while the worker boots waits for it (bridge/stopping.py)."""
    hold_stop_signals(server)


def worker_exit(server: object, worker: object) -> None:
    """A stop signal that comes as the worker exits is ignored (bridge/stopping.py)."""
    ignore_late_stop_signals()


def post_worker_init(worker: object) -> None:
    """Each worker stops gracefully on any stop signal (bridge/stopping.py), and checks
    config.yaml every second, requests or not (threads do not survive the fork, so the master
    cannot start this for them). worker.wsgi is serve()'s Flask app."""
    stop_gracefully(worker)
    # bench/floor.py's do-nothing app, served with this file too, has no config to watch.
    bridge = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("bridge")
    if bridge is not None:
        bridge.config.watch()


# BIND: where to listen, e.g. 127.0.0.1:8080 behind a proxy on the same host (docs/proxy.md);
# several addresses separated by spaces. By default every interface, on $PORT.
bind = os.environ.get("BIND", "").split() or [f"0.0.0.0:{os.environ.get('PORT', '8080')}"]
# A webhook mostly waits on Stripe: threads keep a slow Stripe call from holding a whole process.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# 16 threads a worker: at 50-400 ms a Stripe call, 32 webhooks in flight cost little CPU; each
# thread keeps its own connection to Stripe.
# Why 2 x 16 and not 4 x 8 (issue 19): the service is CPU-bound on 2 vCPUs, so one process per CPU
# is enough to use both, and more processes only add memory (each holds the app and its caches),
# cold caches (each worker fetches every subscription once) and writers queuing on the ledger's and
# the rate budget's SQLite files. Measured on a quiet 2-vCPU machine (2026-12-07), 32 senders at
# 50 ms, 4 rounds a layout, the layouts alternated twice: 2 x 16 527-593/s at 1.27-1.51 ms CPU a
# webhook; 4 x 8 424-543/s at 1.37-1.66 ms, with the wider spread the issue saw (keep-alive
# connections unevenly spread over more workers). Keep 2 x 16; on more CPUs, raise WEB_CONCURRENCY
# to one per CPU.
threads = 16
# Load the app once in the master: a bad config stops the start with one clear message.
preload_app = True
# Longer than the 12 s webhook budget, so neither a restart nor SIGTERM cuts a webhook off.
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = None


class BridgeLogger(Logger):  # type: ignore[misc]  # gunicorn ships no types
    """gunicorn's logger without the access log: the bridge logs each webhook itself, and gunicorn
    would otherwise format an access line per request whenever logconfig_dict is set."""

    def access(self, *args: object, **kwargs: object) -> None:
        """No access log."""


logger_class = BridgeLogger
# The runtime control socket would need a writable home directory; nothing here uses it.
control_socket_disable = True
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "bridge.logs.JsonFormatter"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        "bridge": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        # The stripe library logs two INFO lines per request; the bridge logs each write itself.
        "stripe": {"level": "WARNING"},
    },
}
