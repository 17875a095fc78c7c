"""`make profile`: where a loaded service's CPU goes, per webhook, by component and by function.

The bench's stack (gunicorn with gunicorn.conf.py, the fake Stripe with 50 ms latency), warmed,
then 32 senders of one-window webhooks while py-spy samples the master and every worker
(`--subprocesses`), counting only threads that hold the GIL (`--gil`): the samples split the
service's CPU, not its waits; the run's CPU per webhook (from /proc) turns shares into milliseconds.
py-spy pauses each process to sample it, so the run costs more CPU than an unprofiled one.
"""

from __future__ import annotations

import argparse
import collections
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from bench.run import SUBJECTS, load, running

# Which component a stack's CPU belongs to: that of its innermost frame in a package or in the
# project, first match wins; standard-library frames (json, ssl, sqlite3, logging...) count for
# whoever called them (the ledger's SQL is the ledger's, stripe's JSON decoding is stripe's).
COMPONENTS = [
    ("ledger (SQLite)", re.compile(r"/bridge/ledger(_sql|_sqlite|_postgres)?\.py")),
    ("rate budget (SQLite)", re.compile(r"/bridge/pacing\.py")),
    ("logs (the bridge's JSON lines)", re.compile(r"/bridge/logs\.py")),
    ("Stripe client (stripe-python)", re.compile(r"(^|/)stripe/")),
    ("HTTP to Stripe (urllib3)", re.compile(r"(^|/)urllib3/")),
    ("signature (svix)", re.compile(r"(^|/)(svix|standardwebhooks)/")),
    ("metrics (prometheus_client)", re.compile(r"(^|/)prometheus_client/")),
    ("web (gunicorn, werkzeug, flask)", re.compile(r"(^|/)(gunicorn|werkzeug|flask)/")),
    ("the bridge's other code", re.compile(r"/app\.py|/bridge/")),
]
OTHER = "other (interpreter, threads)"
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(:\d+)?\)$")


def component(frames: list[str]) -> str:
    """The component of a stack: that of its innermost frame that belongs to one."""
    for frame in reversed(frames):
        file = match["file"] if (match := FRAME.match(frame)) else ""
        for name, pattern in COMPONENTS:
            if pattern.search(file):
                return name
    return OTHER


def parse_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: one `frame;frame;... count` line per distinct stack."""
    stacks = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def leaf(frames: list[str]) -> tuple[str, str]:
    """The (function, file) of a stack's innermost Python frame."""
    for frame in reversed(frames):
        if match := FRAME.match(frame):
            return match["function"], match["file"]
    return frames[-1], ""


def costs(stacks: list[tuple[list[str], int]]) -> tuple[dict[str, int], dict[str, int]]:
    """Samples by component and by function (self time: where the CPU was when sampled)."""
    by_component: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        function, file = leaf(frames)
        by_component[component(frames)] += count
        by_function[f"{function} ({file.rsplit('site-packages/', 1)[-1]})"] += count
    return dict(by_component), dict(by_function)


def table(title: str, samples: dict[str, int], cpu_ms: float, top: int) -> str:
    """The `top` largest costs as ms of CPU per webhook and share of all samples."""
    total = sum(samples.values()) or 1
    lines = [f"{title}:"]
    for name, count in sorted(samples.items(), key=lambda pair: -pair[1])[:top]:
        lines.append(f"  {count / total * cpu_ms:5.2f} ms  {count / total:6.1%}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Profiles a 32-sender run and prints the largest costs."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--webhooks", type=int, default=3000)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--raw", type=Path, help="also keep py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bridge-profile-") as folder:
        raw = Path(folder) / "profile.txt"
        with running(0.05, Path(folder) / "stack") as stack:
            load(stack, "warm-up", 32, 32 * SUBJECTS, 1, fresh=True)
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                 str(stack.service.pid), "--subprocesses", "--gil", "--full-filenames",
                 "--rate", "250", "--format", "raw", "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                result = load(stack, "profiled", 32, args.webhooks, 1)
            finally:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                spy.wait(timeout=60)
        if args.raw:
            args.raw.write_text(raw.read_text())
        by_component, by_function = costs(parse_collapsed(raw.read_text().splitlines()))
    cpu_ms = result.cpu_ms / result.webhooks
    print(f"32 senders, {result.webhooks} one-window webhooks: {cpu_ms:.2f} ms CPU per webhook")
    print(f"(under py-spy; {sum(by_component.values())} samples, non-2xx {result.non_2xx})")
    print(table("by component", by_component, cpu_ms, len(COMPONENTS) + 1))
    print(table(f"the {args.top} largest functions (self time)", by_function, cpu_ms, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
