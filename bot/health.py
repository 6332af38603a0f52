"""The operator's HTTP listener (off unless `HEALTH_PORT` is set): `/healthz` says whether this
process can serve (200, or 503 with the reasons), `/metrics` serves `bot.metrics` in the
Prometheus text format. It knows nothing of Discord: the bot hands it its checks.

aiohttp serves it because discord.py already depends on it, in the bot's own event loop,
so a check sees exactly what the bot sees. A check gets `CHECK_SECONDS`: a store that hangs
(a stopped Redis) is unhealthy, not a hung health check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.errors import StoreUnavailable
from bot.metrics import Metrics
from bot.store.base import SessionStore

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0

Check = Callable[[], Awaitable[str | None]]
"""None when healthy, else the reason, one line without secrets."""


@dataclass(frozen=True)
class HealthServer:
    host: str
    port: int
    checks: Sequence[tuple[str, Check]]
    metrics: Metrics

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port).start()
        log.info("health and metrics on http://%s:%s (/healthz, /metrics)", self.host, self.port)
        return runner

    async def _healthz(self, _: web.Request) -> web.Response:
        failing = []
        for name, check in self.checks:
            try:
                reason = await asyncio.wait_for(check(), CHECK_SECONDS)
            except TimeoutError:
                reason = f"no answer within {CHECK_SECONDS:g} s"
            if reason is not None:
                failing.append(f"{name}: {reason}")
        if failing:
            return web.Response(status=503, text="\n".join(failing) + "\n")
        return web.Response(text="ok\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def store_check(store: SessionStore) -> Check:
    async def reachable() -> str | None:
        try:
            await store.ping()
        except StoreUnavailable:
            return "storage unreachable"
        return None

    return reachable
