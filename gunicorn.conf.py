"""Gunicorn settings: what the Dockerfile's CMD and `make run` start."""

import os
import tempfile

from gunicorn.glogging import Logger

# Prometheus counters shared by the workers live in files here; a fresh folder per start (under
# TMPDIR, which must be writable) keeps them from adding up across restarts.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bridge-metrics-")

wsgi_app = "app:serve()"
bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"
# A webhook mostly waits on Stripe: threads keep a slow Stripe call from holding a whole process.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = 8
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
    "formatters": {"json": {"()": "app.JsonFormatter"}},
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
