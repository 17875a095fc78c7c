"""The ledger: the one truth every worker and replica shares, behind one small interface.

It remembers each message (when it was first seen, by the ledger's clock and by the sender's,
and what it was fully written as), the writes Stripe accepted and the windows they set, the key
that replaced one Stripe answered with a 5xx, and who claimed each customer's meter. It also holds
the critical section per Stripe object: the newer-wins check, the writes and their record happen
inside it, in one worker of one replica at a time. Backends: SQLite on one host
(ledger_sqlite.py), PostgreSQL for replicas (ledger_postgres.py); both share ledger_sql.py.
A ledger that cannot be reached answers 503 (LedgerUnavailable): Svix retries, nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from bridge.planning import Write
from bridge.targets import Claim, Target


@dataclass(frozen=True)
class Message:
    """A message as the ledger knows it: which body and place, and when it was first seen."""

    id: str
    digest: str  # identity.message_digest: body, place and conversion
    first_seen: float  # the ledger's clock at its first attempt: orders two reports


@dataclass(frozen=True)
class Seen:
    """What the ledger knows of a message as an attempt at it begins."""

    first_seen: float  # the ledger's clock at the first attempt it saw (this one, if first)
    first_sent: float | None  # that attempt's svix-timestamp: when the sender says it was sent
    written_as: str | None  # the digest it was fully written under, if it was
    first_attempt: bool  # this attempt recorded its first sight: nothing written yet


@dataclass(frozen=True)
class Pending:
    """What the ledger says of a message's planned writes."""

    writes: list[Write]  # still to make (with the key that replaced a 5xx one, if any)
    superseded: int  # skipped: a message first seen later already set their windows
    kept: int  # skipped: a raw meter already holds another message's event for their windows


@dataclass(frozen=True)
class Elsewhere:
    """A window this message wrote to another place (before a remap)."""

    place: str
    timestamp: int


class Ledger(Protocol):
    """What the service asks of the ledger; every method raises LedgerUnavailable if it cannot."""

    def begin(self, message_id: str, sent_at: float | None) -> Seen:
        """Records the message's first sight (once) and says what is known of it."""
        ...

    def section(self, lock_key: str) -> AbstractContextManager[None]:
        """Holds the lock key's critical section, across workers (and replicas, on PostgreSQL);
        StripeUnavailable if another holder keeps it past the time budget."""
        ...

    def pending(self, writes: Sequence[Write], place: str, raw: bool, message: Message) -> Pending:
        """Which of a message's planned writes are still to make, and why the others are not."""
        ...

    def record(self, message: Message, done: bool, place: str, writes: Sequence[Write]) -> None:
        """Remembers, in one transaction, writes Stripe accepted and whether the message is done."""
        ...

    def written_elsewhere(self, message_id: str, place: str) -> list[Elsewhere]:
        """The windows this message wrote to places other than this one."""
        ...

    def replace_key(self, key: str, fresh: str) -> None:
        """Remembers the key that replaces one Stripe answered with a 5xx, for every delivery."""
        ...

    def claim(self, new: Claim, still_valid: Callable[[Claim], bool]) -> Claim:
        """The claim held on new's customer meter: the first one made, unless it is no longer
        valid (then new takes its place)."""
        ...


class Progress:
    """What one attempt leaves in the ledger while it writes: the writes Stripe accepted, 50 at a
    time (a worker killed mid-report redoes at most 50), then whether the message is done."""

    SIZE = 50

    def __init__(self, ledger: Ledger, message: Message, place: str) -> None:
        self._ledger, self._message, self._place = ledger, message, place
        self._accepted: list[Write] = []
        self.done = False  # set once the attempt wrote every window, none left waiting

    def accepted(self, write: Write) -> None:
        """Notes one write Stripe accepted."""
        self._accepted.append(write)
        if len(self._accepted) >= self.SIZE:
            self.flush(done=False)

    def flush(self, done: bool) -> None:
        """Records the writes noted since the last flush, and whether the message is done."""
        self._ledger.record(self._message, done, self._place, tuple(self._accepted))
        self._accepted.clear()


@contextmanager
def writing(ledger: Ledger, message: Message, target: Target) -> Iterator[Progress]:
    """The target's critical section: what is left is recorded before the section ends, so that
    a newer report for the same windows, waiting for it in any worker, finds them; the message
    is done if the block set progress.done (every window written, none waiting)."""
    with ledger.section(target.lock_key):
        progress = Progress(ledger, message, target.place)
        try:
            yield progress
        finally:
            progress.flush(progress.done)
