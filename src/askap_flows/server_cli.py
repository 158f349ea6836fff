"""``askap-flows db`` and ``askap-flows server``: Prefect's database URL and checks, and a
Prefect server in the foreground for a site's pipelines (pools sized for its sub-flows; its URL
written to a file that pipeline jobs wait for)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from . import mpi
from .spec import whole_number


def cmd_db_url(args) -> int:
    from . import database_url

    if args.host:
        password = (args.password or os.environ.get("ASKAP_PG_PASSWORD")
                    or os.environ.get("PGPASSWORD"))
        if args.password_file:
            password = Path(args.password_file).read_text().strip()
        url = database_url.postgres_url(args.host, args.port, args.user, password, args.db)
        source = "built from --host/--port/--user/--db"
    else:
        url, source = database_url.configured_url()
    database_url.parse_url(url)  # a clear error for a malformed one
    print(f"# {source}", file=sys.stderr)
    if args.export:
        from . import compat

        for name in compat.DATABASE_URL_VARS:
            print(f"export {name}={shlex.quote(url)}")
    else:
        print(url if args.show_password else database_url.redact(url))
    return 0


def cmd_db_check(args) -> int:
    from . import database

    try:
        plan = database.preflight(args.max_concurrent, database_url=args.database_url,
                                  api_url=args.api_url, timeout=args.timeout)
    except database.DatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ok: {plan.describe()}")
    for name, value in plan.server_env.items():
        print(f"{name}={value}")
    return 0


def server_database_url(args, home: Path) -> str:
    """The server's database URL: --database-url-file, a password-less --database-url, or the
    environment. A password on the command line is refused: every user of the node sees it in ps."""
    from . import database_url

    if args.database_url_file:
        return database_url.url_from_file(args.database_url_file)
    if args.database_url:
        if database_url.parse_url(args.database_url).password:
            raise database_url.DatabaseError(
                f"--database-url {database_url.redact(args.database_url)} holds a password, which "
                "every user of this node can read in ps. Fix: put the URL in a file only you can "
                "read (chmod 600 FILE) and give --database-url-file FILE, or export "
                f"{compat_url_var()}=URL before starting the server.")
        return args.database_url
    return database_url.configured_url({**os.environ, "PREFECT_HOME": str(home)})[0]


def compat_url_var() -> str:
    from . import compat

    return compat.DATABASE_URL_VARS[0]


def cmd_server(args) -> int:
    import signal
    import socket
    import time

    from . import compat, database, server_workers
    from .server import PrefectServer, ServerError

    home = Path(args.home or os.environ.get("PREFECT_HOME")
                or mpi.askap_home() / f"prefect{compat.PREFECT_MAJOR}")
    try:
        host = database.interface_address(args.interface) if args.interface else args.host
        url = server_database_url(args, home)
        workers = server_workers.check(args.workers, url)  # before anything starts
        plan = database.preflight(args.max_concurrent, database_url=url, workers=workers,
                                  max_connections=whole_number("--max-connections",
                                                               args.max_connections))
        with socket.socket() as probe:
            try:
                probe.bind((host, args.port))
            except OSError as exc:
                raise ServerError(f"cannot listen on {host}:{args.port} ({exc.strerror}). Fix: "
                                  "choose another --port (0: any free one), or stop what holds "
                                  "it.") from None
        server = PrefectServer(home, plan.url, host=host, port=args.port or None,
                               settings=plan.server_env, workers=workers).start()
        if args.url_file:
            write_url_file(Path(args.url_file), server.api_url, workers)
    except (database.DatabaseError, ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"Prefect server on {plan.describe()}; {server.describe()}; log: {server.log_path}",
          file=sys.stderr)
    if host.startswith("127.") or host == "localhost":
        print(f"note: {host} is reachable from this node only; for compute nodes use --interface "
              "IF or --host ADDRESS (docs/database.md)", file=sys.stderr)
    print(f"Prefect UI: {server.ui_url}")
    print(f"export PREFECT_API_URL={server.api_url}", flush=True)
    print("Ctrl-C stops the server.", file=sys.stderr, flush=True)
    try:
        while (gone := server.exited()) is None:
            time.sleep(1)
    except KeyboardInterrupt:
        if args.url_file:  # first: a batch job's SIGKILL may follow its SIGTERM within seconds
            remove_url_file(Path(args.url_file), server.api_url, workers)
        server.stop()
        print("server stopped", file=sys.stderr)
        return 0
    finally:
        if args.url_file:
            remove_url_file(Path(args.url_file), server.api_url, workers)
    server.stop()  # the rest of its processes: one of them alone serves no pipeline
    print(f"error: {gone}", file=sys.stderr)
    return 1


def url_file_text(api_url: str, workers: int = 1) -> str:
    """What ``--url-file`` holds: a line for ``source`` (pure); with ``workers`` > 1 a comment
    line after it says how the server runs."""
    text = f"export PREFECT_API_URL={shlex.quote(api_url)}\n"
    if workers > 1:
        text += f"# askap-flows server: {workers} API worker processes, services, Redis\n"
    return text


def write_url_file(path: Path, api_url: str, workers: int = 1) -> None:
    """Write the URL file at once (a reader never sees half of it), once the server answers."""
    from .server import ServerError

    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(url_file_text(api_url, workers))
        os.replace(tmp, path)
    except OSError as exc:
        raise ServerError(f"cannot write --url-file {path} ({exc.strerror}). Fix: give a path in "
                          "a directory you can write, on a file system the pipeline's node "
                          "sees.") from None


def remove_url_file(path: Path, api_url: str, workers: int = 1) -> None:
    """The server stopped: its URL file goes (only if it is still this server's)."""
    try:
        if path.read_text() == url_file_text(api_url, workers):
            path.unlink()
    except OSError:
        pass


def add_database_commands(sub) -> None:
    d = sub.add_parser("db", help="Prefect's database: its URL, and a check before a pipeline")
    dsub = d.add_subparsers(dest="db_command", required=True)
    u = dsub.add_parser("url", help="print the database URL a Prefect server started now would "
                                    "use (password hidden), or build a PostgreSQL one with --host")
    u.add_argument("--host", help="build a postgresql+asyncpg URL for this database host")
    u.add_argument("--port", type=int, default=5432)
    u.add_argument("--user", default="prefect")
    u.add_argument("--db", default="prefect", help="database name (default: prefect)")
    u.add_argument("--password", help="(visible to other users in ps: prefer --password-file, "
                                      "$ASKAP_PG_PASSWORD or $PGPASSWORD)")
    u.add_argument("--password-file", help="file holding the password (e.g. DIR/password of "
                                           "scripts/postgres_database.sh)")
    u.add_argument("--show-password", action="store_true", help="print the password too")
    u.add_argument("--export", action="store_true",
                   help="print 'export NAME=URL' lines (with the password) for eval")
    u.set_defaults(func=cmd_db_url)
    c = dsub.add_parser("check", help="check the database (or a server's) before a pipeline: "
                                      "reachable, right schema, not sqlite at high concurrency; "
                                      "print the pool settings a server would get")
    c.add_argument("--database-url", help="default: the configured one (askap-flows db url)")
    c.add_argument("--api-url", help="check this Prefect server and its database instead")
    c.add_argument("--max-concurrent", type=int, default=4, metavar="K",
                   help="planned concurrent sub-flows (default: 4)")
    c.add_argument("--timeout", type=float, default=5.0, help="connect timeout, s (default: 5)")
    c.set_defaults(func=cmd_db_check)
    s = sub.add_parser("server", help="run a Prefect server (UI and API) in the foreground against "
                                      "the chosen database, with pools sized for --max-concurrent")
    s.add_argument("--database-url", help="a URL without a password (one with a password is "
                                           "refused: ps shows it); default: the configured one "
                                           "(askap-flows db url)")
    s.add_argument("--database-url-file", metavar="FILE",
                   help="read the database URL from FILE (mode 0600: readable by you only)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on and to print (default: 127.0.0.1, this node only)")
    s.add_argument("--interface", metavar="IF", help="listen on IF's IPv4 address (e.g. ib0)")
    s.add_argument("--port", type=int, default=4200,
                   help="default: 4200; 0: any free port (see --url-file)")
    s.add_argument("--max-concurrent", type=int, default=4, metavar="K",
                   help="sub-flows the pipelines will run at once, for pool sizing (default: 4)")
    s.add_argument("--max-connections", type=int, default=100, metavar="N",
                   help="the database's max_connections, for pool sizing (default: 100, "
                        "PostgreSQL's; scripts/postgres_database.sh sets --max-connections)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="API worker processes (default: 1). N > 1 (Prefect 3, PostgreSQL): the "
                        "API in N processes, its services in another, and a private Redis "
                        "between them (redis-server, prefect-redis)")
    s.add_argument("--url-file", metavar="FILE",
                   help="once the server answers, write 'export PREFECT_API_URL=URL' to FILE "
                        "(a pipeline job waits for it and sources it); removed when it stops")
    s.add_argument("--home", help="PREFECT_HOME of the server (default: $PREFECT_HOME, else "
                                  "./.askap_flows/prefect3, prefect2 under Prefect 2)")
    s.set_defaults(func=cmd_server)
