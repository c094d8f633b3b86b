"""What the command shows on stderr: a live progress line on a terminal, log lines elsewhere."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from async_registrar import UploadProgress
from async_registrar._console import Console, ProgressDisplay, _status, configure_logging

MiB = 1024 * 1024


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress(
    artifact: str, read: int, *, done: bool = False, total: int = 100 * MiB, uploaded: int | None = None
) -> UploadProgress:
    """`read` of `total` input bytes archived one for one (as a prebuilt archive), half of it (or
    `uploaded`) acknowledged by S3."""
    return UploadProgress(
        artifact=artifact,
        uri=f"s3://b/{artifact}.tar.gz",
        bytes_read=read,
        bytes_uploaded=read // 2 if uploaded is None else uploaded,
        parts_done=read // (8 * MiB),
        elapsed=2.0,
        done=done,
        bytes_total=total,
        bytes_archived=read,
    )


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_terminal_gets_a_live_line_that_log_records_step_around(monkeypatch: pytest.MonkeyPatch) -> None:
    """The status line is drawn in place; a log record clears it, prints, and redraws it;
    a finished upload leaves the line and is logged; nothing is left drawn at the end."""
    monkeypatch.setenv("COLUMNS", "200")
    stream = Terminal()
    console = configure_logging("INFO", stream)
    assert console.live
    display = ProgressDisplay(console, refresh=0)
    display(progress("model", 25 * MiB))
    display(progress("payload", 50 * MiB, total=50 * MiB))
    logging.getLogger("async_registrar.test").info("a record")
    display(progress("model", 100 * MiB, done=True))
    display(progress("payload", 50 * MiB, done=True, total=50 * MiB))
    pieces = stream.getvalue().split("\r\x1b[K")  # each piece follows an erase of the line
    model = "model [##------------------]  12% 12/100 MiB, 6 MiB/s"
    payload = "payload [##########----------]  50% 25/50 MiB, 12 MiB/s"
    assert pieces[:2] == [model, f"{model}  {payload}"]
    assert pieces[2].endswith(f"INFO async_registrar.test: a record\n{model}  {payload}")
    done = "INFO async_registrar.cli: payload: 25.0 MiB uploaded in 2.0 s, 6 part(s), 12.5 MiB/s (done)\n"
    assert pieces[-1].endswith(done)  # the last record, with nothing drawn after it
    assert "model: 50.0 MiB uploaded in 2.0 s, 12 part(s), 25.0 MiB/s (done)\n" in pieces[-2]


def test_closing_takes_away_the_line_of_an_upload_that_never_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed or interrupted upload sends no 'done': closing the display erases its line, and
    the records after it (the error, the cleanup) no longer bring it back."""
    monkeypatch.setenv("COLUMNS", "200")
    stream = Terminal()
    display = ProgressDisplay(configure_logging("INFO", stream), refresh=0)
    display(progress("model", 25 * MiB))
    display.close()
    logging.getLogger("async_registrar.test").warning("cleaning up")
    out = stream.getvalue()
    assert out.startswith("model [##---")
    assert out.split("\r\x1b[K")[1].endswith("WARNING async_registrar.test: cleaning up\n")


def test_a_narrow_terminal_gets_the_line_cut_to_its_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "30")
    stream = Terminal()
    ProgressDisplay(configure_logging("INFO", stream), refresh=0)(progress("model", 25 * MiB))
    assert stream.getvalue() == "model [##------------------]  12% 12/100 MiB, 6 MiB/s"[:29]


def test_elsewhere_upload_progress_is_a_log_line_every_few_seconds() -> None:
    """Off a terminal: no control characters; progress logged at most every `interval`, and when done."""
    stream = io.StringIO()
    console = configure_logging("INFO", stream)
    assert not console.live
    display = ProgressDisplay(console, interval=3600)
    for read in range(0, 100 * MiB, 8 * MiB):
        display(progress("model", read))
    display(progress("model", 100 * MiB, done=True))
    out = stream.getvalue()
    assert "\r" not in out
    assert "\x1b" not in out
    assert out.count("model:") == 1
    assert "(done)" in out


def test_quiet_logging_keeps_a_terminal_quiet() -> None:
    """--log-level WARNING on a terminal: no live line either."""
    stream = Terminal()
    display = ProgressDisplay(configure_logging("WARNING", stream), refresh=0)
    display(progress("model", 10 * MiB))
    display(progress("model", 100 * MiB, done=True))
    assert stream.getvalue() == ""


def test_a_console_that_is_not_live_ignores_status() -> None:
    stream = io.StringIO()
    Console(stream, live=False).set_status("model [###]")
    assert stream.getvalue() == ""


def test_the_bar_follows_what_s3_acknowledged_not_what_was_read() -> None:
    """All the input read, three 8 MiB parts still in flight: the bar is not at 100% yet; it is
    100% only once the upload says done.  A directory compressed to half: the share is of the
    expected archive, not of the input."""
    in_flight = progress("model", 100 * MiB, uploaded=76 * MiB)
    assert in_flight.fraction == pytest.approx(0.76)
    assert "  76% 76/100 MiB" in _status(in_flight)
    nearly = progress("model", 100 * MiB, uploaded=100 * MiB - 1)
    assert nearly.fraction < 1
    compressed = UploadProgress(
        artifact="model",
        uri="s3://b/model.tar.gz",
        bytes_read=40 * MiB,
        bytes_uploaded=10 * MiB,
        parts_done=1,
        elapsed=1.0,
        done=False,
        bytes_total=100 * MiB,
        bytes_archived=20 * MiB,
    )
    assert compressed.archive_estimate == 50 * MiB
    assert compressed.fraction == pytest.approx(0.2)
    assert progress("model", 100 * MiB, done=True).fraction == 1.0
