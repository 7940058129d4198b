"""The ``eqz`` command line: parsing and display only; the work is done in the modules it calls."""

from __future__ import annotations

import errno
import inspect
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import EqzError
from .sampling import EVAL_MIN_TOKENS, MIN_CONTEXT, check_setting, whole_number

EXAMPLES = """

Examples:

  eqz chat                               chat with the default model
  eqz generate "Describe your morning." --seed 1
  eqz generate "Hi" --vector joy.gguf:0.8 --json
  eqz models                             the model eqz loads: shape, template
"""  # a paragraph of its own, each line within 80 columns (it ran into the line above, and wrapped)

app = typer.Typer(
    help="eqz: an emotional equalizer for local LLM chat. Steer any GGUF model with llama.cpp control vectors."
    + EXAMPLES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}

# -- options shared by several commands ----------------------------------------------------------------------


def _sampling_flag(setting: str):
    """Check a sampling flag by the library's own limits, so that a bad value's error names the flag the user typed
    (`-n 0` was refused as "max_tokens must be >= 1", a name no flag has)."""
    def check(value):
        if value is None:
            return None
        try:
            return check_setting(setting, value)
        except EqzError as error:
            raise typer.BadParameter(str(error).removeprefix(f"{setting} ")) from None
    return check


ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", metavar="GGUF", help="GGUF model file \\[default: $EQZ_MODEL, else SmolLM2-135M-Instruct]"),
]
ThreadsOpt = Annotated[Optional[int], typer.Option(metavar="N", help="CPU threads \\[default: $EQZ_THREADS, else the idle cores]", min=1)]
GpuLayersOpt = Annotated[Optional[str], typer.Option("--gpu-layers", "-ngl", metavar="N|all", envvar="EQZ_GPU_LAYERS", help="layers offloaded to the GPU (also $EQZ_GPU_LAYERS) \\[default: all when llama.cpp was built for a GPU, else 0]")]
CtxOpt = Annotated[int, typer.Option("--ctx", metavar="TOKENS", help="context window in tokens (at most the model's trained context)", min=MIN_CONTEXT)]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", metavar="TEXT", help="system prompt")]
VectorOpt = Annotated[
    Optional[list[str]],
    typer.Option("--vector", metavar="FILE[:SCALE]", help="llama.cpp control vector FILE[:SCALE], repeatable; summed like llama.cpp (a file given twice too)"),
]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", metavar="NAME|FILE", help="preset mood by name (see eqz presets list) or a preset .yaml file")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="BAND=GAIN", help="slider BAND=GAIN, repeatable (gain -2..2; 1 = calibrated strength)"),
]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", "-n", metavar="N", help="most tokens per reply \\[default: 256]", callback=_sampling_flag("max_tokens"))]
SeedOpt = Annotated[Optional[int], typer.Option(metavar="N", help="random seed \\[default: random]", callback=_sampling_flag("seed"))]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", "-t", metavar="X", help="0 = greedy, up to 5 \\[default: 0.7]", callback=_sampling_flag("temperature"))]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", metavar="X", help="nucleus sampling, 0-1 \\[default: 0.95]", callback=_sampling_flag("top_p"))]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", metavar="N", help="0 = off \\[default: 40]", callback=_sampling_flag("top_k"))]
MinPOpt = Annotated[Optional[float], typer.Option("--min-p", metavar="X", help="0-1 \\[default: 0.05]", callback=_sampling_flag("min_p"))]
RepeatPenaltyOpt = Annotated[Optional[float], typer.Option("--repeat-penalty", metavar="X", help="1 = off, up to 5 \\[default: 1.1]", callback=_sampling_flag("repeat_penalty"))]
ClampOpt = Annotated[
    Optional[list[str]],
    typer.Option("--clamp", metavar="BAND=LEVEL", help="hold BAND=LEVEL inside the model (calibrated units, -6..6), repeatable"),
]
AblateOpt = Annotated[
    Optional[list[str]], typer.Option("--ablate", metavar="BAND", help="notch BAND to the model's neutral level, repeatable")
]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="print the result as machine-readable JSON")]


def _sets(sets: list[str] | None, valid: tuple[str, ...] | None = None) -> list[tuple[str, float]]:
    """``--set BAND=GAIN`` flags as (band, gain) pairs, in order (a band given twice: the last wins in a dict)."""
    from .bands import parse_set

    return [parse_set(spec, valid) for spec in sets or []]


def _gains(sets: list[str] | None, valid: tuple[str, ...] | None) -> dict[str, float]:
    """``--set`` flags as gains, with a warning for each past the calibrated range (where no library call gives
    it: vectors export, presets save)."""
    from .bands import gain_warnings

    pairs = _sets(sets, valid)
    for line in gain_warnings(pairs):
        _warn(line)
    return dict(pairs)


def _open_session(library, *, preset, sets, vectors, system, sampling: dict, ctx: int, meter: bool = False,
                  clamp=None, ablate=None, resume=None):
    """A ChatSession from the command line's flags, through the library: the preset (or the resumed conversation's
    settings) first, then the flags."""
    from .vector_files import parse_scaled_path

    clamps, ablates = _clamp_ablate(clamp, ablate)
    return library.session(preset=preset, sliders=dict(_sets(sets)),
                           vectors=[parse_scaled_path(spec) for spec in vectors or []], system=system,
                           sampling=sampling, clamp=clamps, ablate=ablates, meter=meter, n_ctx=ctx, resume=resume)


def _clamp_ablate(clamp: list[str] | None, ablate: list[str] | None) -> tuple[dict[str, float], list[str]]:
    """--clamp BAND=LEVEL and --ablate BAND flags as the library takes them (it checks the bands)."""
    from .bands import band_key, parse_set

    return dict(parse_set(spec, None, "--clamp") for spec in clamp or []), [band_key(b) for b in ablate or []]


def _listed(text: str | None, option: str) -> list[str] | None:
    """A comma-separated option's names, in order, once each; None when it was not given. An empty name is a
    typo (``--bands ""``, ``joy,,fear``), not "all"."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise EqzError(f"{option} {text!r} has an empty name; give names separated by commas, or leave {option} out")
    return list(dict.fromkeys(names))


def _load_model(model: str | None, threads: int | None, chatting: bool = False, gpu_layers: str | None = "0"):
    """The library's model (eqz.api) for a command, warnings printed as one line each. Commands that only read a
    model's facts keep it off the GPU (``gpu_layers`` "0")."""
    from .api import llama_build, load
    from .display import GPU_BUILD_HINT

    layers = _gpu_layers(gpu_layers)
    if layers and not llama_build()["gpu_offload"]:
        _warn("this llama.cpp was built for the CPU only, so --gpu-layers/EQZ_GPU_LAYERS does nothing; "
              f"{GPU_BUILD_HINT}")
    library = load(model, threads=threads, gpu_layers=layers)
    library.on_warning = _warn
    if chatting and not library.info.has_chat_template:
        _warn(f"{library.info.name} has no chat template; using a plain 'User:/Assistant:' transcript")
    return library


def _gpu_layers(value: str | None) -> int | None:
    """--gpu-layers: a count, or all (-1); None: the build's default."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("all", "-1"):
        return -1
    layers = whole_number(text)
    if layers is None:
        raise EqzError(f"--gpu-layers takes a number of layers or 'all', got '{value}'")
    return layers


def _warn(message: str) -> None:
    sys.stderr.write(_for_stderr("eqz: warning: ", message))


def _for_stderr(prefix: str, message: str) -> str:
    """``prefix + message`` as one line, for scripts and logs; on a terminal, broken between words to its width and
    indented under the message's start (the terminal broke it mid-word)."""
    line = prefix + message
    if not sys.stderr.isatty():
        return line + "\n"
    import os
    import textwrap

    width = whole_number(os.environ.get("COLUMNS", ""))
    if width is None:
        try:  # stderr's own terminal: stdout may be a file (`eqz generate ... > reply.txt`)
            width = os.get_terminal_size(sys.stderr.fileno()).columns
        except OSError:
            width = 80
    indent = " " * len(prefix)
    return "\n".join(textwrap.fill(part, max(40, width), initial_indent=indent if number else "",
                                   subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
                     for number, part in enumerate(line.split("\n"))) + "\n"


# -- commands ------------------------------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"eqz {__version__} (llama-cpp-python {version('llama_cpp_python')})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", metavar="", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="show llama.cpp's log and full tracebacks")] = False,
) -> None:
    _state["debug"] = debug
    if debug:
        from .api import show_backend_log

        show_backend_log()


@app.command()
def models(
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="GGUF", help="GGUF files \\[default: the model eqz would load]")] = None,
    model: ModelOpt = None,
    json_output: JsonOpt = False,
    ctx: Annotated[int, typer.Option("--ctx", metavar="TOKENS", help="context the memory estimate is for", min=MIN_CONTEXT)] = 4096,
) -> None:
    """Show a model's path, architecture, layers, width, context length, chat template, the backend llama.cpp
    was built for, and the memory the weights and a KV cache of --ctx tokens take."""
    from .api import llama_build
    from .display import print_models

    paths = [*(paths or []), *([model] if model else [])] or None

    infos = []
    for path in paths or [None]:
        with _load_model(path, None) as model:
            infos.append({**model.info.to_dict(), "llama_cpp": llama_build(),
                          "memory": model.model.memory_estimate(ctx)})
    if json_output:
        typer.echo(json.dumps(infos if paths and len(paths) > 1 else infos[0], indent=2))
        return
    print_models(infos)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="the user message ('-': read from stdin)")],
    model: ModelOpt = None,
    system: SystemOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    vector: VectorOpt = None,
    max_tokens: MaxTokensOpt = None,
    seed: SeedOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    clamp: ClampOpt = None,
    ablate: AblateOpt = None,
    json_output: JsonOpt = False,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    ctx: CtxOpt = 4096,
) -> None:
    """Generate one reply to PROMPT, streamed to stdout."""
    from .display import reading
    from .session import reply_record
    from .threads import crowding_hint

    if prompt == "-":
        prompt = _stdin_text("PROMPT").strip()
    elif not prompt.strip():  # `eqz generate "$PROMPT"` with the variable unset replied to nothing
        raise EqzError("PROMPT is empty; give the message to reply to (or '-' to read it from stdin)")
    sampling = dict(max_tokens=max_tokens, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
                    min_p=min_p, repeat_penalty=repeat_penalty)
    with _load_model(model, threads, chatting=True, gpu_layers=gpu_layers) as loaded:
        session = _open_session(loaded, preset=preset, sets=set_, vectors=vector, system=system,
                                sampling=sampling, ctx=ctx, meter=json_output, clamp=clamp, ablate=ablate)
        with reading(prompt):
            turn = session.reply(prompt)
        with turn.ctrl_c_stops():  # the text so far is printed (or recorded) either way
            for piece in turn:
                if not json_output:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        if json_output:
            record = reply_record(prompt, session.system, session.preset, turn.text, loaded.model_record,
                                  turn.record.to_dict())
            typer.echo(json.dumps(record, ensure_ascii=False))
        else:
            sys.stdout.write("\n")
            hint = crowding_hint(loaded.threads, turn.record.n_tokens)
            if hint:
                _warn(f"{turn.record.tokens_per_second:.1f} tok/s: {hint}")
        session.close()
    if turn.record.finish_reason == "interrupted":
        raise typer.Exit(130)


@app.command()
def chat(
    model: ModelOpt = None,
    system: SystemOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    vector: VectorOpt = None,
    max_tokens: MaxTokensOpt = None,
    seed: SeedOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    ctx: CtxOpt = 4096,
    panel: Annotated[
        bool, typer.Option("--panel/--no-panel", metavar="", help="equalizer panel and hotkeys while replies stream")
    ] = True,
    meter: Annotated[bool, typer.Option("--meter/--no-meter", metavar="", help="live readout of the model's own state, in the panel and /save's records")] = True,
    clamp: ClampOpt = None,
    ablate: AblateOpt = None,
    keep: Annotated[bool, typer.Option("--keep/--no-keep", metavar="", help="on leaving, write a conversation not /saved to ~/.local/state/eqz/chats")] = True,
    resume: Annotated[Optional[Path], typer.Option("--resume", metavar="FILE", help="go on with a conversation /save wrote or eqz chat kept, in its last settings (options given win)")] = None,
) -> None:
    """Chat in the terminal with streamed replies and live sliders; /help lists the slash commands."""
    from .tui import run_chat

    sampling = dict(max_tokens=max_tokens, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
                    min_p=min_p, repeat_penalty=repeat_penalty)
    with _load_model(model, threads, chatting=True, gpu_layers=gpu_layers) as loaded:
        session = _open_session(loaded, preset=preset, sets=set_, vectors=vector, system=system,
                                sampling=sampling, ctx=ctx, meter=meter, clamp=clamp, ablate=ablate, resume=resume)
        try:
            run_chat(session, panel=panel, debug=_state["debug"], keep=keep)
        finally:
            session.close()


@app.command()
def batch(
    prompts: Annotated[str, typer.Argument(metavar="PROMPTS", help="prompt file: .txt (one per line), .jsonl ({\"prompt\", \"id\"?, \"system\"?}) or - for stdin")],
    output: Annotated[str, typer.Option("--output", "-o", metavar="FILE", help="JSONL file written row by row as each finishes (an existing one only with --resume; - for stdout)")],
    model: ModelOpt = None,
    preset: PresetOpt = None,
    presets: Annotated[Optional[str], typer.Option("--presets", metavar="A,B,C", help="comma-separated presets to cross with the grid")] = None,
    set_: SetOpt = None,
    sweep: Annotated[
        Optional[list[str]], typer.Option("--sweep", metavar="BAND=START:STOP:N", help="BAND=START:STOP:N, repeatable; the grid is their product")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", "-k", min=1, metavar="N", help="replies per prompt and setting")] = 1,
    seed: Annotated[int, typer.Option(metavar="N", help="base seed; each row's seed comes from it, the prompt id and the sample")] = 0,
    parallel: Annotated[int, typer.Option("--parallel", "-j", metavar="N", min=1, max=64, help="sequences decoded together")] = 4,
    resume: Annotated[bool, typer.Option("--resume", metavar="", help="keep the rows already in OUTPUT and add the rest")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", metavar="", help="skip bad prompt lines instead of stopping")] = False,
    meter: Annotated[bool, typer.Option("--meter", metavar="", help="add each reply's mean readout per band to its row")] = False,
    clamp: ClampOpt = None,
    ablate: AblateOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    threads: Annotated[Optional[int], typer.Option(metavar="N", help="CPU threads \\[default: $EQZ_THREADS, else the idle cores; with --ray, 1 per worker]", min=1)] = None,
    gpu_layers: GpuLayersOpt = None,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="auto|ADDRESS", help="generate on a Ray cluster: auto ($RAY_ADDRESS, one running here, else a new local one) or its address")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", metavar="N", min=1, help="with --ray: models loaded at once, --threads each \\[default: the cluster's free CPUs / threads]")] = None,
) -> None:
    """Generate replies for many prompts under fixed sliders, sweeps or presets, into JSONL."""
    from .batch import Output, PromptFile, parse_sweep
    from .signals import undone_if_killed
    from .display import batch_progress

    if preset and presets:
        raise EqzError("use either --preset NAME or --presets a,b,c, not both")
    if workers and not ray:
        raise EqzError("--workers is for --ray; without it, --parallel sets how many replies decode together")
    if ray:
        from .ray_batch import check_address, require_ray

        require_ray()
        check_address(ray)  # before the model loads
    preset_names = _listed(presets, "--presets") or []
    source = PromptFile(prompts, skip_bad=skip_bad)
    sink = Output(output, resume)  # a bad -o fails here, before the model loads
    def release() -> None:
        source.close()
        sink.close()

    # `kill` or a closed terminal left an empty -o file before the first row, and stdin's prompts in the temp folder
    with undone_if_killed(release):
        try:
            with _load_model(model, threads, chatting=True, gpu_layers=gpu_layers) as loaded:
                sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                min_p=min_p, repeat_penalty=repeat_penalty)
                clamps, ablates = _clamp_ablate(clamp, ablate)
                batch = loaded.batch(source, sink, preset=preset, presets=preset_names, sliders=dict(_sets(set_)),
                                     sweeps=[parse_sweep(s, None) for s in sweep or []], sampling=sampling,
                                     system=system, clamp=clamps, ablate=ablates, samples=samples, seed=seed,
                                     parallel=parallel, meter=meter)
                for skipped in source.skipped:
                    _warn(f"skipped {skipped}")
                source.skipped.clear()
                sys.stderr.write(f"eqz batch: {batch.prompt_count} prompts x {len(batch.settings)} settings x "
                                 f"{samples} samples = {batch.total} rows\n")
                try:
                    with batch_progress(batch.total) as (on_row, stats):
                        if ray:
                            batch.run_on_ray(ray, workers, threads, on_row, stats)
                        else:
                            batch.run(on_row, stats)
                except KeyboardInterrupt:
                    sink.close()
                    sys.stderr.write(f"eqz batch: interrupted; {stats.written} rows written to {output}. " + (
                        "Run the same command with --resume to finish.\n" if output != "-" else
                        "--resume goes on from a file: give -o FILE next time.\n"))
                    raise typer.Exit(130)
        finally:
            release()
    sys.stderr.write(
        f"eqz batch: {stats.written} rows written ({stats.skipped_existing} already there), {stats.tokens} tokens "
        f"in {stats.seconds:.1f} s, {stats.tokens_per_second:.1f} tok/s -> {output}\n"
    )


@app.command()
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", metavar="ADDRESS", help="address to listen on; other than loopback needs --api-key")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="N", help="port to listen on (0: any free one)", min=0, max=65535)] = 8000,
    parallel: Annotated[int, typer.Option("--parallel", metavar="N", help="replies decoded together, each with its own sliders", min=1, max=64)] = 4,
    api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", envvar="EQZ_API_KEY", help="require Authorization: Bearer KEY on /v1/ (also $EQZ_API_KEY)")] = None,
    queue: Annotated[int, typer.Option("--queue", metavar="N", help="requests that may wait for a slot before HTTP 429", min=0)] = 64,
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", metavar="NAME|FILE", help="the mood of requests that choose no preset or sliders of their own")] = None,
    cors: Annotated[Optional[list[str]], typer.Option("--cors", metavar="ORIGIN", help="let web pages from ORIGIN (http://localhost:3000, or *) call the API from a browser (repeatable; none by default)")] = None,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="a line per request on stderr: client, request, status")] = True,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
) -> None:
    """Serve the OpenAI API (chat and completions, with sliders per request and live re-steering) and the web
    equalizer at http://HOST:PORT/."""
    from .server import check_exposure, check_origins, listen_socket, serve as run_server, url_host

    check_exposure(host, api_key)
    check_origins(cors)
    listening = listen_socket(host, port)  # a busy --port fails now, before the model loads
    try:
        with _load_model(model, threads, chatting=True, gpu_layers=gpu_layers) as loaded:
            def ready(bound: int) -> None:
                address = f"http://{url_host(host)}:{bound}"
                sys.stderr.write(f"eqz serve: {loaded.info.name} on {address}/ (web equalizer), OpenAI API at "
                                 f"{address}/v1; Ctrl-C stops\n")

            run_server(loaded, host, port, parallel, api_key, queue, preset, on_ready=ready, listening=listening,
                       cors=cors or (), access_log=access_log)
    finally:
        listening.close()


@app.command()
def analyze(
    text: Annotated[Optional[str], typer.Argument(metavar="TEXT", help="the text to read ('-': stdin; or use --file)")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", metavar="FILE", help="read the text from this file ('-': stdin)")] = None,
    by: Annotated[str, typer.Option("--by", metavar="sentence|token", help="sentence or token")] = "sentence",
    model: ModelOpt = None,
    json_output: JsonOpt = False,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
) -> None:
    """Show how the model itself reads a text, band by band, per sentence or per token."""
    from .display import print_analysis

    if text is None and file is None:
        raise EqzError('nothing to analyze: give the text, e.g. eqz analyze "What a day!", or --file FILE')
    if text is not None and file is not None:
        raise EqzError("give the text as an argument or with --file, not both")
    if text == "-" or file == "-":
        text = _stdin_text("TEXT" if text == "-" else "--file -")
    elif file is not None:
        try:
            text = Path(file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise EqzError(f"cannot read {file}: {error}") from None
    with _load_model(model, threads, gpu_layers=gpu_layers) as loaded:
        result = loaded.analyze(text, by)
    if json_output:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    print_analysis(result)


@app.command("eval")
def eval_command(
    model: ModelOpt = None,
    bands: Annotated[Optional[str], typer.Option("--bands", metavar="A,B", help="comma-separated bands \\[default: all in the bank]")] = None,
    gains: Annotated[str, typer.Option("--gains", metavar="G,G,G", help="comma-separated gains")] = "-1,0,1,2",
    prompts: Annotated[Optional[str], typer.Option("--prompts", metavar="FILE", help="prompt file: .txt, one per line, or .jsonl with a \"prompt\" per line, as batch reads them \\[default: built-in held-out set]")] = None,
    output: Annotated[str, typer.Option("--output", "-o", metavar="DIR", help="directory for eval.json, eval.csv, replies.jsonl (every reply; and the plot)")] = "eval",
    tokens: Annotated[int, typer.Option("--max-tokens", "-n", "--tokens", metavar="N", help="tokens per reply", min=EVAL_MIN_TOKENS)] = 64,
    samples: Annotated[int, typer.Option("--samples", metavar="N", help="replies per prompt and setting", min=1)] = 1,
    plot: Annotated[bool, typer.Option("--plot", metavar="", help="also draw dose_response.png (needs matplotlib)")] = False,
    replace: Annotated[bool, typer.Option("--replace", metavar="", help="write over an earlier run's files in --output")] = False,
    record: Annotated[bool, typer.Option("--record", metavar="", help="store the dose-response figures in the bank's bank.yaml (the shipped bank's go into your own copy of it, used from then on; bands not measured again keep their figures only where measured with the same prompts, samples, tokens and gains)")] = False,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
) -> None:
    """Measure what each slider does against asking for the emotion in the system prompt: lexicon effect, the
    unsteered model's judgement of the replies' emotion, readout, crosstalk and fluency on held-out neutral prompts."""
    from .bank import weighs_as_calibration, writable_directory
    from .display import print_eval, progress_bars
    from .eval import OUTPUT_NAMES, non_fluent_gains, pyplot, write_outputs

    if plot:
        pyplot()
    try:
        gain_list = tuple(float(g) for g in gains.split(","))
    except ValueError:
        raise EqzError(f"--gains takes numbers separated by commas, e.g. -1,0,1; got '{gains}'") from None
    prompt_list = None
    if prompts:  # read as batch reads them: a study's .jsonl went to the model line by line, JSON and all
        from .batch import PromptFile

        source = PromptFile(prompts, skip_bad=None)
        try:
            rows = list(source.rows())
        finally:
            source.close()
        if any(row.system for row in rows):
            _warn(f"{prompts}: eval asks for each band in the system prompt; the file's system prompts are not used")
        prompt_list = [row.prompt.strip() for row in rows]
        if not prompt_list:
            raise EqzError(f"{prompts} has no prompts")
    chosen = _listed(bands, "--bands")
    directory = Path(output).expanduser()
    writable_directory(directory, "--output")  # before minutes of replies, not after
    earlier = {path.name for path in directory.glob("*") if path.name in OUTPUT_NAMES}
    if earlier and not replace:  # a second plain run threw the first's figures and replies away
        raise EqzError(f"{directory} holds an earlier run ({', '.join(sorted(earlier))}); pass --replace to write "
                       "over it, or choose another --output")
    with _load_model(model, threads, chatting=True, gpu_layers=gpu_layers) as loaded:
        try:
            with progress_bars() as progress:
                result = loaded.evaluate(chosen, gain_list, prompt_list, tokens, samples, progress, record)
        except KeyboardInterrupt:
            sys.stderr.write("eqz eval: interrupted; no figures were written or recorded\n")
            raise typer.Exit(130) from None
        recorded = loaded.bank if record else None
    print_eval(result, non_fluent_gains(result))
    for path in write_outputs(result, directory, plot):
        typer.echo(f"wrote {path}" + (" (replacing an earlier run's)" if path.name in earlier else ""))
    if recorded is not None:  # it may have made the user's own copy of a shipped bank, used from then on
        light = "" if weighs_as_calibration(recorded.quality["dose_response_setup"]) else (
            "; fewer reply tokens than calibration read, so its verdicts and warnings stand")
        typer.echo(f"recorded the figures of {', '.join(result.bands)} in {Path(recorded.directory) / 'bank.yaml'}"
                   f"{light}")
    if not plot and OUTPUT_NAMES[2] in earlier:
        typer.echo(f"removed {directory / OUTPUT_NAMES[2]} (an earlier run's plot; --plot draws this run's)")


@app.command()
def train(
    model: ModelOpt = None,
    bands: Annotated[
        Optional[str], typer.Option("--bands", metavar="A,B", help="comma-separated built-in bands to make \\[default: "
                                    "all ten, or none with only --band]")
    ] = None,
    described: Annotated[
        Optional[list[str]],
        typer.Option("--band", metavar="NAME=TEXT", help='a band of your own from a description: NAME="what the feeling is" (repeatable); '
                     "added to the model's bank, or trained with a new one. TEXT reads as 'You are TEXT.', so an "
                     "adjective phrase works best"),
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", metavar="", help="retrain a --band the bank already has")] = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", metavar="DIR", help="bank directory \\[default: user data dir]")] = None,
    quick: Annotated[bool, typer.Option("--quick", metavar="", help="fewer stimuli, persona and calibration replies, and "
                                        "no held-level screen unless --hold (~2x faster, noisier gains)")] = False,
    orthogonalize: Annotated[
        bool, typer.Option("--orthogonalize", metavar="", help="make the eight primaries orthogonal (less crosstalk)")
    ] = False,
    hold: Annotated[
        Optional[bool], typer.Option("--hold/--no-hold", metavar="", help="try holding each primary at a level instead of "
                                     "adding its vector, and hold those that steer better so, as the shipped bank does "
                                     "(about 2-3 minutes for a 135M model: 119 s and 148 s in two runs) "
                                     "\\[default: --hold, --no-hold with --quick]",
                                     show_default=False)
    ] = None,
    seed: Annotated[Optional[int], typer.Option(metavar="N", help="seed of every reply training samples; on one "
                                                "machine the same seed makes the same bank \\[default: 1234]",
                                                show_default=False)] = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
) -> None:
    """Train emotion vectors for a GGUF model (eqz's stimuli and the model's own voice) and calibrate every
    slider on the text it produces, scored by an emotion lexicon and by the unsteered model naming its emotion.
    About 7-12 minutes for a 135M model on 2 cores (--quick: 3-5).
    With only --band, the described bands are added to the model's existing bank (a few minutes)."""
    from .bands import BANDS, band_key, parse_described, unknown_band
    from .bank import MANIFEST, Bank, check_training_target, editing, own_bank_directory, shadowed, slug, user_data_dir
    from .display import progress_bars, print_bank

    chosen = tuple(dict.fromkeys(band_key(band) for band in _listed(bands, "--bands") or [])) or BANDS
    unknown = [b for b in chosen if b not in BANDS]
    if unknown:  # as the library's train says, before the model loads
        raise EqzError(f"{unknown_band(unknown[0], BANDS)}; a band of your own is trained with --band "
                       f"{unknown[0]}=\"what the feeling is\"")
    pairs = [parse_described(spec) for spec in described or []]
    names = [name for name, _ in pairs]
    if twice := next((name for name in names if names.count(name) > 1), None):
        raise EqzError(f"--band {twice} is given twice; give each band once")
    descriptions = dict(pairs)
    target = Path(out).expanduser() if out else None
    with _load_model(model, threads, gpu_layers=gpu_layers) as loaded:
        # described bands added to the model's bank (see EqzModel.train); with no bank, a whole one is trained
        extending = bool(descriptions) and not bands and (target is not None or loaded.bank_if_any() is not None)
        destination = target or (own_bank_directory(loaded.info) if extending else
                                 user_data_dir() / slug(loaded.info.name))
        if target is not None or not extending:
            check_training_target(destination, loaded.info, None if extending else (*chosen, *descriptions))
        doing = f"adding {', '.join(descriptions)} to the bank" if extending else "training a bank"
        saying = [f"eqz train: {doing} for {loaded.info.name} ({loaded.info.path}) in {destination}"
                  f"{'' if model else '; --model FILE trains another model'}\n"]
        started = time.monotonic()
        with editing(destination, "eqz train"):  # from reading the bank it extends to saving what it made
            had = Bank.load(destination).names if (destination / MANIFEST).exists() else ()  # --replace: retrained
            try:
                with progress_bars() as progress:
                    def said_first(stage: str, total: int):  # once the work starts: a refusal before is one line
                        while saying:
                            sys.stderr.write(saying.pop())
                        return progress(stage, total)

                    bank = loaded.train(chosen if bands else None, descriptions, quick, orthogonalize, into=target,
                                        progress=said_first, hold=hold, seed=seed, replace=replace)
            except KeyboardInterrupt:
                sys.stderr.write("eqz train: interrupted; nothing of this run was saved (the bank is as it was)\n")
                raise typer.Exit(130) from None
            directory = bank.save(destination)
        seconds = time.monotonic() - started
        shadow = shadowed(directory, loaded.info) if target is None else None
    print_bank(bank)
    use = f"{'EQZ_VECTORS=' + shlex.quote(str(directory.resolve())) + ' ' if target is not None else ''}eqz chat" + \
        (f" -m {shlex.quote(model)}" if model else "")
    if descriptions and not bands:
        def named(names: list[str]) -> str:
            return ", ".join(f"{name} ({', '.join(problems)})" if (problems := bank.open_problems(name)) else name
                             for name in names)

        added = [name for name in descriptions if name not in had]
        retrained = [name for name in descriptions if name in had]
        said = []
        if added:
            said.append(f"added {named(added)}")
        if retrained:
            said.append(f"retrained {named(retrained)}")
        typer.echo(f"{' and '.join(said)} {'in' if retrained else 'to'} the bank in {directory} in {seconds:.0f} s; "
                   f"try: {use} --set {next(iter(descriptions))}=0.5")
    elif target is not None:
        typer.echo(f"to use this bank: {use}")
    if shadow:
        _warn(shadow)


vectors_app = typer.Typer(help="List, inspect, export and import emotion vector banks; hold, remove or reset your own bank's bands.", no_args_is_help=True)
app.add_typer(vectors_app, name="vectors")


@vectors_app.command("list")
def vectors_list(json_output: JsonOpt = False) -> None:
    """List the banks eqz can find (shipped, user-trained, $EQZ_VECTORS)."""
    from dataclasses import asdict

    from .api import list_banks
    from .display import bank_listing, print_bank_list

    banks = list_banks()
    if json_output:
        typer.echo(json.dumps([{"path": str(found.directory), **asdict(found.model), "bands": list(found.band_names),
                                **listed} for found, listed in zip(banks, bank_listing(banks))], indent=2))
        return
    print_bank_list(banks)


@vectors_app.command("show")
def vectors_show(
    bank: Annotated[Optional[str], typer.Argument(metavar="BANK", help="bank directory or name \\[default: the model's bank]")] = None,
    model: ModelOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show a bank's bands, layers, calibration and quality figures."""
    from .api import read_bank
    from .display import print_bank

    if bank is None:
        with _load_model(model, None) as loaded:
            found = loaded.bank
    else:
        found = read_bank(bank)
    if json_output:  # bank.yaml, and per band the problems the check column shows and moving it warns of
        shown = found.manifest()
        for name, entry in shown["bands"].items():
            entry["open_problems"] = found.open_problems(name)
        typer.echo(json.dumps(shown, indent=2, default=str))
        return
    print_bank(found)


@vectors_app.command("export")
def vectors_export(
    output: Annotated[str, typer.Option("--output", "-o", metavar="FILE", help="the .gguf file to write")],
    set_: SetOpt = None,
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", metavar="NAME|FILE", help="start from this preset's sliders (--set wins)")] = None,
    model: ModelOpt = None,
    replace: Annotated[bool, typer.Option("--replace", metavar="", help="overwrite FILE if it exists")] = False,
) -> None:
    """Write one llama.cpp control vector for a slider mix or a preset's sliders (use with llama-cli
    --control-vector). A preset's filters and sampling do not travel: a control vector holds only the mix."""
    target = Path(output).expanduser()
    if target.exists() and not target.is_dir() and not replace:  # it may be anything: notes, a preset, a band
        raise EqzError(f"{output} exists; add --replace to overwrite it, or choose another file")
    with _load_model(model, None) as loaded:
        gains = loaded.slider_mix(_gains(set_, loaded.bank.names), preset)
        said: list[str] = []
        loaded.on_warning = said.append  # said once the file is written, not before a refusal
        path = loaded.control_vector(gains).save(output)
    for line in said:
        _warn(line)
    mix = ", ".join(f"{b}={g:g}" for b, g in gains.items() if g)
    typer.echo(f"wrote {path} ({mix}); apply with: llama-cli -m MODEL --control-vector {path}")


@vectors_app.command("import")
def vectors_import(
    file: Annotated[str, typer.Argument(metavar="FILE", help="a llama.cpp / repeng control-vector .gguf")],
    band: Annotated[str, typer.Option("--band", metavar="NAME", help="the slider name it becomes")],
    replace: Annotated[bool, typer.Option("--replace", metavar="", help="replace a band of that name already in the bank")] = False,
    model: ModelOpt = None,
) -> None:
    """Adopt a repeng or llama.cpp control vector as a band of this model's bank (gain 1 = the file as is). The
    band is unmetered: the meter, analyze and filters do not read it."""
    from .bands import band_key
    from .bank import shadowed

    with _load_model(model, None) as loaded:
        directory = loaded.import_vector(file, band, replace)
        unused = shadowed(directory, loaded.info)  # warned already: the hint's command would not know the band
    hint = "" if unused else f"; try: {_chat_with(model)} --set {band_key(band)}=0.5"
    typer.echo(f"band '{band_key(band)}' added to the bank in {directory} (unmetered){hint}")


@vectors_app.command("hold")
def vectors_hold(
    band: Annotated[str, typer.Argument(metavar="BAND", help="a metered band of the model's bank")],
    level: Annotated[str, typer.Argument(metavar="LEVEL", help="the level +1 holds it at (meter units, up to 6), or 'off'")],
    model: ModelOpt = None,
) -> None:
    """Make a slider hold its band at a level instead of adding its vector. Gain g holds g x LEVEL at every steered
    layer, like --clamp: on held-out prompts this steered more clearly than adding the vector, and five of the
    default model's primaries ship held. 'off' makes it add its vector again. A new level set here is unmeasured,
    and moving the slider says so. Changes your own copy of the bank."""
    from .bands import band_key
    from .sampling import as_number

    name, held = band_key(band), None if level.strip().lower() == "off" else level
    with _load_model(model, None) as loaded:
        directory = loaded.hold(name, held)
    doing = f"holds level {as_number(held):g}" if held is not None else "adds its vector"
    if directory is None:
        typer.echo(f"{name} already {doing}; nothing changed")
    else:
        typer.echo(f"{name} +1 now {doing} (bank in {directory}); try: {_chat_with(model)} --set {name}=1"
                   if held is not None
                   else f"{name} {doing} again (bank in {directory})")


@vectors_app.command("remove")
def vectors_remove(
    bands: Annotated[list[str], typer.Argument(metavar="BAND", help="bands to remove from your own bank for the model")],
    model: ModelOpt = None,
) -> None:
    """Remove bands (imported or described ones, say) from your own copy of the model's bank."""
    from .bands import BANDS, band_key

    names = list(dict.fromkeys(band_key(band) for band in bands))
    with _load_model(model, None) as loaded:
        directory = loaded.remove_bands(*names)
        added = [band for band in loaded.bank_if_any().names if band not in BANDS]
    typer.echo(f"removed {', '.join(names)} from the bank in {directory}")
    built_in = [band for band in names if band in BANDS]
    if built_in:  # reset is the one way back, and it takes the bands of the user's own with it
        lost = f", and drops {', '.join(added)}, which you added" if added else ""
        typer.echo(f"presets that move {', '.join(built_in)} will not load until the band is back (`eqz vectors "
                   f"reset{_model_flag(model)}` brings the shipped bank back{lost})")


@vectors_app.command("reset")
def vectors_reset(model: ModelOpt = None) -> None:
    """Delete your own copy of the model's bank (imports, described bands, retraining), so the shipped bank is
    used again."""
    with _load_model(model, None) as loaded:
        removed = loaded.reset_bank()
        now = loaded.bank_if_any()
    if removed is None:
        typer.echo("no bank of your own for this model")
    else:  # Gemma has no shipped bank: it was told "the shipped bank is in use again"
        typer.echo(f"deleted {removed}; " + (f"the bank in {now.directory} is in use again" if now else
                                             f"the model has no bank now (`eqz train{_model_flag(model)}` makes one)"))


def _stdin_text(what: str) -> str:
    """Standard input, for a ``-`` where a text goes (as ``eqz batch -`` reads its prompts)."""
    if sys.stdin.isatty():
        sys.stderr.write(f"eqz: reading {what} from the terminal; end it with Ctrl-D\n")
    try:
        text = sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as error:
        raise EqzError(f"standard input is not UTF-8 text (byte 0x{error.object[error.start]:02x}); give UTF-8") \
            from None
    if not text.strip():
        raise EqzError(f"{what}: standard input was empty")
    return text


def _model_flag(model: str | None) -> str:
    """`` -m MODEL`` as the user gave it, for a command to try next (empty for the default model)."""
    return f" -m {shlex.quote(model)}" if model else ""


def _chat_with(model: str | None) -> str:
    """The chat command for the model a bank command was given, so the hint steers that model's bank."""
    return f"eqz chat{_model_flag(model)}"


presets_app = typer.Typer(help="List, show, save and validate preset moods.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")


@presets_app.command("list")
def presets_list(json_output: JsonOpt = False) -> None:
    """List preset moods (bundled and user) with a small bar chart of each; broken files show their error."""
    from .api import list_presets
    from .display import print_preset_list

    entries = list_presets()
    if json_output:
        typer.echo(json.dumps([{"name": e.name, "path": str(e.path), "source": e.source, "error": e.error,
                                "sliders": e.preset.sliders if e.preset else None} for e in entries], indent=2))
        return
    print_preset_list(entries)


@presets_app.command("show")
def presets_show(name: Annotated[str, typer.Argument(metavar="NAME|FILE", help="preset name or a preset .yaml file")]) -> None:
    """Show one preset: description, sliders, sampling, system prompt, filters, file."""
    from .api import read_preset
    from .display import print_preset

    print_preset(read_preset(name))


@presets_app.command("save")
def presets_save(
    name: Annotated[str, typer.Argument(metavar="NAME", help="name of the new preset")],
    set_: SetOpt = None,
    from_: Annotated[Optional[str], typer.Option("--from", metavar="NAME|FILE", help="start from this preset (by name or .yaml file)")] = None,
    description: Annotated[Optional[str], typer.Option("--description", "-d", metavar="TEXT", help="one line about the mood")] = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = None,
    seed: SeedOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    clamp: ClampOpt = None,
    ablate: AblateOpt = None,
    replace: Annotated[bool, typer.Option("--replace", metavar="", help="overwrite a saved preset of that name")] = False,
) -> None:
    """Save a user preset from --set gains, sampling and filters (on top of an optional --from preset) to the user
    config dir: everything a preset file can hold."""
    from .api import save_preset
    from .bank import known_band_names
    from .presets import BUNDLED_DIR

    flags = dict(max_tokens=max_tokens, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                 repeat_penalty=repeat_penalty)
    clamps, notches = _clamp_ablate(clamp, ablate)
    path = save_preset(name, sliders=_gains(set_, known_band_names()), based_on=from_, description=description or None,
                       system=system, sampling={k: v for k, v in flags.items() if v is not None}, clamp=clamps,
                       ablate=notches, replace=replace)
    typer.echo(f"saved {path}")
    if (BUNDLED_DIR / f"{path.stem}.yaml").exists():  # a user's .yml stands in for it too
        typer.echo(f"it stands in for the bundled '{path.stem}'; delete that file to have the bundled one back")


@presets_app.command("validate")
def presets_validate(file: Annotated[str, typer.Argument(metavar="FILE", help="a preset YAML file")]) -> None:
    """Check a preset file: prints 'ok' or the one problem found (and exits non-zero)."""
    from .api import read_preset

    from .bands import gain_warnings

    preset = read_preset(Path(file))
    sliders, settings = len(preset.sliders), len(preset.sampling)
    typer.echo(f"ok: {preset.name} ({sliders} slider{'s' * (sliders != 1)}, "
               f"{settings} sampling setting{'s' * (settings != 1)})")
    for line in gain_warnings(preset.sliders.items()):  # said when it is used; a check of the file says it first
        _warn(line)


# -- entry point ---------------------------------------------------------------------------------------------


def _fail(message: str, code: int) -> None:
    sys.stderr.write(_for_stderr("eqz: error: ", message))
    sys.exit(code)


def _command_tree(command, path: tuple[str, ...] = ()):
    """(the words that name it after `eqz`, the command) for ``command`` and every command below it."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_tree(sub, path + (name,))


def _bare_help_flag(command, help_names: list[str]) -> None:
    """Print -h/--help without the `<bool>` typer 0.29 puts after it: eqz's own flags pass metavar="" for that, and
    click makes the help option itself, once per command (cached), so it is done here for every command."""
    option = command.get_help_option(typer.Context(command, help_option_names=help_names))
    if option is not None:
        option.metavar = ""


def _one_line_summary(command) -> None:
    """List the command by its help's first sentence, on one line: typer's rich help keeps a docstring's line
    breaks in a group's command list, so on an 80-column terminal entries broke mid-phrase and ran to four lines."""
    if command.short_help is None and command.help:
        first_paragraph = " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split())
        command.short_help = re.split(r"(?<=\.)\s", first_paragraph, maxsplit=1)[0]


# a disk full, a quota reached, a file-size limit hit: errors of the machine's state that any write may meet
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def main() -> None:
    """Run the CLI: bad input becomes one line on stderr and a non-zero exit (a traceback only with --debug)."""
    try:
        command = typer.main.get_command(app)
        for _, each in _command_tree(command):
            _bare_help_flag(each, app.info.context_settings["help_option_names"])
            _one_line_summary(each)
    except KeyboardInterrupt:  # Ctrl-C at once: quiet, as later
        sys.exit(130)
    args = sys.argv[1:]
    cut = args.index("--") if "--" in args else len(args)  # after "--" everything is text
    if "--debug" in args[:cut]:  # accepted after the command too
        args = ["--debug"] + [arg for arg in args[:cut] if arg != "--debug"] + args[cut:]
    try:
        code = command.main(args=args, prog_name="eqz", standalone_mode=False)
    except EqzError as error:
        if _state["debug"]:
            raise
        _fail(str(error), error.exit_code)
    except typer.TyperException as error:  # usage errors from typer's own click (typer >= 0.29, see pyproject)
        if not hasattr(error, "format_message"):
            raise
        if type(error).__name__ == "NoArgsIsHelpError":  # `eqz`, `eqz presets`: the help was the answer
            sys.exit(0)
        hint = f" (see {error.ctx.command_path} --help)" if getattr(error, "ctx", None) else ""
        _fail(error.format_message() + hint, error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # an eqz bug: still one line, unless --debug
        if _state["debug"]:
            raise
        if isinstance(error, OSError) and error.errno in _FULL:  # the machine's state, not a bug: say what to do
            where = f" writing {error.filename}" if error.filename else ""
            _fail(f"{error.strerror}{where}: free some space (or raise the limit) and run it again; what was "
                  "finished before is kept (a batch goes on with --resume)", 1)
        _fail(f"unexpected {type(error).__name__}: {error} (run with --debug for the traceback)", 1)
    sys.exit(code if isinstance(code, int) else 0)
