"""The command line: `async-registrar register | check | sweep | demo | upload | mims-server`.

This is the only module that prints, exits, installs signal handlers and
configures logging.  stdout carries exactly the two result lines of the
original script; everything else goes to stderr.

Exit codes: 0 registered; 2 usage or invalid configuration; 3 bad input
artifacts or metadata; 4 storage (S3) failure; 5 registration rejected or
failed; 6 timed out waiting (also when the registry stayed unreachable until
then); 130 interrupted (SIGINT); 143 terminated (SIGTERM); 1 an unexpected error
(a bug: please report it).  Once the registry has accepted a registration, an
exit before it is final keeps its artifacts and says so on stderr, with how to
resume it (re-run with the same MODS_WORKFLOW_EXECUTION_ID).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import re
import signal
import sys
import tempfile
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import anyio
import anyio.to_thread

from ._concurrency import first_error
from ._console import ProgressDisplay, configure_logging
from ._errors import (
    REMOVE_BY_HAND,
    AcceptedRegistration,
    ConfigurationError,
    InputError,
    RegistrarError,
    RegistrationInterrupted,
    RegistryError,
    StorageError,
    out_of_descriptors,
    redact,
)
from ._s3 import S3Location
from ._settings import OPTIONS, JobInputs, Settings, describe_source, environment_value
from ._version import __version__

if TYPE_CHECKING:  # the registrar (HTTP client, retries) is imported by the commands that use it
    from ._progress import ProgressEvent
    from ._registrar import RegistrationResult
    from ._request import RegistrationRequest
    from ._results import RegionRegistration

__all__ = ["main"]

log = logging.getLogger("async_registrar.cli")

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_STORAGE = 4
EXIT_REGISTRY = 5
EXIT_TIMEOUT = 6
#: The command did its work but could not write its result on stdout (the reader of the pipe
#: went away, a full disk): Python's own exit code for an unwritable stdout.
EXIT_RESULT_UNWRITTEN = 120

#: Where SageMaker looks for a job's failure reason (its first 1 KB is shown).
SAGEMAKER_OUTPUT = "/opt/ml/output"

ARN_LINE = "Workflow execution arn for model registration process: {}"
MODEL_LINE = "Model id for model being registered: {}"


def exit_code(error: BaseException) -> int:
    """The documented exit code of an error."""
    for kind, code in (
        (ConfigurationError, EXIT_USAGE),
        (InputError, EXIT_INPUT),
        (StorageError, EXIT_STORAGE),
        (RegistrationInterrupted, EXIT_TIMEOUT),  # accepted, not seen to finish: kept (a timeout is one)
        (RegistryError, EXIT_REGISTRY),
    ):
        if isinstance(error, kind):
            return code
    return EXIT_UNEXPECTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _usage_error(exc, sys.argv[1:] if argv is None else list(argv))
    console = configure_logging(args.log_level, sys.stderr, args.log_format)
    if args.foreground:  # uvicorn runs its own loop and handles signals itself
        return _mims_server(args)
    command: Callable[[argparse.Namespace], Awaitable[int]] = args.command
    args.progress = ProgressDisplay(console)
    json_lines = args.log_format == "json"
    stopped = _STOPPED_CLEAN.get(command, "no temporary object was left behind, run again to register")
    code = _run(lambda: command(args), args.progress, json_lines=json_lines, clean=stopped)
    if json_lines:  # a log pipeline sees how the command ended, whatever it was
        log.info("exit %d", code, extra={"fields": {"event": "exit", "exit_code": code}})
    return code


# --- commands -------------------------------------------------------------------------


async def _register(args: argparse.Namespace) -> int:
    settings, request = await _job(args)
    return await _registration(settings, request, args.progress)


async def _check(args: argparse.Namespace) -> int:
    """Validation and preflight, no upload: print the plan (stdout), exit as `register` would."""
    from ._registrar import Registrar

    settings, request = await _job(args)
    async with Registrar(settings) as registrar:
        plan = await registrar.check(request)
    _write_result(*plan.lines())
    return EXIT_OK


async def _sweep(args: argparse.Namespace) -> int:
    """Remove stale runs under the prefix (or, with --install-lifecycle, add the bucket rule)."""
    from ._registrar import Registrar

    # The lifecycle rule is the bucket's alone: no registry is asked, none is needed.
    settings = Settings.from_env(
        s3_bucket=args.bucket,
        s3_prefix=args.prefix,
        mims_endpoint=args.mims_endpoint,
        registry=not args.install_lifecycle,
    )
    async with Registrar(settings) as registrar:
        if args.install_lifecycle:
            rule = await registrar.install_lifecycle(
                abort_after_days=args.abort_after_days,
                expire_after_days=args.expire_after_days,
                region=(args.region or [None])[0],
                dry_run=args.dry_run,
            )
            _write_result(json.dumps(rule, indent=2))
            return EXIT_OK
        report = await registrar.sweep(
            older_than=args.older_than, max_age=args.max_age, dry_run=args.dry_run, regions=args.region or ()
        )
    _write_result(*report.lines())
    if report.leftovers:
        log.error("could not remove everything; %s", REMOVE_BY_HAND)
        return EXIT_STORAGE
    return EXIT_OK


def _duration(value: str) -> float:
    """`0s`, `90m`, `24h`, `7d` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if not match:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration; use a number with s, m, h or d (e.g. 24h)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


async def _job(args: argparse.Namespace) -> tuple[Settings, RegistrationRequest]:
    """The settings and the request of `register` and `check`, from the options and the environment."""
    problems: list[str] = []  # of the settings and the job's inputs: every one at once
    try:
        settings = Settings.from_env(
            s3_bucket=args.bucket,
            s3_prefix=args.prefix,
            mims_endpoint=args.mims_endpoint,
            wait_timeout=args.wait_timeout,
            dereference=args.dereference or None,
        )
    except ConfigurationError as exc:
        problems += exc.problems
    try:
        inputs = JobInputs.from_env(
            model_path=args.model,
            model_local_copy=args.model_local_copy,
            payload_path=args.payload,
            config_path=args.config,
            metadata_path=args.metadata,
        )
    except ConfigurationError as exc:
        problems += exc.problems
    if problems:
        raise ConfigurationError("invalid settings; fix each and run again:", problems)
    from ._request import RegistrationRequest

    return settings, await RegistrationRequest.from_job(inputs)


async def _demo(args: argparse.Namespace) -> int:
    with _needs_extra("local", "`async-registrar demo`"):
        from ._local import LocalStack, example_request

    from ._example import checkout_example, materialize, packaged_example

    with tempfile.TemporaryDirectory(prefix="async-registrar-demo-") as scratch:
        example = args.example or checkout_example()
        if example is None:  # an installed copy: its example's files, and weights made here
            files = packaged_example()
            if files is None:
                raise ConfigurationError(
                    "this installation carries no example; pass --example DIR (a directory with model/, "
                    "payload/ and registration.json)"
                )
            example = await anyio.to_thread.run_sync(materialize, files, Path(scratch) / "demo")
            log.info("demo: the example model, with generated weights, in %s", example)
        request = await example_request(example)
        with LocalStack() as stack:
            log.info("demo: S3 at %s, reference MIMS at %s", stack.s3_endpoint, stack.mims_endpoint)
            code = await _registration(stack.registrar_settings(), request, args.progress)
            if code == EXIT_OK:
                for line in await stack.describe_registry():
                    log.info("demo: %s", line)
            return code


async def _upload(args: argparse.Namespace) -> int:
    from ._registrar import Registrar

    try:
        target = S3Location.parse_object(args.target, what="upload target")
    except InputError as exc:  # an argument of the command: a usage error (exit 2)
        raise ConfigurationError(exc.message) from None
    # The engine alone: no registry, so no endpoint is needed.
    settings = Settings.from_env(s3_bucket=target.bucket, registry=False, dereference=args.dereference or None)
    async with Registrar(settings, on_progress=args.progress) as registrar:
        uploaded = await registrar.upload(args.path, args.target)
    _write_result(f"{uploaded.uri} {uploaded.size} {uploaded.sha256} {uploaded.integrity}")
    return EXIT_OK


#: What a command other than a registration says when a signal stopped it cleanly.
_STOPPED_CLEAN: dict[Callable[[argparse.Namespace], Awaitable[int]], str] = {
    _upload: "the multipart upload was aborted (unless it had just completed: see the log); run it again",
    _sweep: "the sweep was stopped before its end; run it again",
    _check: "nothing was uploaded",
}


def _mims_server(args: argparse.Namespace) -> int:
    try:
        with _needs_extra("mims", "`async-registrar mims-server`"):
            from .reference_mims import ReferenceMimsSettings, serve

        settings = ReferenceMimsSettings.from_env(registry_bucket=args.registry_bucket)
    except ConfigurationError as exc:
        _report(exc.message, exc, EXIT_USAGE, args.log_format == "json")
        return EXIT_USAGE
    serve(settings, host=args.host, port=args.port)
    return EXIT_OK


#: The modules each extra brings (their absence means the extra is not installed).
_EXTRA_MODULES = {
    "mims": {"starlette", "uvicorn"},
    "local": {"moto", "werkzeug", "flask", "starlette", "uvicorn", "boto3"},
}


@contextlib.contextmanager
def _needs_extra(extra: str, what: str) -> Iterator[None]:
    """Turn the import error of a missing extra into a usage error (exit 2) saying what to install."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _EXTRA_MODULES[extra]:
            raise
        raise ConfigurationError(
            f"{what} needs the '{extra}' extra, which is not installed (no module {(exc.name or '').split('.')[0]!r}); "
            f"install it: pip install 'async-registrar[{extra}]' (from a checkout: pip install '.[{extra}]')"
        ) from None


async def _registration(settings: Settings, request: RegistrationRequest, progress: ProgressDisplay) -> int:
    from ._progress import RegistrationSucceeded
    from ._registrar import Registrar

    # The two lines go out as soon as the registration is SUCCEEDED, before the cleanup: a
    # process killed while it removes the temporary objects has printed its result.
    unwritten: list[_ResultUnwritten] = []  # stdout refused them: exit 120 once the run is over

    def print_when_succeeded(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationSucceeded) and not (progress.registered or unwritten):
            try:
                _write_registrations(event.registrations)
            except _ResultUnwritten as exc:
                unwritten.append(exc)
            else:
                progress.registered = True

    async with Registrar(settings, on_progress=progress) as registrar:
        result = await registrar.register(request, on_progress=print_when_succeeded)
    # Registered: that stands even if some temporary objects could not be removed (the run
    # logged each one as a warning).
    _log_result(result)
    if unwritten:
        raise unwritten[0]
    if not progress.registered:  # should the event not have come, the result still says it
        _write_registrations(result.registrations)
    return EXIT_OK


class _ResultUnwritten(Exception):
    """stdout refused the command's result lines: the work is done, its report is lost."""


def _write_result(*lines: str) -> None:
    """The command's result lines on stdout, flushed; a stdout that refuses them (a closed pipe,
    a full disk, a closed stream) is `_ResultUnwritten`, exit 120, not a bug."""
    try:
        print(*lines, sep="\n", flush=True)
    except (OSError, ValueError) as exc:
        raise _ResultUnwritten(f"{type(exc).__name__}: {exc}") from exc


def _log_result(result: RegistrationResult) -> None:
    """One log line for a registration done: what, and how long each phase took."""
    log.info(
        "registered %s in %.1f s (upload %.1f s, registry %.1f s)",
        ", ".join(f"{r.model_id} ({r.region})" for r in result.registrations),
        result.timings.get("total", 0.0),
        result.timings.get("upload", 0.0),
        result.timings.get("register", 0.0),
    )


def _write_registrations(registrations: Sequence[RegionRegistration]) -> None:
    """The original's two lines; with several regions, the two lines once per region, in order."""
    _write_result(
        *(
            line
            for registration in registrations
            for line in (ARN_LINE.format(registration.workflow_execution_arn), MODEL_LINE.format(registration.model_id))
        )
    )


# --- running, signals, exit codes -----------------------------------------------------


def _stopping_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop the command: SIGTERM, and SIGINT unless the process started with it
    ignored (a background job of a script: the terminal's Ctrl-C is not for it), as Python and
    POSIX tools keep it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return (signal.SIGTERM,)
    return (signal.SIGTERM, signal.SIGINT)


def _ignore_stopping_signals() -> None:
    """From here on SIGINT and SIGTERM are ignored: the work is over (the first signal already
    decided the exit code), and a signal must not kill the process before it reports."""
    if threading.current_thread() is threading.main_thread():
        for signum in _stopping_signals():
            signal.signal(signum, signal.SIG_IGN)


def _run(
    command: Callable[[], Awaitable[int]],
    progress: ProgressDisplay,
    *,
    json_lines: bool = False,
    clean: str = "no temporary object was left behind, run again to register",
) -> int:
    """Run `command` under signal handling; map its outcome to an exit code. The error is said
    on stderr: `error: ...` lines, or (`json_lines`) one ERROR record with the exit code.
    `clean` says what a signal that stopped it cleanly left (nothing kept, nothing left over)."""
    received: list[int] = []

    async def guarded() -> int:
        from ._credentials import credential_errors

        # Credentials failing in a call no narrower handler covered: their ConfigurationError.
        with credential_errors(), first_error():
            return await _guarded()

    async def _guarded() -> int:
        code = EXIT_UNEXPECTED
        async with anyio.create_task_group() as tg:
            work = anyio.CancelScope()

            async def watch_signals() -> None:
                try:
                    with anyio.open_signal_receiver(*_stopping_signals()) as signals:
                        async for signum in signals:
                            name = signal.Signals(signum).name
                            if not received:
                                received.append(signum)
                                log.warning("%s received: stopping and cleaning up", name)
                                work.cancel()
                            else:
                                log.warning("%s received again: still cleaning up (bounded), please wait", name)
                finally:
                    # The receiver gives the signals their default action back (SIGTERM's ends the
                    # process) as it closes: the work is over, what is left is to report it.
                    _ignore_stopping_signals()

            tg.start_soon(watch_signals)
            try:
                with work:
                    code = await command()
            finally:
                tg.cancel_scope.cancel()
        return code

    try:
        try:
            code = anyio.run(guarded)
        finally:
            progress.close()  # a failed or interrupted upload leaves no progress line behind
            _ignore_stopping_signals()  # the work is over: what is left is to report it
    except _ResultUnwritten as exc:
        code = EXIT_RESULT_UNWRITTEN
        _report(
            f"done, but the result could not be written on stdout ({exc}): did its reader go away?",
            exc,
            code,
            json_lines,
        )
    except RegistrarError as exc:
        if progress.registered:  # registered stands: what went wrong after is a warning
            log.warning("registered (its lines are on stdout), but then: %s", exc.message)
            return EXIT_OK
        code = exit_code(exc)
        _report(exc.message, exc, code, json_lines, kept=_kept_summary(exc.kept, exc.resume_hint))
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):  # in a library's code
            code = EXIT_USAGE
            _report(out_of_descriptors("a file or connection could not be opened", exc).message, exc, code, json_lines)
        else:
            log.exception("unexpected error")
            code = EXIT_UNEXPECTED
            _report(f"unexpected error: {type(exc).__name__}: {exc}", exc, code, json_lines)
    if received:
        signum = received[0]
        name = signal.Signals(signum).name
        if progress.registered:  # the signal came during the cleanup, which ran to its end (shielded)
            left = f"; could not remove everything, {REMOVE_BY_HAND} {', '.join(progress.leftovers)}"
            log.warning(
                "%s received once the registration had succeeded (its lines are on stdout): the cleanup ran to "
                "its end%s",
                name,
                left if progress.leftovers else "",
            )
            return EXIT_OK
        code = 128 + signum
        stopped = f"{'interrupted' if signum == signal.SIGINT else 'terminated'} by {name}"
        if progress.kept:
            kept = progress.kept[-1]
            lines = [r.describe() for r in kept.registrations] or [f"kept {', '.join(kept.prefixes)}"]
            _say_error([f"{stopped}:", *lines, kept.resume_hint], code, json_lines)
            _write_exit_message(f"{stopped}; {_kept_summary(kept.registrations, kept.resume_hint)}")
        elif progress.leftovers:
            left = f"{stopped}; could not remove everything, {REMOVE_BY_HAND} {', '.join(progress.leftovers)}"
            _say_error([left], code, json_lines)
            _write_exit_message(left)
        elif followed := progress.followed_unfinished():
            # Made by another run of these inputs, it reads that run's artifacts: it goes on.
            lines = [
                f"{stopped}; no temporary object was left behind, and the registration it followed goes on:",
                *followed,
                "a re-run with the same lineage id (or key) and inputs follows it to its end",
            ]
            _say_error(lines, code, json_lines)
            _write_exit_message("; ".join(lines))
        else:
            done = f"{stopped}; {clean}"
            _say_error([done], code, json_lines)
            _write_exit_message(done)
    return code


def _say_error(lines: Sequence[str], code: int, json_lines: bool) -> None:
    """The command's last word on stderr: `error: ` and the lines, or one JSON ERROR record."""
    if json_lines:
        log.error("%s", "\n".join(lines), extra={"fields": {"event": "error", "exit_code": code}})
    else:
        with contextlib.suppress(OSError, ValueError):  # stderr's reader gone: the exit code still tells
            print(f"error: {lines[0]}", *lines[1:], sep="\n", file=sys.stderr)


def _kept_summary(kept: Sequence[AcceptedRegistration], hint: str | None) -> str | None:
    """One line on what was kept for the registry, for the exit message."""
    if not kept:
        return None
    names = ", ".join(f"{r.registration_id} ({r.region}, {r.status}) under {r.kept_prefix}" for r in kept)
    return f"registration {names} kept for the registry; {hint}"


def _report(message: str, exc: BaseException, code: int, json_lines: bool, *, kept: str | None = None) -> None:
    notes = [redact(note) for note in getattr(exc, "__notes__", [])]
    # The message file first: SageMaker shows it, and stderr's reader may have gone away.
    _write_exit_message(_one_line(message) + (f"; {kept}" if kept else ""))
    _say_error([redact(message), *notes], code, json_lines)


def _one_line(message: str) -> str:
    """The message's first line; where that heads a list of problems ("...; fix each and run
    again:"), with the problems after it, since SageMaker shows this line alone (cut at 1024
    characters)."""
    lines = message.splitlines() or [""]
    problems = [line.strip()[2:] for line in lines[1:] if line.strip().startswith("- ")]
    if not (problems and lines[0].rstrip().endswith(":")):
        return lines[0]
    return f"{lines[0].rstrip().removesuffix(':')}: {'; '.join(problems)}"


def _write_exit_message(message: str) -> None:
    """Leave a one-line reason where SageMaker shows it (REGISTRAR_OUTPUT_DIR elsewhere), if that exists."""
    directory = Path(environment_value("REGISTRAR_OUTPUT_DIR") or SAGEMAKER_OUTPUT)
    if directory.is_dir():
        with contextlib.suppress(OSError):
            # A path that is not UTF-8 (kept by Python as surrogates) is written escaped.
            line = redact(message.splitlines()[0] if message else "")[:1024]
            (directory / "message").write_text(line + "\n", encoding="utf-8", errors="backslashreplace")


# --- arguments ------------------------------------------------------------------------


class _UsageError(Exception):
    """argparse found the command line wrong (raised instead of its `SystemExit`)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised, so it ends like any other failure: the message
    file for SageMaker, and in JSON mode an error record and the exit record."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


def _usage_error(exc: _UsageError, argv: Sequence[str]) -> int:
    message = f"{exc.parser.prog}: {exc.message}"
    _write_exit_message(f"{message} (see --help)")
    if _asked_log_format(argv) == "json":
        configure_logging("INFO", sys.stderr, "json")
        _say_error([message, "see --help"], EXIT_USAGE, True)
        log.info("exit %d", EXIT_USAGE, extra={"fields": {"event": "exit", "exit_code": EXIT_USAGE}})
    else:  # as argparse prints it
        with contextlib.suppress(OSError, ValueError):
            exc.parser.print_usage(sys.stderr)
            print(f"{exc.parser.prog}: error: {exc.message}", file=sys.stderr)
    return EXIT_USAGE


def _asked_log_format(argv: Sequence[str]) -> str:
    """The log format the command line or REGISTRAR_LOG_FORMAT asks for, if it is one (the
    command line could not be parsed); else text."""
    chosen = environment_value("REGISTRAR_LOG_FORMAT") or "text"
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            chosen = argv[i + 1]
        elif arg.startswith("--log-format="):
            chosen = arg.partition("=")[2]
    chosen = chosen.strip().lower()
    return chosen if chosen in LOG_FORMATS else "text"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="async-registrar",
        description=_text("Register a trained model with MIMS: stream its artifacts to S3, submit, wait, clean up."),
        epilog="Exit codes: 0 registered; 2 usage or configuration; 3 input artifacts or metadata; "
        "4 storage (S3); 5 registration rejected or failed; 6 timed out; 120 done, but stdout closed; "
        "130 SIGINT; 143 SIGTERM; 1 a bug.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default=environment_value("REGISTRAR_LOG_LEVEL") or "INFO",
        type=_log_level,
        metavar="LEVEL",
        help=f"logging on stderr: {', '.join(LOG_LEVELS)} (env REGISTRAR_LOG_LEVEL; default INFO)",
    )
    parser.add_argument(
        "--log-format",
        default=environment_value("REGISTRAR_LOG_FORMAT") or "text",
        type=_log_format,
        metavar="FORMAT",
        help="text (default), or json: one JSON object per line on stderr, with the run id, phase, region, "
        "artifact, registration id, bytes, parts, rate and exit code as fields (env REGISTRAR_LOG_FORMAT)",
    )
    parser.set_defaults(foreground=False)
    # The global options, accepted after the command too (where they win).
    common = _Parser(add_help=False)
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, type=_log_level, metavar="LEVEL", help=argparse.SUPPRESS
    )
    common.add_argument(
        "--log-format", default=argparse.SUPPRESS, type=_log_format, metavar="FORMAT", help=argparse.SUPPRESS
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    register = _command(
        commands,
        common,
        "register",
        help="register a model (the container's job)",
        description=(
            "Register a model with MIMS: check (preflight), stream the model and payload to S3 as "
            "tar.gz, submit, wait until the registration is final, remove the temporary objects. Prints the "
            "workflow execution ARN and the model id on stdout."
        ),
        epilog=(
            "async-registrar register --model ./model --payload ./payload --config ./registration.json \\\n"
            "      --bucket my-tmp-bucket --mims-endpoint https://mims.example.com",
            _JOB_VARIABLES,
        ),
        command=_register,
    )
    _job_options(register)
    check = _command(
        commands,
        common,
        "check",
        help="validate, run the preflight (credentials, bucket, registry) and print the plan; upload nothing",
        description=(
            "Everything `register` checks before its first upload, and the plan of what it would do. "
            "Same options, variables and exit codes as `register`; 0 when a registration would start."
        ),
        epilog=(
            "async-registrar check --model ./model --config ./registration.json --bucket my-tmp-bucket \\\n"
            "      --mims-endpoint https://mims.example.com",
            _JOB_VARIABLES,
        ),
        command=_check,
    )
    _job_options(check)

    sweep = _command(
        commands,
        common,
        "sweep",
        help="remove what killed runs left under the prefix (or install the bucket's lifecycle rule)",
        description=(
            "Remove the runs under {bucket}/{prefix} older than --older-than (by their newest object, open "
            "multipart upload or the start time in their attempt's name): their open uploads are aborted and "
            "their objects deleted, unless the registry reports their registration PENDING or IN_PROGRESS; a "
            "run whose registry cannot be asked is spared until --max-age. Prints what it saw, removed and "
            "spared. Nothing outside the prefix is touched. With --install-lifecycle: add (or replace) the "
            "bucket lifecycle rule for the prefix instead, keeping the bucket's other rules, and print it "
            "(with --dry-run: print it, write nothing)."
        ),
        epilog=(
            "async-registrar sweep --bucket my-tmp-bucket --mims-endpoint https://mims.example.com --older-than 24h",
            "REGISTRAR_S3_BUCKET, REGISTRAR_S3_PREFIX, REGISTRAR_MIMS_ENDPOINT, the standard AWS variables",
        ),
        command=_sweep,
    )
    _option(sweep, "s3_bucket", "NAME", "bucket of the temporary artifacts", "required")
    _option(sweep, "s3_prefix", "PREFIX", "prefix of the temporary artifacts", "registrar-tmp/")
    _option(sweep, "mims_endpoint", "URL", "the MIMS endpoint asked about kept registrations", "required")
    sweep.add_argument(
        "--older-than", type=_duration, default=24 * 3600.0, metavar="DURATION", help="e.g. 0s, 90m, 24h (default 24h)"
    )
    sweep.add_argument(
        "--max-age",
        type=_duration,
        default=7 * 86400.0,
        metavar="DURATION",
        help="a run whose registry cannot be asked is spared until this old (default 7d)",
    )
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="report what would be removed (or the lifecycle rule that would be installed); change nothing",
    )
    sweep.add_argument(
        "--region", action="append", metavar="REGION", help="with a {region} bucket name: a region to sweep"
    )
    sweep.add_argument(
        "--install-lifecycle", action="store_true", help="add the bucket lifecycle rule for the prefix instead"
    )
    sweep.add_argument("--abort-after-days", type=int, default=1, metavar="DAYS", help="(lifecycle) default 1")
    sweep.add_argument("--expire-after-days", type=int, default=7, metavar="DAYS", help="(lifecycle) default 7")

    demo = _command(
        commands,
        common,
        "demo",
        help="register the example model on an S3 server and the reference MIMS started in-process",
        description=(
            "Register the example model end to end on moto's S3 server and the reference MIMS, "
            "both started in this process on loopback (needs the 'local' extra). Nothing outside the process "
            "is touched."
        ),
        epilog=("async-registrar demo", "no variables needed: the servers and their credentials are made up"),
        command=_demo,
    )
    demo.add_argument(
        "--example",
        type=Path,
        default=None,
        metavar="DIR",
        help="the example directory (default: examples/demo of this checkout, or the example shipped with "
        "the package, its weights generated)",
    )

    upload = _command(
        commands,
        common,
        "upload",
        help="stream a directory (or .tar.gz) to S3 as tar.gz, nothing else",
        description=(
            "The upload engine alone: stream PATH to s3://bucket/key as a deterministic tar.gz "
            "(or a prebuilt .tar.gz as it is), no registry. Prints the URI, the size, the sha256 and the "
            "integrity the S3 server checked it by (crc32, crc64nvme, sigv4-payload, md5 or size-only)."
        ),
        epilog=(
            "async-registrar upload ./model s3://my-bucket/models/model.tar.gz",
            "AWS credentials and region from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_PROFILE, "
            "AWS_REGION, ...), AWS_ENDPOINT_URL_S3; the tuning variables of the README (REGISTRAR_PART_SIZE, "
            "REGISTRAR_COMPRESSION_LEVEL, REGISTRAR_S3_CHECKSUMS, ...); REGISTRAR_DEREFERENCE",
        ),
        command=_upload,
    )
    upload.add_argument("path", help="a directory, or a directory holding one .tar.gz")
    upload.add_argument("target", help="s3://bucket/key")
    _dereference_option(upload)

    server = _command(
        commands,
        common,
        "mims-server",
        help="run the reference MIMS service (S3 via the AWS variables)",
        description=(
            "Run the reference MIMS service (needs the 'mims' extra): it verifies SigV4 signatures, "
            "reads every artifact back from S3, checks and copies it, and moves registrations through their "
            "statuses. Its contract is served at /openapi.json."
        ),
        epilog=(
            "MIMS_SIGNING_KEY=AKID... MIMS_SIGNING_SECRET=... async-registrar mims-server --port 8080",
            "AWS credentials, region and AWS_ENDPOINT_URL_S3 for its S3; MIMS_REGISTRY_BUCKET; "
            "MIMS_SIGNING_KEY / MIMS_SIGNING_SECRET (signatures verified when set); see the README",
        ),
        command=None,
        foreground=True,
    )
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    server.add_argument(
        "--registry-bucket",
        default=None,
        help="where registered artifacts are copied (env MIMS_REGISTRY_BUCKET; default mims-registry)",
    )
    return parser


#: The variables of `register` and `check` besides their options' own.
_JOB_VARIABLES = (
    "MODS_WORKFLOW_EXECUTION_ID (lineage: a re-run resumes), PERFORMANCE_METADATA_PATH (s3://), "
    "REGISTRAR_IDEMPOTENCY_KEY, REGISTRAR_PREFLIGHT_TIMEOUT, REGISTRAR_LOG_LEVEL, REGISTRAR_LOG_FORMAT, "
    "the tuning variables of the README, and the standard AWS ones (credentials, AWS_REGION, AWS_ENDPOINT_URL_S3)"
)


def _command(
    commands: argparse._SubParsersAction[_Parser],
    common: _Parser,
    name: str,
    *,
    help: str,
    description: str,
    epilog: tuple[str, str],
    **defaults: object,
) -> argparse.ArgumentParser:
    """A command: its one-line help, a wrapped description, the epilog's example and variables (and
    the exit codes), the global options after it, and its defaults (what runs it)."""
    parser = commands.add_parser(
        name,
        parents=[common],
        help=help,
        description=_text(description),
        epilog=_epilog(*epilog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(**defaults)
    return parser


def _text(paragraph: str) -> str:
    """A help paragraph, wrapped (the raw formatter that keeps the examples' lines does not)."""
    return textwrap.fill(paragraph, width=92)


def _epilog(example: str, variables: str) -> str:
    wrapped = textwrap.fill(variables, width=92, initial_indent="  ", subsequent_indent="  ")
    return f"example:\n  {example}\n\nenvironment:\n{wrapped}\n\n{_EXIT_CODES}"


_EXIT_CODES = (
    "exit codes: 0 done; 2 usage or configuration; 3 input artifacts or metadata; 4 storage (S3);\n"
    "  5 registration rejected or failed; 6 timed out; 120 done, but stdout closed; 130 SIGINT;\n"
    "  143 SIGTERM; 1 a bug"
)


def _job_options(parser: argparse.ArgumentParser) -> None:
    """The options of `register` and `check`."""
    _option(
        parser,
        "model_path",
        "PATH",
        "the model directory, a directory holding one model.tar.gz, or the s3:// URI of a model.tar.gz "
        "(copied inside S3, not through this container)",
        "/opt/ml/processing/input/model",
    )
    _option(
        parser,
        "model_local_copy",
        "PATH",
        "a local copy of the model given by its s3:// URI (a mounted model.tar.gz, or a directory "
        "holding it): its sha256 is read here instead of from S3",
        "none",
    )
    _option(
        parser,
        "payload_path",
        "PATH",
        "payload samples (optional: absent means no payload)",
        "/opt/ml/processing/mims_payload",
    )
    _option(parser, "config_path", "PATH", "the registration configuration (JSON)", "/opt/ml/processing/config/config")
    _option(
        parser,
        "metadata_path",
        "PATH",
        "performance metadata, a JSON file or a directory holding one (optional)",
        "/opt/ml/processing/input/metadata",
    )
    _option(parser, "s3_bucket", "NAME", "bucket for the temporary artifacts", "required")
    _option(parser, "s3_prefix", "PREFIX", "prefix for the temporary artifacts", "registrar-tmp/")
    _option(parser, "mims_endpoint", "URL", "the MIMS endpoint", "required")
    _option(parser, "wait_timeout", "SECONDS", "how long to wait for the registration to finish", "3600", kind=float)
    _dereference_option(parser)


def _dereference_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dereference",
        action="store_true",
        default=False,
        help="follow symbolic links (archive each target's bytes under the link's name) and archive "
        "hard-linked files as regular files, as Hugging Face and DVC caches need (env REGISTRAR_DEREFERENCE)",
    )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(value: str) -> str:
    """A log level name, any case, surrounding blanks ignored (argparse applies it to the
    environment's default too, so a bad REGISTRAR_LOG_LEVEL is a usage error, exit 2)."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a log level (from --log-level or REGISTRAR_LOG_LEVEL); "
            f"use one of {', '.join(LOG_LEVELS)}"
        )
    return level


LOG_FORMATS = ("text", "json")


def _log_format(value: str) -> str:
    """`text` or `json`, any case (a bad REGISTRAR_LOG_FORMAT is a usage error, exit 2)."""
    chosen = value.strip().lower()
    if chosen not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a log format (from --log-format or REGISTRAR_LOG_FORMAT); use text or json"
        )
    return chosen


def _option(
    parser: argparse.ArgumentParser, field: str, metavar: str, help: str, default: str, *, kind: type = str
) -> None:
    """An option whose environment variable and default are shown in --help; env is read by Settings."""
    parser.add_argument(
        OPTIONS[field],
        dest=field.removeprefix("s3_").removesuffix("_path"),
        type=kind,
        default=None,
        metavar=metavar,
        help=f"{help} (env {describe_source(field)}; default {default})",
    )
