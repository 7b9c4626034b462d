"""flows/prefect_server.py: Prefect's SQLite transactions, as its server opens them, with and without
taking the write lock when they begin. On a real SQLite file through Prefect's own engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa
from prefect.server.database.configurations import AioSqliteConfiguration

from dalle_pipeline.flows.prefect_server import begin_sqlite_transactions_immediate


async def read_then_write_while_another_writes(url: str) -> int:
    """A request's transaction reads, another commits a write meanwhile, then the first writes
    (a deployment PATCH while a flow run logs): the counter after both, or SQLite's refusal."""
    config = AioSqliteConfiguration(connection_url=url)
    engine = await config.engine()
    async with engine.begin() as connection:
        await connection.execute(sa.text("CREATE TABLE counter (n INTEGER)"))
        await connection.execute(sa.text("INSERT INTO counter VALUES (0)"))
    first, second = await config.session(engine), await config.session(engine)

    async def other_writer() -> None:
        async with config.begin_transaction(second):
            await second.execute(sa.text("UPDATE counter SET n = n + 1"))

    async with config.begin_transaction(first):
        await first.execute(sa.text("SELECT n FROM counter"))
        other = asyncio.create_task(other_writer())
        await asyncio.sleep(0.5)  # time for the other transaction to commit, were it let
        await first.execute(sa.text("UPDATE counter SET n = n + 10"))
    await other
    async with engine.connect() as connection:
        return (await connection.execute(sa.text("SELECT n FROM counter"))).scalar_one()


def test_prefects_deferred_transactions_are_refused_when_another_writer_commits_between(tmp_path: Path) -> None:
    # the cause of the served server's 503s: SQLite refuses the upgrade at once, busy timeout or not
    with pytest.raises(sa.exc.OperationalError, match="database is locked"):
        asyncio.run(read_then_write_while_another_writes(f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"))


def test_transactions_begun_immediate_wait_their_turn_and_both_writes_land(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(AioSqliteConfiguration, "begin_sqlite_stmt", AioSqliteConfiguration.begin_sqlite_stmt)
    assert begin_sqlite_transactions_immediate()
    assert asyncio.run(read_then_write_while_another_writes(f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}")) == 11
