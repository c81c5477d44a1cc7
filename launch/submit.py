"""Run jobs on a Ray cluster through its Jobs API.

    python launch/submit.py --address http://head:8265 train -- experiment=smoke run.num_workers=4
    python launch/submit.py --address http://head:8265 list
    python launch/submit.py --address http://head:8265 logs  <submission-id> [--follow]
    python launch/submit.py --address http://head:8265 stop  <submission-id>

Everything after the job kind (and an optional `--`) is passed to `launch/<kind>.py` unchanged.
Before the job is submitted, a small preflight job runs the script's config check on the cluster
and has every node write and read back the configured storage (--no-preflight skips it).
The token of a cluster with token authentication is read from --token-file, RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. Exit status: the job's (0 when it succeeded), 2 for a
problem found before submission, 124 when --timeout stopped the job, 130 when detached with Ctrl-C.
"""

import argparse
import re
import sys

from framework.config import ConfigError
from framework.submit.client import connect, describe_end, exit_code, follow, format_jobs, stop
from framework.submit.jobs import JOB_KINDS, JobTimeout, SubmitError
from framework.submit.preflight import preflight
from framework.submit.submission import submit


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="the head's dashboard URL (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")
    parser.add_argument("--token-file", help="file holding the cluster's auth token (default: as Ray looks it up)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for kind in JOB_KINDS:
        job = commands.add_parser(kind, help=f"run launch/{kind}.py on the cluster; then follow its logs")
        job.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
        job.add_argument("--timeout", type=float, help="stop the job if it is still running after this many seconds")
        job.add_argument("--python", default="python", help="the interpreter on the cluster (default: python)")
        job.add_argument(
            "--no-preflight", action="store_true", help="skip the config check and storage probe on the cluster"
        )
        job.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides, passed on unchanged")

    commands.add_parser("list", help="jobs submitted to the cluster, oldest first")
    for name, text in (("status", "a job's status"), ("stop", "stop a job and wait until it has")):
        commands.add_parser(name, help=text).add_argument("submission_id")
    logs = commands.add_parser("logs", help="a job's logs so far")
    logs.add_argument("submission_id")
    logs.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    # Runs on the cluster, as the small job that submitting starts before the real one.
    check = commands.add_parser("preflight", help="(runs on the cluster) check a job's config and storage")
    check.add_argument("kind", choices=JOB_KINDS)
    check.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if getattr(args, "overrides", None) and args.overrides[0] == "--":
        args.overrides = args.overrides[1:]
    return args


def run(args) -> int:
    if args.command == "preflight":
        problems = preflight(args.kind, args.overrides)
        print("\n".join(problems) or "preflight: config and storage are fine")
        return 3 if problems else 0

    client = connect(args.address, args.token_file)
    if args.command in JOB_KINDS:
        job_id = submit(
            client, args.command, args.overrides, python=args.python, preflight=not args.no_preflight
        )
        print(f"submit: submitted {job_id}", file=sys.stderr)
        args.submission_id = job_id  # named by the Ctrl-C message
        if args.no_wait:
            print(job_id)
            return 0
        return finish(client, follow(client, job_id, args.timeout))
    if args.command == "list":
        print(format_jobs(client.list_jobs()))
        return 0
    if args.command == "logs" and args.follow:
        return finish(client, follow(client, args.submission_id))
    if args.command == "logs":
        print(client.get_job_logs(args.submission_id), end="")
        return 0
    if args.command == "stop":
        return finish(client, stop(client, args.submission_id), ok_statuses=("STOPPED", "SUCCEEDED", "FAILED"))
    info = client.get_job_info(args.submission_id)
    # `status` of a job still running is not a failure; of a finished one, it is the job's own.
    return finish(client, info, ok_statuses=("SUCCEEDED",) if info.status.is_terminal() else (str(info.status),))


def finish(client, info, ok_statuses=("SUCCEEDED",)) -> int:
    logs = client.get_job_logs(info.submission_id) if info.status == "FAILED" else ""
    print(describe_end(info, logs), file=sys.stderr)
    return 0 if str(info.status) in ok_statuses else exit_code(info)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (ConfigError, SubmitError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 124 if isinstance(exc, JobTimeout) else 2
    except KeyboardInterrupt:
        job = getattr(args, "submission_id", None) or "the job"
        print(f"\nsubmit: detached; {job} keeps running (see `list`, `logs --follow`, `stop`)", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        # The Jobs client reports an unknown id or a refused request as a RuntimeError with the HTTP body.
        message = re.sub(r"^Request failed with status code \d+: ", "", str(exc).strip().splitlines()[0])
        print(f"SubmitError: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
