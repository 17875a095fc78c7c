"""How a gunicorn worker stops: gracefully on any stop signal, even one sent while it boots.

gunicorn.conf.py calls hold_stop_signals in post_fork, stop_gracefully in post_worker_init and
ignore_late_stop_signals in worker_exit.
"""

from __future__ import annotations

import queue
import signal
from typing import Any

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGTERM})
# A stop that reached this worker before it could act on it (set in the worker after the fork).
_held: list[int] = []


def hold_stop_signals(arbiter: Any) -> None:
    """Right after the fork: stop signals wait (blocked) until the worker can stop gracefully.

    Until gunicorn installs the worker's handlers, a signal runs the master's handler, copied by
    the fork, which queues it where nobody reads it: the worker would serve on, and the master
    SIGKILL it after graceful_timeout. So they are blocked here, and one already queued (between
    the fork and this hook) is remembered.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    pending = getattr(arbiter, "SIG_QUEUE", None)  # the master's queue (queue.SimpleQueue)
    while pending is not None:
        try:
            signum = pending.get_nowait()
        except queue.Empty:
            break
        if signum in STOP_SIGNALS:
            _held.append(signum)


def stop_gracefully(worker: Any) -> None:
    """Once booted: SIGINT, SIGQUIT and SIGTERM all make the worker stop as SIGTERM does (finish
    what it serves within graceful_timeout, then exit); then the held signals are let through.

    gthread's own SIGINT/SIGQUIT handler shuts its thread pool down from inside the handler,
    taking the pool's lock; landing while the worker's main thread holds that lock (submitting a
    request, which may start a pool thread), it deadlocks until the master SIGKILLs the worker
    and logs "Perhaps out of memory?". Ctrl-C makes that likely: the terminal sends SIGINT to the
    whole process group, then the master sends each worker SIGQUIT. SIGTERM's handler only sets
    a flag and wakes the worker's loop (a SimpleQueue and a pipe, no lock). The master still
    decides how long a stop may take: it kills what is left after graceful_timeout.
    """

    for signum in STOP_SIGNALS:
        signal.signal(signum, worker.handle_exit)  # which does nothing once stopping
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if _held:
        worker.handle_exit(_held[0], None)


def ignore_late_stop_signals() -> None:
    """As the worker exits: stop signals are ignored from now on. The master sends SIGQUIT to a
    worker it has not reaped yet; arriving while the interpreter exits, after Python has restored
    the default handlers, it would kill the worker and make the master log "Worker was sent
    SIGQUIT!" about a clean stop. (Ignored, not blocked: a mask holds for one thread only, and
    the pool's threads would still take it. signal.signal runs any signal already caught first,
    with the handler it had, so none is lost to the change.)"""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
