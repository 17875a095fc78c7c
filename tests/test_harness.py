"""The harness's own promises, where a test's outcome rests on them."""

from __future__ import annotations

from tests.harness import free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    """The kernel picks bind(0)'s port at random: 1,000 picks from the 28,232 ports of Linux's
    default range would repeat one about 18 times."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
