"""What the terminal shows, checked without a model: the chat's change markers, and outside text printed as written."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from eqz import display
from eqz.analyze import Analysis, Segment
from eqz.presets import Preset, PresetEntry
from eqz.tui import MIN_COLUMN, _bands_in_view, parse_keys, reply_text


def test_change_markers_name_only_the_bands_that_moved():
    start = {"joy": 0.3, "surprise": 0.2, "anticipation": 0.4}  # e.g. the curious preset
    changes = [{"text_offset": 5, "sliders": {**start, "joy": 0.4}},
               {"text_offset": 9, "sliders": {**start, "joy": 0.4, "surprise": 0.0}}]
    assert reply_text("Hello world", changes, start).plain == "Hello⟨joy +0.4⟩ wor⟨surprise +0.0⟩ld"


def test_text_from_users_and_models_is_printed_as_written_not_as_markup(tmp_path, monkeypatch):
    """A preset's fields, a path, an analysed sentence: rich would drop "[b]" and fail on "[/b]" read as markup."""
    written = io.StringIO()
    monkeypatch.setattr(display, "console", Console(file=written, width=200, highlight=False))
    odd = "calm [b]not bold[/b] [/i]"
    preset = Preset(name="brackets", description=odd, sliders={"joy": 0.3}, sampling={}, system=f"You are {odd}.",
                    filters={}, path=tmp_path / "[x].yaml")
    display.print_preset(preset)
    display.print_preset_list([PresetEntry(name="brackets", path=preset.path, source="[user]", preset=preset, error=None)])
    display.print_analysis(Analysis(bands=("joy",), segments=[Segment(odd, {"joy": 0.5})], overall={"joy": 0.5}))
    shown = written.getvalue()
    assert shown.count(odd) == 4 and "[x].yaml" in shown and "[user]" in shown


def test_a_preset_without_a_description_shows_just_its_name(tmp_path, monkeypatch):
    written = io.StringIO()
    monkeypatch.setattr(display, "console", Console(file=written, width=200))
    display.print_preset(Preset(name="plain", description="", sliders={}, sampling={}, system=None, filters={},
                                path=tmp_path / "plain.yaml"))
    assert written.getvalue().splitlines()[0] == "plain"


def test_keys_read_while_a_reply_streams_are_arrows_text_or_nothing():
    """Only digits, z and r were read, and other keys' sequences fired them: F5 (ESC [ 1 5 ~) picked band 1, then 5."""
    assert parse_keys(b"\x1b[A1z\x1bOB") == (["up", "1", "z", "down"], b"")
    assert parse_keys(b"\x1b[15~\x1b[?1;2c\x1b[<0;10;5M\x1brx") == (["x"], b"")  # F5, a report, a mouse click, Alt+r
    assert parse_keys("café".encode()[:-1]) == (["c", "a", "f"], b"\xc3")  # é's last byte comes with the next read
    assert parse_keys(b"\xffa\x7f\r\n") == (["a", "backspace", "enter", "enter"], b"")  # not UTF-8: dropped
    assert parse_keys(b"\x1b[") == ([], b"\x1b[")  # the rest of an arrow key comes with the next read


@pytest.mark.parametrize("width", [100, 60, 59, 46, 40, 24, 12])
def test_a_narrow_panel_shows_the_bands_it_has_room_for_around_the_selected_one(width):
    """Below 60 columns ten bands did not fit, and the panel's rows of values wrapped into two."""
    for selected in range(10):
        first, shown = _bands_in_view(10, selected, width)
        assert selected in shown and shown == range(first, first + len(shown)) and 0 <= first <= 10 - len(shown)
        assert len(shown) == 10 if width >= 60 else (6 + MIN_COLUMN * len(shown) <= width - 4 or len(shown) == 1)
