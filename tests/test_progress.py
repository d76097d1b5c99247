"""Progress on long steps: plain lines every ~10 % in a log, with rate and ETA; a bar when interactive."""
import io

from awq_nb.progress import ConsoleProgress


def test_plain_lines_every_tenth_with_rate_and_eta():
    out = io.StringIO()
    p = ConsoleProgress("eval", "window", stream=out, interactive=False)
    for i in range(0, 101):
        p(i, 100, f"window {i + 1}/100")
    p(100, 100, "again")  # after the end: ignored
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[awq-nb] eval: 0/100 windows (0%)") and "window 1/100" in lines[0]
    assert 10 <= len(lines) <= 12, lines  # not one per window
    assert all("\r" not in line for line in lines)
    assert "ETA" in lines[1] and "s/window" in lines[1]
    assert lines[-1].startswith("[awq-nb] eval: 100/100 windows (100%)") and "done in" in lines[-1]


def test_a_short_stage_still_reports_start_and_end():
    out = io.StringIO()
    p = ConsoleProgress("load", "file", stream=out, interactive=False)
    p(0, 1, "loading x")
    p(1, 1, "loaded x")
    assert [line.split(":")[1].split("(")[0].strip() for line in out.getvalue().splitlines()] == ["0/1 files", "1/1 files"]


def test_interactive_mode_drives_a_tqdm_bar():
    out = io.StringIO()
    p = ConsoleProgress("AWQ search", "block", stream=out, interactive=True)
    p(0, 3, "searching block 1/3")
    p(2, 3, "searching block 3/3")
    assert p.bar.n == 2 and p.bar.total == 3
    p(3, 3, "done")
    assert p.closed and "AWQ search" in out.getvalue()
