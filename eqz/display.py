"""Rich renderings shared by the commands: progress bars and bank tables. Display only, no decisions."""

from __future__ import annotations

import time

from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich import box
from rich.table import Table
from rich.markup import escape
from rich.text import Text

from .bands import BANDS, SHORT_NAMES
from .bank import PROBLEMS, SHIPPED_DIR, Bank, FoundBank, describe_setup, user_data_dir, weighs_as_calibration
from .presets import Preset, PresetEntry, describe_filters

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# how to get llama.cpp built for a GPU, from a checkout or a pip install (the CLI says it where offload cannot happen)
GPU_BUILD_HINT = ("to build it for a GPU, run `make setup GPU=cuda` (or metal, vulkan) in a checkout, or `CMAKE_ARGS="
                  "-DGGML_CUDA=on pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python==0.3.36` "
                  "where eqz was installed with pip")

LONG_MESSAGE_CHARS = 600  # about 150 tokens: a second or more of reading on two cores


def reading(text: str, shown_on: Console = err_console):
    """A spinner while a long message is read in: seconds on a CPU with nothing on the screen, which looked like a
    hang. Nothing for a short message, or off a terminal."""
    if len(text) < LONG_MESSAGE_CHARS or not shown_on.is_terminal:
        return nullcontext()
    return shown_on.status(f"[dim]reading {len(text):,} characters…[/dim]", spinner="dots")


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """``progress(stage, total)`` starts a bar and returns ``advance(n)``; bars go to stderr. The display opens
    with the first bar: an error before any work is one line, not a blank one and then the error."""
    if not err_console.is_terminal:  # a log file: a line as each stage starts (bars drew nothing there until the end)
        began = time.monotonic()

        def logged(stage: str, total: int) -> Callable[[int], None]:
            err_console.print(f"{stage}: {total:,} ({time.monotonic() - began:.0f} s in)", soft_wrap=True)
            return lambda n: None

        yield logged
        return
    columns = (TextColumn("{task.description:<42}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with ExitStack() as opened:
        bars: Progress | None = None

        def start(stage: str, total: int) -> Callable[[int], None]:
            nonlocal bars
            if bars is None:
                bars = opened.enter_context(Progress(*columns, console=err_console))
            task = bars.add_task(stage, total=total)
            return lambda n: bars.advance(task, n)

        yield start


def _where(directory: Path) -> str:
    if SHIPPED_DIR in directory.parents:
        return "shipped"
    return "user" if user_data_dir() in (directory, *directory.parents) else "$EQZ_VECTORS"


def print_models(infos: list[dict]) -> None:
    """One block per model, its path on a line of its own: nothing is cut at 80 columns."""
    for info in infos:
        template = "found" if info["chat_template"] else "none (plain User:/Assistant: fallback)"
        console.print(f"[bold]{escape(info['name'])}[/bold]")
        console.print(f"  {info['architecture']}, {info['n_layer']} layers x {info['n_embd']}, context "
                      f"{info['n_ctx_train']}, chat template {template}")
        memory = info["memory"]
        build = info["llama_cpp"]
        gpu = [name for name in build["backends"] if name != "CPU"] if build["gpu_offload"] else []
        console.print(f"  memory: {_mib(memory['weights'])} weights + {_mib(memory['kv_cache'])} KV cache at "
                      f"{memory['context']} tokens")
        console.print(f"  llama.cpp built for {' + '.join(gpu)}, all layers offloaded by default" if gpu else
                      f"  llama.cpp built for the CPU only; {GPU_BUILD_HINT}")
        console.print(f"  {escape(info['path'])}", soft_wrap=True)


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB" if size < 2**30 else f"{size / 2**30:.1f} GiB"


def bank_listing(banks: list[FoundBank]) -> list[dict]:
    """Per bank, what `vectors list` says of it beside its model and bands: its folder's name (what `vectors show`
    takes), where it comes from, and whether it is the one in use for its model (the first found with that
    fingerprint) or which one shadows it."""
    in_use: dict[str, FoundBank] = {}
    for found in banks:
        in_use.setdefault(found.model.fingerprint, found)
    firsts = [in_use[found.model.fingerprint] for found in banks]
    return [{"bank": found.directory.name, "where": _where(found.directory), "in_use": first is found,
             "shadowed_by": None if first is found else str(first.directory)} for found, first in zip(banks, firsts)]


def print_bank_list(banks: list[FoundBank]) -> None:
    """One block per bank: name, where it comes from, whether it is the one in use for its model (the first found
    with that fingerprint), then model and path on lines of their own so nothing is cut at 80 columns."""
    if not banks:
        console.print("no banks found; `eqz train` makes one for a model")
        return
    for found, listed in zip(banks, bank_listing(banks)):
        shadow = listed["shadowed_by"]
        status = "[green]in use[/green]" if shadow is None else f"[yellow]shadowed by {escape(shadow)}[/yellow]"
        accuracy = f", held-out accuracy {found.heldout_accuracy:.0%}" if found.heldout_accuracy is not None else ""
        console.print(f"[bold]{escape(found.directory.name)}[/bold] ({listed['where']}, {status}): "
                      f"{len(found.band_names)} bands{accuracy}", soft_wrap=True)
        console.print(f"  model {escape(found.model.name)} ({found.model.fingerprint})", soft_wrap=True)
        console.print(f"  {escape(str(found.directory))}", soft_wrap=True)


def print_bank(bank: Bank) -> None:
    model, layers = bank.model, bank.layers
    console.print(f"[bold]{escape(str(bank.directory))}[/bold]")
    console.print(f"model {escape(model.name)} ({model.fingerprint}), {model.n_layer} layers x {model.n_embd}")
    if layers.steered:
        console.print(f"read layer {layers.read}, steered layers {layers.steered[0]}-{layers.steered[-1]}")
    quality = bank.quality
    if "heldout_accuracy" in quality:
        console.print(
            f"held-out 8-way classification: {quality['heldout_accuracy']:.1%} of {quality['heldout_texts']} texts "
            f"(chance {quality['chance']:.1%})"
        )
    table = Table(header_style="bold", box=None, collapse_padding=True, pad_edge=False)  # fits 80 columns
    for column in ("band", "source", "c", "neg.", "effect", "most lifted", "judge", "rep3", "ppl", "check"):
        table.add_column(column, justify="left" if column in ("band", "source", "most lifted", "check") else "right",
                         no_wrap=column != "check")
    for name, band in bank.bands.items():
        if band.imported:
            table.add_row(name, "imported", "-", "-", "-", "-", "-", "-", "-", "[yellow]unmetered[/yellow]")
            continue
        held = band.hold is not None
        cells = ["described" if band.description else band.source or "stimulus",
                 f"held {band.hold:g}" if held else f"{band.strength:g}", "-" if held else f"x{band.negative_ratio:g}"]
        at_one = band.hold_check if held else band.check.get("+1")
        if at_one:
            ppl = at_one.get("ppl_ratio")
            cells += [f"{at_one['effect']:.2f}", at_one["most_lifted"], _judged(at_one),
                      f"{at_one['repeated_3grams']:.0%}", f"{ppl:.2f}" if ppl is not None else "-"]
        else:
            cells += ["-"] * 5
        problems = bank.open_problems(name)
        cleared = "" if problems == bank.trained_problems(name) else " (eval)"
        cells.append("-" if band.direction_ok is None else "[red]" + ", ".join(problems) + "[/red]" if problems
                     else "ok" + cleared)
        table.add_row(name, *cells)
    console.print(table)
    calibration = bank.method.get("calibration")
    if isinstance(calibration, dict):
        console.print(
            f"[dim]c: strength at gain +1 (c/steered layers of each layer's token norm), or 'held L': +1 holds the "
            "band at level L (meter units) at every steered layer instead of adding its vector; neg.: share of it at -1; "
            f"at +1: effect = the band's own emotion words over the unsteered replies' ({calibration['scorer']} "
            "lexicon; axes: + words/100; described bands: + nats/token the unsteered model prefers them for the "
            "description over the primaries), most lifted = the emotion that rose most, judge = how many times "
            f"likelier the unsteered model names the band as the replies' emotion (* clear; {_JUDGED_AXES}), "
            "rep3 = repeated 3-grams, "
            "ppl = perplexity under the model asked for the band over the unsteered replies'; check: ok; ok (eval) = "
            "weak in calibration, clear on the held-out prompts of `eqz eval --record`; or what failed: "
            + "; ".join(f"{key} = {words}" for key, words in PROBLEMS.items()) + "[/dim]"
        )
    dose = quality.get("dose_response")
    if dose:
        setup = quality.get("dose_response_setup", {})
        when = f", recorded {setup['date'][:10]}" if "date" in setup else ""  # recordings before stop 52: undated
        light = "" if weighs_as_calibration(setup) else (
            "; fewer reply tokens than calibration read, so its verdicts stand")
        console.print(f"dose-response (eqz eval --record, {len(dose)} band{'s' if len(dose) != 1 else ''}{when}; "
                      f"{describe_setup(setup)}{light}): see `eqz vectors show --json` or the README table")
    if bank.trained:
        console.print(f"trained in {_training(bank.trained)}")
    for name, band in bank.bands.items():  # added or retrained since (`train --band`): the line above is not theirs
        if band.trained:
            console.print(f"{name} trained in {_training(band.trained)}")


def _training(trained: dict) -> str:
    """bank.yaml's ``trained`` as `vectors show` says it: how long, with which eqz, when, the seed, the weights."""
    through = " (through an f16 copy of the weights)" if trained.get("weights") == "f16 copy" else ""
    seed = f", seed {trained['seed']}" if "seed" in trained else ""  # banks before stop 48 used 1234 unrecorded
    return f"{trained['seconds']} s with eqz {trained['eqz_version']} on {trained['date']}{seed}{through}"


_LEVELS = "▁▂▃▄▅▆▇█"
_NEGATIVE_LEVELS = "░▒▓"  # below zero reads apart from above zero without colour too
CHART_LEGEND = f"{_LEVELS[0]}..{_LEVELS[-1]} above 0, {_NEGATIVE_LEVELS} below 0 (by size), · 0"


def mini_chart(sliders: dict[str, float]) -> Text:
    """One cell per band (BANDS order): a block as tall as a positive gain (green), a shade as dark as a negative
    one (red), · for 0."""
    chart = Text()
    for band in BANDS:
        gain = sliders.get(band, 0.0)
        if gain == 0:
            chart.append("· ", style="dim")
        elif gain > 0:
            chart.append(_LEVELS[min(7, int(gain / 2 * 7.999))] + " ", style="green")
        else:
            chart.append(_NEGATIVE_LEVELS[min(2, int(-gain / 2 * 2.999))] + " ", style="red")
    return chart


def print_preset_list(entries: list[PresetEntry]) -> None:
    table = Table(header_style="bold")
    table.add_column("preset")
    table.add_column(" ".join(b[:1] for b in BANDS), no_wrap=True)
    table.add_column("description")
    table.add_column("source")
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.preset:
            own = ", ".join(f"{band} {gain:+g}" for band, gain in entry.preset.sliders.items() if band not in BANDS)
            described = " ".join(part for part in (entry.preset.description, own and f"(also {own})") if part)
            table.add_row(Text(entry.name), mini_chart(entry.preset.sliders), Text(described), Text(entry.source))
        else:
            table.add_row(Text(entry.name), Text("invalid", style="red"), Text(entry.error or "", style="red"),
                          Text(entry.source))
    console.print(table)
    console.print(f"[dim]chart columns: {', '.join(BANDS)}; {CHART_LEGEND}[/dim]")


def print_preset(preset: Preset) -> None:
    described = f" — {escape(preset.description)}" if preset.description else ""
    console.print(f"[bold]{escape(preset.name)}[/bold]{described}")
    for band in dict.fromkeys([*BANDS, *preset.sliders]):  # a band of the user's own after the ten
        gain = preset.sliders.get(band, 0.0)
        if gain:
            bar = "█" * round(abs(gain) * 10)  # left of the axis below zero, right of it above
            drawn = Text(f"{bar:>20}│" if gain < 0 else f"{'':>20}│{bar}", style="green" if gain > 0 else "red")
            console.print(f"  {band:<13} {gain:+.2f} ", drawn)
    if preset.sampling:
        console.print("  sampling: " + ", ".join(f"{k} {v}" for k, v in preset.sampling.items()))
    if preset.system:
        console.print(f"  system: {escape(preset.system)}")
    if preset.filters:
        console.print(f"  filters: {describe_filters(preset.filters)}")
    console.print(f"[dim]  {escape(str(preset.path))}[/dim]")


@contextmanager
def batch_progress(total: int):
    """(on_row, stats) for a batch run: a rich bar on a terminal, a plain line every few seconds otherwise."""
    from .batch import BatchStats

    stats = BatchStats(total=total)
    if err_console.is_terminal:
        columns = (TextColumn("rows"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn())
        with Progress(*columns, console=err_console) as bars:
            task = bars.add_task("rows", total=total, rate="")

            def on_row(_row: dict, current: BatchStats) -> None:
                bars.update(task, completed=current.written + current.skipped_existing,
                            rate=f"{current.tokens_per_second:.0f} tok/s")

            yield on_row, stats
        return
    last = [0.0]

    def on_row(_row: dict, current: BatchStats) -> None:
        done = current.written + current.skipped_existing
        if current.seconds - last[0] >= 5 or done == total:
            last[0] = current.seconds
            remaining = (total - done) * current.seconds / max(current.written, 1)
            err_console.print(f"rows {done}/{total} · {current.tokens_per_second:.0f} tok/s · eta {remaining:.0f} s")

    yield on_row, stats


def _strip_style(value: float) -> str:
    if value >= 0.75:
        return "bold green"
    if value >= 0.35:
        return "green"
    if value <= -0.35:
        return "red"
    return "dim"


def _four_chars(value: float) -> str:
    """A readout in four characters: +0.4, -2.3, +12."""
    return f"{value:+.1f}" if abs(value) < 9.95 else f"{value:+.0f}"


def print_analysis(analysis) -> None:
    """A table: one row per sentence/token, one coloured cell per band (a strip); fits 80 columns."""
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    table.add_column("text", overflow="fold", ratio=1, min_width=14)
    for band in analysis.bands:
        table.add_column(SHORT_NAMES.get(band, band[:5])[:4], justify="right", width=4, no_wrap=True)
    for segment in analysis.segments:
        if segment.readouts is None:  # the first token: an attention sink, never read
            table.add_row(Text(segment.text, style="dim"), *[Text("   ·", style="dim")] * len(analysis.bands))
            continue
        cells = [Text(_four_chars(segment.readouts[b]), style=_strip_style(segment.readouts[b])) for b in analysis.bands]
        # a token holding the first bytes of a character shows nothing (the character is the next one's)
        table.add_row(Text(segment.text) if segment.text else Text("(part of the next)", style="dim"), *cells)
    table.add_section()
    overall = [Text(_four_chars(analysis.overall[b]), style="bold " + _strip_style(analysis.overall[b]))
               for b in analysis.bands]
    table.add_row(Text("whole text", style="bold"), *overall)
    console.print(table)
    first_unread = bool(analysis.segments) and analysis.segments[0].readouts is None
    unread = "; · = not read (the first token only sinks attention)" if first_unread else ""
    console.print("[dim]0 = the model's neutral level, 1 = its typical level on clearly emotional text of that band "
                  f"(--json for three decimals){unread}[/dim]")


# what the judge column holds for valence and arousal (eval.ReplySet.judged_rise), in both tables' legends
_JUDGED_AXES = "axes: the rise of its names' circumplex valence or arousal"


def _judged(row: dict) -> str:
    """The judge's lift for the band in one cell, * where it is clear (eval.ReplySet.judged_clear); for an axis, the
    signed rise of its names' circumplex reading (eval.ReplySet.judged_rise)."""
    if row.get("gain") == 0:
        return "-"
    if "judged_rise" in row:
        return f"{row['judged_rise']:+.2f}"
    if "judged_effect" not in row:
        return "-"
    return f"{row['judged_effect']:.2f}" + (" *" if row["judged_clear"] else "")


def print_eval(result, flagged: dict[str, dict[float, list[str]]]) -> None:
    """One table per band: gain (and the band asked for in the prompt, alone and with the slider at +1) against the
    lexicon effect, the readout and fluency. Short headers and no side borders: the ten columns fit 80 (a pipe)."""
    for band in result.bands:
        table = Table(title=band, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1),
                      pad_edge=False)
        for column in ("setting", "effect", "most", "holds", "judge", "read", "ppl", "rep3", "dist2", "tok"):
            table.add_column(column, justify="left" if column in ("setting", "most") else "right", no_wrap=True)
        for row in result.table(band) + result.prompt_rows(band):
            style = None if row["fluent"] else "red"
            setting = ("prompt only" if row["gain"] is None else
                       f"prompt {row['gain']:+g}" if row.get("asked") else f"gain {row['gain']:+.2f}")
            readout = row.get("readout")
            ppl = row.get("ppl_ratio")
            most = "-" if row["gain"] == 0 else SHORT_NAMES.get(row["most_lifted"], row["most_lifted"])  # 0 moves nothing
            share = row.get("clear_share")
            table.add_row(setting, f"{row['effect']:.2f}" + (" *" if row["clear"] else ""), most,
                          "-" if share is None else f"{share:.0%}", _judged(row),
                          f"{readout:+.2f}" if readout is not None else "-", f"{ppl:.2f}" if ppl is not None else "-",
                          f"{row['repeated_3grams']:.0%}", f"{row['distinct_2']:.2f}", f"{row['length']:.0f}",
                          style=style)
        console.print(table)
        for gain, bounds in (flagged.get(band) or {}).items():
            console.print(f"  not fluent at gain {gain:+g}: {', '.join(bounds) or 'outside a bound'}", style="red",
                          markup=False)
    console.print(f"[dim]effect: the band's own emotion words over the unsteered replies' ({result.scorer} lexicon; "
                  "axes: + words per 100; described bands: + nats/token the unsteered model prefers the replies "
                  "for the description over the primaries); * = clearly lifted and the most lifted; most: the emotion "
                  "lifted most; holds: how often the band is clear when the prompts are drawn again; judge: how many "
                  "times likelier the unsteered model names the band as the replies' emotion (* clear: 2x and most of "
                  f"the eight; {_JUDGED_AXES}); read: the model's own reading of the replies; ppl: perplexity under "
                  "the model asked for the band over the unsteered replies'; rep3: repeated 3-grams; dist2: distinct-2 "
                  "(the share of word pairs that are distinct); tok: reply length in tokens. eval.json and eval.csv "
                  "keep every figure.[/dim]")
