"""The channel's writer: one write per loop iteration, bulk passed on uncopied (tunnel/aio.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from tunnel.aio import OWN_RECORDS, ChannelWriter


class Transport:
    def __init__(self) -> None:
        self.writes: list[list[Any]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.writes.append([data])

    def writelines(self, pieces: list[Any]) -> None:
        self.writes.append(list(pieces))

    def is_closing(self) -> bool:
        return self.closing


def test_frames_of_an_iteration_leave_in_one_write_short_ones_joined_bulk_as_it_came() -> None:
    asyncio.run(_frames_of_an_iteration())


async def _frames_of_an_iteration() -> None:
    transport = Transport()
    writer = ChannelWriter(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    bulk = memoryview(b"b" * (OWN_RECORDS * 3))
    writer.add((b"keepalive",))
    writer.add((b"head1", bulk))
    writer.add((b"ack",))
    writer.add((b"head2", bulk[:OWN_RECORDS]))
    assert transport.writes == [] and writer.frames == 4
    await asyncio.sleep(0)
    assert len(transport.writes) == 1
    pieces = transport.writes[0]
    assert pieces[0] == b"keepalivehead1" and pieces[1] is bulk
    assert pieces[2] == b"ackhead2" and pieces[3].obj is bulk.obj
    assert b"".join(pieces) == b"keepalivehead1" + bytes(bulk) + b"ackhead2" + bytes(bulk[:OWN_RECORDS])
    writer.add((b"one",))
    writer.flush()
    assert transport.writes[1] == [b"one"] and writer.frames == 0
    transport.closing = True
    writer.add((b"lost",))
    writer.flush()
    assert len(transport.writes) == 2


def test_a_held_frame_leaves_with_the_next_one_or_alone_after_the_hold() -> None:
    asyncio.run(_held())


async def _held() -> None:
    loop = asyncio.get_running_loop()
    transport = Transport()
    writer = ChannelWriter(transport, loop, hold=0.05)  # type: ignore[arg-type]
    writer.add((b"opened1",), hold=True)
    await asyncio.sleep(0)
    assert transport.writes == []  # held: no write of its own at the end of the iteration
    writer.add((b"data1",))
    await asyncio.sleep(0)
    assert transport.writes == [[b"opened1data1"]]  # one write, in order
    started = loop.time()
    writer.add((b"opened2",), hold=True)
    for _ in range(100):  # bounded poll: it leaves alone once the hold is over
        if len(transport.writes) == 2:
            break
        await asyncio.sleep(0.01)
    assert transport.writes[1] == [b"opened2"] and loop.time() - started >= 0.05
    writer.add((b"data2",))  # not held, then held: the end of the iteration takes both
    writer.add((b"opened3",), hold=True)
    await asyncio.sleep(0)
    assert transport.writes[2] == [b"data2opened3"] and writer._timer is None
    unheld = ChannelWriter(transport, loop)  # type: ignore[arg-type]
    unheld.add((b"opened4",), hold=True)  # no hold set: at the end of the iteration as any frame
    await asyncio.sleep(0)
    assert transport.writes[3] == [b"opened4"]


def test_work_after_the_frames_runs_once_they_are_written() -> None:
    asyncio.run(_after())


async def _after() -> None:
    loop = asyncio.get_running_loop()
    transport = Transport()
    writer = ChannelWriter(transport, loop, hold=0.05)  # type: ignore[arg-type]
    seen: list[int] = []
    writer.after(lambda: seen.append(len(transport.writes)))  # nothing waits: soon
    await asyncio.sleep(0)
    assert seen == [0]
    writer.add((b"opened",), hold=True)
    writer.after(lambda: seen.append(len(transport.writes)))  # waits for the held frame to leave
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert seen == [0]
    writer.add((b"data",))
    loop.call_soon(lambda: seen.append(-1))  # scheduled before the flush runs: still before the work
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert transport.writes == [[b"openeddata"]] and seen == [0, -1, 1]


def test_a_prompt_frame_leaves_at_once_with_the_frames_before_it() -> None:
    asyncio.run(_prompt())


async def _prompt() -> None:
    """A WINDOW_UPDATE (``now``) is written in the call, behind what the
    iteration added before it; what comes after waits for the iteration's end."""
    transport = Transport()
    writer = ChannelWriter(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    writer.add((b"data1",))
    writer.add((b"update",), now=True)
    assert transport.writes == [[b"data1update"]] and writer.frames == 0
    writer.add((b"data2",))
    assert len(transport.writes) == 1
    await asyncio.sleep(0)
    assert transport.writes == [[b"data1update"], [b"data2"]]
