"""The one core driver (firewall/drive.py): outputs in order, one timer at the core's deadline, ticks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from firewall.drive import CoreDriver


@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class Unknown:
    pass


class ToyCore:
    """Says "tick" once at each deadline in ``due`` (loop time), then has none."""

    def __init__(self, due: list[float], fail: bool = False) -> None:
        self.due = due
        self.fail = fail
        self.asked: list[float] = []

    def next_deadline(self, now: float) -> float | None:
        self.asked.append(now)
        return self.due[0] if self.due else None

    def tick(self, now: float) -> list[Say]:
        if self.fail:
            raise RuntimeError("a bug in the core")
        out = []
        while self.due and self.due[0] <= now:
            out.append(Say(f"tick {self.due.pop(0):.2f}"))
        return out


def driver_for(core: ToyCore, said: list[str], **kw: object) -> CoreDriver:
    loop = asyncio.get_running_loop()
    return CoreDriver(
        {Say: lambda out: said.append(out.text)},
        tick=core.tick, deadline=core.next_deadline, clock=loop.time, **kw,  # type: ignore[arg-type]
    )


def test_outputs_in_order_then_the_timer_ticks_each_deadline() -> None:
    async def main() -> None:
        t0 = asyncio.get_running_loop().time()
        core = ToyCore([t0 + 0.02, t0 + 0.04])
        said: list[str] = []
        driver = driver_for(core, said)
        driver.run([Say("a"), Say("b")])
        assert said == ["a", "b"]
        for _ in range(100):  # bounded poll, not a sleep that guesses
            if len(said) == 4:
                break
            await asyncio.sleep(0.01)
        assert said == ["a", "b", f"tick {t0 + 0.02:.2f}", f"tick {t0 + 0.04:.2f}"]
        assert driver._timer is None  # no deadline left: no timer

    asyncio.run(main())


def test_an_unchanged_deadline_keeps_the_timer() -> None:
    async def main() -> None:
        t0 = asyncio.get_running_loop().time()
        driver = driver_for(ToyCore([t0 + 60]), [])
        driver.arm()
        timer = driver._timer
        driver.run([])
        assert driver._timer is timer is not None
        driver.close()

    asyncio.run(main())


def test_a_later_deadline_keeps_the_timer_which_ticks_early_and_arms_at_it() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        core = ToyCore([t0 + 0.01])
        said: list[str] = []
        driver = driver_for(core, said)
        driver.arm()
        timer = driver._timer
        core.due[0] = t0 + 0.05  # moved later, as a silence deadline does at every frame
        driver.run([])
        assert driver._timer is timer  # not re-armed: it fires early instead
        for _ in range(100):
            if driver._timer is not timer:
                break
            await asyncio.sleep(0.005)
        assert said == [] and driver._timer_at == t0 + 0.05  # the early tick said nothing, armed at the new one
        for _ in range(100):
            if said:
                break
            await asyncio.sleep(0.01)
        assert said == [f"tick {t0 + 0.05:.2f}"] and loop.time() >= t0 + 0.05
        core.due.append(loop.time() + 60)
        driver.arm()
        timer = driver._timer
        core.due[0] = loop.time() + 0.01  # moved earlier: the timer moves with it
        driver.run([])
        assert driver._timer is not timer and driver._timer_at == core.due[0]
        driver.close()

    asyncio.run(main())


def test_close_cancels_the_timer_and_arms_nothing_again() -> None:
    async def main() -> None:
        t0 = asyncio.get_running_loop().time()
        said: list[str] = []
        driver = driver_for(ToyCore([t0 + 0.01]), said)
        driver.arm()
        driver.close()
        driver.run([Say("after close")])
        await asyncio.sleep(0.03)
        assert said == ["after close"] and driver._timer is None

    asyncio.run(main())


def test_an_output_without_a_handler_is_a_bug() -> None:
    async def main() -> None:
        driver = driver_for(ToyCore([]), [])
        with pytest.raises(KeyError):
            driver.run([Unknown()])

    asyncio.run(main())


def test_on_error_takes_a_failing_tick_and_the_timer_stays_armed() -> None:
    async def main() -> None:
        t0 = asyncio.get_running_loop().time()
        core = ToyCore([t0 + 0.01], fail=True)
        errors: list[Exception] = []
        driver = driver_for(core, [], on_error=errors.append)
        driver.arm()
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.01)
        assert isinstance(errors[0], RuntimeError)
        assert driver._timer is not None  # the deadline is still there, so is the timer
        driver.close()

    asyncio.run(main())


def test_a_run_nested_in_a_handler_leaves_the_timer_to_the_outer_run() -> None:
    """An adapter feeds the core an I/O result from inside a handler (the
    mediator's warm connection: opened, then connected): the deadline is
    asked once, after the outermost run, even when the nested run raises."""

    async def main() -> None:
        t0 = asyncio.get_running_loop().time()
        core = ToyCore([t0 + 0.02])
        said: list[str] = []
        driver: CoreDriver

        def nested(out: Say) -> None:
            said.append(out.text)
            if out.text == "outer":
                driver.run([Say("inner")])
            elif out.text == "failing":
                try:
                    driver.run([Unknown()])
                except KeyError:
                    said.append("caught")

        loop = asyncio.get_running_loop()
        driver = CoreDriver({Say: nested}, tick=core.tick, deadline=core.next_deadline, clock=loop.time)
        driver.run([Say("outer"), Say("failing"), Say("last")])
        assert said == ["outer", "inner", "failing", "caught", "last"]
        assert len(core.asked) == 1
        for _ in range(100):
            if "tick" in " ".join(said):
                break
            await asyncio.sleep(0.01)
        assert said[-1] == f"tick {t0 + 0.02:.2f}"

    asyncio.run(main())
