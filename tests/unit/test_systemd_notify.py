"""The sd_notify client against real AF_UNIX datagram sockets (a path in tmp_path, and an abstract name)."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fpolicyd.obs.systemd import MAX_MESSAGE_BYTES, NotifyConfig, SystemdNotifier, notify_config


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def _receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(65536)
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


def test_no_notify_socket_means_a_silent_no_op() -> None:
    notifier = SystemdNotifier(notify_config({}, pid=1))
    assert not notifier.enabled
    assert notifier.ready("listening") is False
    assert notifier.watchdog() is False
    assert (notifier.sent, notifier.failed) == (0, 0)


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@/org/freedesktop/systemd1/notify/1", "\0/org/freedesktop/systemd1/notify/1"),
        ("@", None),
        ("vsock:2:1234", None),
        ("relative/path", None),
        ("", None),
    ],
)
def test_notify_socket_forms(value: str, address: str | None) -> None:
    assert notify_config({"NOTIFY_SOCKET": value}, pid=1).address == address


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid(
    environ: dict[str, str], interval: float | None
) -> None:
    assert notify_config({"NOTIFY_SOCKET": "/x", **environ}, pid=4242).watchdog_interval_s == interval


def test_ready_status_stopping_and_watchdog_reach_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = SystemdNotifier(notify_config({"NOTIFY_SOCKET": path}, pid=os.getpid()))
    try:
        assert notifier.ready("listening on 127.0.0.1:9898")
        assert _receive(sock) == {"READY": "1", "STATUS": "listening on 127.0.0.1:9898"}
        assert notifier.status("two\nlines")
        assert _receive(sock) == {"STATUS": "two lines"}
        assert notifier.watchdog()
        assert _receive(sock) == {"WATCHDOG": "1"}
        assert notifier.stopping("draining")
        assert _receive(sock) == {"STOPPING": "1", "STATUS": "draining"}
        assert (notifier.sent, notifier.failed) == (4, 0)
    finally:
        notifier.close()


def test_abstract_socket() -> None:
    name = f"fpolicyd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    notifier = SystemdNotifier(notify_config({"NOTIFY_SOCKET": "@" + name}, pid=os.getpid()))
    try:
        assert notifier.ready("up")
        assert _receive(sock) == {"READY": "1", "STATUS": "up"}
    finally:
        notifier.close()
        sock.close()


def test_a_message_that_cannot_be_sent_is_counted_not_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier(NotifyConfig(address=str(tmp_path / "nobody-listens.sock"), watchdog_interval_s=None))
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    assert (notifier.sent, notifier.failed) == (0, 2)
    notifier.close()


def test_an_oversize_message_is_cut_to_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = SystemdNotifier(NotifyConfig(address=path, watchdog_interval_s=None))
    assert notifier.status("x" * (2 * MAX_MESSAGE_BYTES))
    assert len(sock.recv(65536)) == MAX_MESSAGE_BYTES
    notifier.close()


async def test_watchdog_pings_from_the_event_loop_until_cancelled(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    sock.setblocking(False)
    notifier = SystemdNotifier(NotifyConfig(address=path, watchdog_interval_s=0.01))
    task = asyncio.create_task(notifier.run_watchdog())
    loop = asyncio.get_running_loop()
    pings = [await asyncio.wait_for(loop.sock_recv(sock, 4096), 5) for _ in range(3)]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert pings == [b"WATCHDOG=1"] * 3
    notifier.close()


async def test_watchdog_loop_ends_at_once_without_watchdog_usec(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver
    notifier = SystemdNotifier(NotifyConfig(address=path, watchdog_interval_s=None))
    await asyncio.wait_for(notifier.run_watchdog(), 5)
    assert notifier.sent == 0
