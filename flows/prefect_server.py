"""`prefect server start` as infra/serve.sh runs it: Prefect's own server, its SQLite transactions
taking the write lock when they begin.

Why: Prefect's SQLite backend opens a request's transaction as `BEGIN DEFERRED` (only its
`with_for_update` ones as `BEGIN IMMEDIATE`). A deferred transaction that reads, then writes, must
upgrade its read snapshot to the write lock; when another connection committed in between (the
server's own services, a worker polling, the log and event writers of three flow runs) SQLite
refuses the upgrade at once with SQLITE_BUSY: the 60 s busy timeout Prefect sets is not consulted,
since waiting could not make the stale snapshot current. Prefect answers such a request 503, which
its Python client retries, but any other caller (a user's script, `curl`) sees the refusal: it
failed `prefect deploy`'s create_deployment and a test's deployment PATCH while runs trained. Opened
as `BEGIN IMMEDIATE`, a transaction waits for the write lock at its start, within the busy timeout,
and nothing it does later can be refused; SQLite then serialises the server's writers instead of
failing one of them. Reads outside transactions stay concurrent (WAL).

A PostgreSQL database (PREFECT_DATABASE_URL) has row locks and needs none of this: the patch only
touches SQLite engines. Should a Prefect release move what is patched, the server starts unpatched
and says so in its log.
"""

from __future__ import annotations

import sys


def begin_sqlite_transactions_immediate() -> bool:
    """Make Prefect's SQLite engines open every transaction as BEGIN IMMEDIATE; whether it took."""
    try:
        from prefect.server.database.configurations import SQLITE_BEGIN_MODE, AioSqliteConfiguration
    except ImportError as error:
        print(f"prefect_server: SQLite transactions left as Prefect opens them ({error})", file=sys.stderr)
        return False
    if not callable(getattr(AioSqliteConfiguration, "begin_sqlite_stmt", None)):
        print("prefect_server: this Prefect has no AioSqliteConfiguration.begin_sqlite_stmt; SQLite "
              "transactions left as Prefect opens them", file=sys.stderr)
        return False

    def begin_sqlite_stmt(self, conn) -> None:
        # Prefect sets a mode (DEFERRED or IMMEDIATE) for every transaction it begins, and none for
        # the statements it runs outside one; those stay in autocommit, as Prefect has them
        if SQLITE_BEGIN_MODE.get() is not None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    AioSqliteConfiguration.begin_sqlite_stmt = begin_sqlite_stmt
    return True


def main() -> None:
    """`python -m dalle_pipeline.flows.prefect_server ARGS`: `prefect server start ARGS`, patched."""
    begin_sqlite_transactions_immediate()
    from prefect.cli import app  # Prefect's own command line, which reads sys.argv

    sys.argv = ["prefect", "server", "start", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
