"""A load generator for the example app: a realistic mix of requests, bounded in time.

``concurrency`` workers each loop over weighted actions (reads dominate, a few writes, some
invalid input answered 422, the upstream aggregate, the sometimes-slow report) until the
deadline. A progress line is drawn on stderr. ``python -m example_app.loadgen URL SECONDS``
runs it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

DEFAULT_CONCURRENCY = 8
SEED_USERS = 25
HOT_FRACTION = 0.2  # most reads go to the first fifth of the users: the cache's hot set
HOT_SHARE = 0.8
MAX_THINK_S = 0.02


@dataclass
class Stats:
    """What the load generator sent and what it got back."""

    started: float = field(default_factory=time.monotonic)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: int = 0  # no HTTP answer at all (refused, reset, timeout)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + self.failures

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def by_class(self) -> dict[str, int]:
        classes: Counter[str] = Counter()
        for code, count in self.statuses.items():
            classes[f"{code // 100}xx"] += count
        return dict(sorted(classes.items()))


class Users:
    """The users the load generator knows about, with their emails (updates keep them)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._emails: dict[int, str] = {}
        self._ids: list[int] = []

    def add(self, user_id: int, email: str) -> None:
        if user_id not in self._emails:
            self._ids.append(user_id)
        self._emails[user_id] = email

    def remove(self, user_id: int) -> None:
        if self._emails.pop(user_id, None) is not None:
            self._ids.remove(user_id)

    def email(self, user_id: int) -> str:
        return self._emails[user_id]

    def pick(self) -> int | None:
        """A known id, skewed towards a hot set, as real traffic is."""
        if not self._ids:
            return None
        hot = max(1, int(len(self._ids) * HOT_FRACTION))
        pool = self._ids[:hot] if self._rng.random() < HOT_SHARE else self._ids
        return self._rng.choice(pool)

    def pick_cold(self) -> int | None:
        """A known id outside the hot set (deleting hot users would empty the cache)."""
        hot = max(1, int(len(self._ids) * HOT_FRACTION))
        return self._rng.choice(self._ids[hot:]) if len(self._ids) > hot else None


def new_email(rng: random.Random) -> str:
    return f"user-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}@example.com"


class Traffic:
    """The request mix. Each action sends one request and records its status."""

    def __init__(self, session: aiohttp.ClientSession, stats: Stats, rng: random.Random) -> None:
        self._session = session
        self._stats = stats
        self._rng = rng
        self.users = Users(rng)
        self._actions: list[tuple[Callable[[], Awaitable[None]], int]] = [
            (self.get_user, 40),
            (self.get_missing_user, 2),
            (self.list_users, 8),
            (self.create_user, 2),
            (self.create_invalid_user, 1),
            (self.update_user, 3),
            (self.delete_user, 1),
            (self.overview, 15),
            (self.report, 8),
            (self.health, 3),
            (self.config, 2),
        ]

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """Send one request; the status (0 if none came back) and the JSON body, if any."""
        try:
            async with self._session.request(method, path, **kwargs) as response:
                body = (
                    await response.json() if response.content_type == "application/json" else None
                )
                self._stats.statuses[response.status] += 1
                return response.status, body
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self._stats.failures += 1
            return 0, None

    async def any_action(self) -> None:
        actions, weights = zip(*self._actions, strict=True)
        await self._rng.choices(actions, weights)[0]()

    async def create_user(self) -> None:
        email = new_email(self._rng)
        body = {"name": f"User {email[5:13]}", "email": email, "password": "correct horse 42"}
        code, answer = await self.request("POST", "/users", json=body)
        if code == 201 and isinstance(answer, dict):
            self.users.add(answer["id"], email)

    async def create_invalid_user(self) -> None:
        body = {"name": "", "email": "not-an-email", "password": "short"}
        await self.request("POST", "/users", json=body)  # 422

    async def get_user(self) -> None:
        user_id = self.users.pick()
        if user_id is not None:
            code, _ = await self.request("GET", f"/users/{user_id}")
            if code == 404:
                self.users.remove(user_id)

    async def get_missing_user(self) -> None:
        await self.request("GET", f"/users/{self._rng.randint(10**9, 2 * 10**9)}")  # 404

    async def list_users(self) -> None:
        after = self._rng.choice([0, 0, self.users.pick() or 0])
        await self.request("GET", "/users", params={"limit": "20", "after": str(after)})

    async def update_user(self) -> None:
        user_id = self.users.pick()
        if user_id is not None:
            body = {
                "name": f"Renamed {self._rng.randint(1, 999)}",
                "email": self.users.email(user_id),
            }
            code, _ = await self.request("PUT", f"/users/{user_id}", json=body)
            if code == 404:
                self.users.remove(user_id)

    async def delete_user(self) -> None:
        user_id = self.users.pick_cold()
        if user_id is not None:
            self.users.remove(user_id)
            await self.request("DELETE", f"/users/{user_id}")

    async def overview(self) -> None:
        await self.request("GET", "/overview")

    async def report(self) -> None:
        await self.request("GET", "/report")

    async def health(self) -> None:
        await self.request("GET", "/health")

    async def config(self) -> None:
        await self.request("GET", "/config")

    async def blocking(self) -> None:
        await self.request("GET", "/blocking", params={"seconds": "0.25"})


class ProgressBar:
    """``[#####-----] 12/20 s  1,532 requests  127 req/s  2xx 1,400 4xx 132`` on stderr.

    Redrawn in place on a terminal; elsewhere (a CI log) one line every few seconds.
    """

    WIDTH = 24

    def __init__(self, duration_s: float | None, stream: TextIO = sys.stderr) -> None:
        self._duration = duration_s
        self._stream = stream
        self._tty = stream.isatty()
        self._started = time.monotonic()
        self._last_line = self._started

    def line(self, stats: Stats) -> str:
        elapsed = time.monotonic() - self._started
        rate = stats.requests / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
        classes = "  ".join(f"{name} {count:,}" for name, count in stats.by_class().items())
        failed = f"  no answer {stats.failures:,}" if stats.failures else ""
        if self._duration:
            shown = min(elapsed, self._duration)
            filled = int(shown / self._duration * self.WIDTH)
            bar = f"[{'#' * filled}{'-' * (self.WIDTH - filled)}]"
            bar += f" {shown:3.0f}/{self._duration:.0f} s"
        else:
            bar = f"{elapsed:6.0f} s"
        return f"{bar}  {stats.requests:,} requests  {rate:,.0f} req/s  {classes}{failed}"

    def _line_due(self) -> bool:
        """Every 5 s, but not at the very end: the final line follows."""
        now = time.monotonic()
        ending = self._duration is not None and now - self._started > self._duration - 1
        return now - self._last_line >= 5.0 and not ending

    def draw(self, stats: Stats, *, final: bool = False) -> None:
        if self._tty:
            self._stream.write(f"\r{self.line(stats)}\x1b[K" + ("\n" if final else ""))
        elif final or self._line_due():
            self._last_line = time.monotonic()
            self._stream.write(self.line(stats) + "\n")
        self._stream.flush()


def client_session(base_url: str, concurrency: int) -> aiohttp.ClientSession:
    """A session for ``concurrency`` workers (proxies from the environment ignored: loopback)."""
    return aiohttp.ClientSession(
        base_url=base_url,
        timeout=aiohttp.ClientTimeout(total=30),
        connector=aiohttp.TCPConnector(limit=concurrency + 2),
    )


async def seed(traffic: Traffic, count: int = SEED_USERS) -> None:
    """Create ``count`` users, eight at a time, so reads have something to find."""
    semaphore = asyncio.Semaphore(8)

    async def one() -> None:
        async with semaphore:
            await traffic.create_user()

    await asyncio.gather(*(one() for _ in range(count)))


async def _worker(traffic: Traffic, deadline: float, rng: random.Random, think_s: float) -> None:
    while time.monotonic() < deadline:
        await traffic.any_action()
        await asyncio.sleep(rng.uniform(0, think_s))


async def _now_and_then(
    action: Callable[[], Awaitable[None]], every_s: float, deadline: float
) -> None:
    while time.monotonic() + every_s < deadline:
        await asyncio.sleep(every_s)
        await action()


async def _redraw(bar: ProgressBar, stats: Stats) -> None:
    while True:
        bar.draw(stats)
        await asyncio.sleep(0.25)


async def run_load(
    base_url: str,
    duration_s: float,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    blocking_every_s: float | None = None,
    progress: bool = True,
    seed_users: int = SEED_USERS,
    think_s: float = MAX_THINK_S,
    rng: random.Random | None = None,
) -> Stats:
    """Drive traffic at ``base_url`` for ``duration_s`` seconds; what was sent and answered.

    Each worker pauses up to ``think_s`` between requests. ``blocking_every_s`` also calls
    the opt-in blocking endpoint that often.
    """
    rng = rng or random.Random()
    stats = Stats()
    async with client_session(base_url, concurrency) as session:
        traffic = Traffic(session, stats, rng)
        await seed(traffic, seed_users)
        deadline = time.monotonic() + duration_s
        bar = ProgressBar(duration_s) if progress else None
        tasks = [
            _worker(traffic, deadline, random.Random(rng.random()), think_s)
            for _ in range(concurrency)
        ]
        if blocking_every_s:
            tasks.append(_now_and_then(traffic.blocking, blocking_every_s, deadline))
        redraw = asyncio.create_task(_redraw(bar, stats)) if bar else None
        try:
            await asyncio.gather(*tasks)
        finally:
            if redraw is not None:
                redraw.cancel()
            if bar is not None:
                bar.draw(stats, final=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_app.loadgen", description=__doc__)
    parser.add_argument("url", help="the example app, e.g. http://127.0.0.1:8000")
    parser.add_argument("seconds", type=float, help="how long to send traffic")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    args = parser.parse_args(argv)
    try:
        stats = asyncio.run(run_load(args.url, args.seconds, concurrency=args.concurrency))
    except KeyboardInterrupt:
        return 130
    return 0 if stats.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
