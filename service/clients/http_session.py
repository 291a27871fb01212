"""One shared ``aiohttp.ClientSession`` per event loop."""

from __future__ import annotations

import aiohttp

from ..config import current_settings
from ..loopclients import ClientSpec


async def create_http() -> aiohttp.ClientSession:
    limit = current_settings().http_max_connections
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=60),
        raise_for_status=False,
    )


async def close_http(session: aiohttp.ClientSession) -> None:
    await session.close()


HTTP: ClientSpec[aiohttp.ClientSession] = ClientSpec("http", create=create_http, close=close_http)
