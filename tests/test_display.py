"""What the terminal shows, checked without a model: the chat's change markers name only the bands that moved."""

from __future__ import annotations

from eqz.tui import reply_text


def test_change_markers_name_only_the_bands_that_moved():
    start = {"joy": 0.3, "surprise": 0.2, "anticipation": 0.4}  # e.g. the curious preset
    changes = [{"text_offset": 5, "sliders": {**start, "joy": 0.4}},
               {"text_offset": 9, "sliders": {**start, "joy": 0.4, "surprise": 0.0}}]
    assert reply_text("Hello world", changes, start).plain == "Hello⟨joy +0.4⟩ wor⟨surprise +0.0⟩ld"
