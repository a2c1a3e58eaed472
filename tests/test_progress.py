"""The one progress display: when plain mode prints, what its lines say, and rich mode's bar with a detail line."""

from __future__ import annotations

import io

from rich.console import Console

from pipelines.progress import Progress


def plain(**kwargs) -> tuple[Progress, io.StringIO]:
    out = io.StringIO()
    return Progress("auto", console=Console(file=out, width=200), **kwargs), out


def test_auto_is_plain_off_a_terminal_and_prints_on_every_crossing_and_at_the_end():
    bar, out = plain(print_every=4)
    assert bar.mode == "plain"
    bar.phase("features", 10)
    for done in (3, 6, 7, 9, 10):  # crosses 4 at 6 and 8 at 9, then ends at 10
        bar.update(done)
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["features: 6/10 images", "features: 9/10 images",
                                                      "features: 10/10 images"]
    assert all("img/s, ETA" in line for line in lines)


def test_a_resumed_phase_counts_from_where_it_was_and_a_status_is_the_whole_line():
    bar, out = plain(print_every=5)
    bar.phase("train", 20, done=7, unit="steps")
    for step in range(8, 21):
        bar.update(step, f"step {step}/20")
    assert out.getvalue().splitlines() == ["step 10/20", "step 15/20", "step 20/20"]


def test_seconds_between_lines_and_mode_none_prints_nothing():
    bar, out = plain(print_seconds=1e-9)  # every update is due
    bar.phase("write", 3)
    bar.update(1)
    bar.update(1)  # no progress: no line
    bar.update(2)
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == ["write: 1/3 images", "write: 2/3 images"]
    out = io.StringIO()
    silent = Progress("none", console=Console(file=out))
    silent.phase("x", 2)
    silent.update(2)
    silent.info("hello")
    silent.warn("careful")
    assert out.getvalue() == ""


def test_rich_mode_draws_a_bar_with_the_speed_and_the_status_line_under_it():
    out = io.StringIO()
    with Progress("rich", console=Console(file=out, force_terminal=True, width=120)) as bar:
        bar.phase("train", 4, unit="steps")
        bar.update(2, "ep 0 step 2/4 | loss 7.1")
        bar.info("a message above the bar")
    text = out.getvalue()
    assert "train" in text and "2/4" in text and "steps/s" in text and "ep 0 step 2/4 | loss 7.1" in text
    assert "a message above the bar" in text
