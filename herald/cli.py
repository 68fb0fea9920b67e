"""``herald``: the operator's command line, for what Airflow's own CLI does not cover.

Each sub-command is a thin wrapper over a function of the package; the function is what tests call.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from herald.config import PROJECT_ROOT


def _cmd_settings_apply(args: argparse.Namespace) -> int:
    from herald.airflow_settings import SettingsFileError, apply_settings_file

    try:
        report = apply_settings_file(args.path, dry_run=args.dry_run)
    except SettingsFileError as exc:
        print(f"herald settings apply: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0


def _cmd_db_migrate(args: argparse.Namespace) -> int:
    from herald import db, services

    with services.ensure_services(need_redis=False) as found:
        with db.connection(found.database_url) as conn:
            applied = db.migrate(conn)
    if applied:
        for version in applied:
            print(f"applied {version}")
    else:
        print("database is up to date")
    return 0


def _cmd_demo_seed(args: argparse.Namespace) -> int:
    from herald import db, services, workload

    with services.ensure_services(need_redis=False) as found:
        with db.connection(found.database_url) as conn:
            db.migrate(conn)
            spec = workload.WorkloadSpec(users=args.users, triggers=args.triggers, seed=args.seed,
                                         email_every=args.email_every)
            summary = workload.seed(conn, spec, reset=args.reset)
    print(summary)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from herald import bench

    return bench.main(args)


def _cmd_stats(args: argparse.Namespace) -> int:
    import psycopg

    from herald import stats

    try:
        return stats.main(args)
    except psycopg.errors.UndefinedTable as exc:
        print(f"herald stats: the notifications database is not migrated ({exc.diag.message_primary}); "
              "run `herald db migrate` first", file=sys.stderr)
        return 2


def _cmd_verify(args: argparse.Namespace) -> int:
    import psycopg

    from herald import verify

    try:
        return verify.main(args)
    except psycopg.errors.UndefinedTable as exc:
        print(f"herald verify: the notifications database is not migrated ({exc.diag.message_primary}); "
              "run `herald db migrate` first", file=sys.stderr)
        return 2


def _cmd_up(args: argparse.Namespace) -> int:
    from herald import up

    return up.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herald", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    settings = sub.add_parser("settings", help="Airflow connections, pools and variables")
    settings_sub = settings.add_subparsers(dest="action", required=True)
    apply = settings_sub.add_parser("apply", help="apply airflow_settings.yaml to the configured Airflow")
    apply.add_argument("path", nargs="?", default=str(PROJECT_ROOT / "airflow_settings.yaml"))
    apply.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")
    apply.set_defaults(func=_cmd_settings_apply)

    dbp = sub.add_parser("db", help="the notifications database")
    db_sub = dbp.add_subparsers(dest="action", required=True)
    migrate = db_sub.add_parser("migrate", help="apply include/sql/migrations in order")
    migrate.set_defaults(func=_cmd_db_migrate)

    demo = sub.add_parser("demo", help="demo data")
    demo_sub = demo.add_subparsers(dest="action", required=True)
    seed = demo_sub.add_parser("seed", help="load a deterministic demo data set (W1 shape by default)")
    seed.add_argument("--users", type=int, default=5_000)
    seed.add_argument("--triggers", type=int, default=1_000)
    seed.add_argument("--seed", type=int, default=1)
    seed.add_argument("--reset", action="store_true", help="empty the contract tables first")
    seed.add_argument("--email-every", type=int, default=0, metavar="N",
                      help="give one user in N an email channel (user<id>@example.test), for notification_delivery")
    seed.set_defaults(func=_cmd_demo_seed)

    bench = sub.add_parser("bench", help="benchmark W1: COPY floor, processing core, reference")
    from herald.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    stats = sub.add_parser("stats", help="the notification queue at a glance")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=_cmd_stats)

    verify = sub.add_parser("verify", help="check the invariants on the live database; exit 1 on a violation")
    from herald.verify import add_arguments as add_verify_arguments

    add_verify_arguments(verify)
    verify.set_defaults(func=_cmd_verify)

    up = sub.add_parser("up", help="services, migrations, settings, demo data, then Airflow (standalone or Celery)")
    up.add_argument("--executor", choices=("local", "celery"), default="local",
                    help="local: `airflow standalone` (LocalExecutor, default); celery: api-server, scheduler, "
                         "dag-processor, triggerer and an urgent and a default Celery worker")
    up.add_argument("--no-airflow", action="store_true", help="prepare everything but do not start Airflow")
    up.add_argument("--no-seed", action="store_true", help="do not load demo data")
    up.set_defaults(func=_cmd_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
