"""Progress bars (llmlab.progress.Bar and the trainer's Progress) draw on stderr when it is a terminal, and
nowhere otherwise."""

import io
import sys

from llmlab.progress import Bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def a_plain_terminal(monkeypatch) -> None:
    """rich also reads the environment: a dumb or non-interactive terminal would get no bar."""
    monkeypatch.setenv("TERM", "xterm")
    for name in ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)


def test_bar_draws_on_a_terminal_stderr_only_when_enabled(monkeypatch):
    a_plain_terminal(monkeypatch)
    for stdout_is_terminal in (False, True):
        err, out = Terminal(), Terminal() if stdout_is_terminal else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(sys, "stdout", out)
        with Bar(3, "counting sheep", enabled=True) as bar:
            bar.update(2)
        assert "counting sheep" in err.getvalue() and "2/3" in err.getvalue()
        assert out.getvalue() == ""  # never on stdout, which holds the command's output

        err, out = Terminal(), Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(sys, "stdout", out)
        with Bar(3, "counting sheep", enabled=False) as bar:
            bar.update(2)
        assert err.getvalue() == out.getvalue() == ""


def test_bar_is_silent_when_stderr_is_not_a_terminal(monkeypatch):
    a_plain_terminal(monkeypatch)
    err, out = io.StringIO(), Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    with Bar(None, "counting sheep") as bar:
        bar.update()
    assert err.getvalue() == out.getvalue() == ""


def test_training_progress_draws_and_prints_on_stderr_only(monkeypatch):
    from llmlab.train.metrics import Progress

    a_plain_terminal(monkeypatch)
    for stderr_is_terminal in (True, False):
        err, out = Terminal() if stderr_is_terminal else io.StringIO(), Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(sys, "stdout", out)
        progress = Progress(total=4, start=0)
        progress.update(3, {"loss": 1.25, "tokens_per_s": 1000.0, "mfu": None})
        progress.print("step 3  val loss 1.2000")
        progress.close()
        assert "val loss 1.2000" in err.getvalue()
        assert ("3/4" in err.getvalue() and "loss 1.250" in err.getvalue()) == stderr_is_terminal
        assert out.getvalue() == ""
