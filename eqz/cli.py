"""The ``eqz`` command line: parsing and display only; the work is done in the modules it calls."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from typer._click.exceptions import ClickException  # typer >= 0.2x vendors click

from . import __version__
from .errors import EqzError

EXAMPLES = """
Examples:

  eqz chat                                   chat with the default model
  eqz generate "Describe your morning." --seed 1
  eqz generate "Hi" --vector joy.gguf:0.8 --json
  eqz models                                 what model eqz loads, its shape and template
"""

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

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="GGUF model file [default: $EQZ_MODEL, else SmolLM2-135M-Instruct]"),
]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="CPU threads [default: physical cores]", min=1)]
CtxOpt = Annotated[int, typer.Option("--ctx", help="context window in tokens", min=64)]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", help="system prompt")]
VectorOpt = Annotated[
    Optional[list[str]],
    typer.Option("--vector", help="llama.cpp control vector FILE[:SCALE], repeatable; summed like llama.cpp"),
]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", "-n", help="most tokens per reply [256]")]
SeedOpt = Annotated[Optional[int], typer.Option(help="random seed [random]")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", "-t", help="0 = greedy [0.7]")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", help="nucleus sampling [0.95]")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", help="0 = off [40]")]
MinPOpt = Annotated[Optional[float], typer.Option("--min-p", help="[0.05]")]
RepeatPenaltyOpt = Annotated[Optional[float], typer.Option("--repeat-penalty", help="1 = off [1.1]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one machine-readable JSON record")]


def _sampling(max_tokens, seed, temperature, top_p, top_k, min_p, repeat_penalty):
    from .sampling import make_sampling

    return make_sampling(
        max_tokens=max_tokens,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
    )


def _steering(vectors: list[str] | None):
    from .steering import Steering
    from .vector_files import parse_scaled_path

    steering = Steering()
    for spec in vectors or []:
        path, scale = parse_scaled_path(spec)
        steering = Steering(steering.vectors + ((str(path), scale),))
    return steering


def _load_model(model: str | None, threads: int | None, chatting: bool = False):
    from .engine import Model
    from .models import resolve_model_path

    loaded = Model(resolve_model_path(model), threads=threads)
    if chatting and not loaded.info.has_chat_template:
        _warn(f"{loaded.info.name} has no chat template; using a plain 'User:/Assistant:' transcript")
    return loaded


def _warn(message: str) -> None:
    sys.stderr.write(f"eqz: warning: {message}\n")


# -- commands ------------------------------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"eqz {__version__} (llama-cpp-python {version('llama_cpp_python')})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show llama.cpp's log and full tracebacks")] = False,
) -> None:
    _state["debug"] = debug
    if debug:
        from .engine import set_verbose

        set_verbose(True)


@app.command()
def models(
    paths: Annotated[Optional[list[str]], typer.Argument(help="GGUF files [default: the model eqz would load]")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Show a model's path, architecture, layers, width, context length and whether it has a chat template."""
    from rich.console import Console
    from rich.table import Table

    infos = []
    for path in paths or [None]:
        with _load_model(path, None) as model:
            infos.append(model.info.to_dict())
    if json_output:
        typer.echo(json.dumps(infos if paths and len(paths) > 1 else infos[0], indent=2))
        return
    table = Table(show_header=True, header_style="bold")
    for column in ("path", "architecture", "n_layer", "n_embd", "context", "chat template"):
        table.add_column(column)
    for info in infos:
        table.add_row(
            info["path"],
            info["architecture"],
            str(info["n_layer"]),
            str(info["n_embd"]),
            str(info["n_ctx_train"]),
            "found" if info["chat_template"] else "none (plain User:/Assistant: fallback)",
        )
    Console().print(table)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the user message")],
    model: ModelOpt = None,
    system: SystemOpt = None,
    vector: VectorOpt = None,
    max_tokens: MaxTokensOpt = None,
    seed: SeedOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    json_output: JsonOpt = False,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = 4096,
) -> None:
    """Generate one reply to PROMPT, streamed to stdout."""
    from .session import ChatSession, model_record

    sampling = _sampling(max_tokens, seed, temperature, top_p, top_k, min_p, repeat_penalty)
    steering = _steering(vector)
    with _load_model(model, threads, chatting=True) as loaded:
        session = ChatSession(loaded, sampling, system=system, steering=steering, n_ctx=ctx)
        turn = session.reply(prompt)
        for piece in turn:
            if not json_output:
                sys.stdout.write(piece)
                sys.stdout.flush()
        if json_output:
            record = {
                "prompt": prompt,
                "system": system,
                "output": turn.text,
                "model": model_record(loaded),
                **turn.record.to_dict(),
            }
            typer.echo(json.dumps(record, ensure_ascii=False))
        else:
            sys.stdout.write("\n")
        session.close()


@app.command()
def chat(
    model: ModelOpt = None,
    system: SystemOpt = None,
    vector: VectorOpt = None,
    max_tokens: MaxTokensOpt = None,
    seed: SeedOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = 4096,
) -> None:
    """Chat in the terminal with streamed replies; /help lists the slash commands."""
    from .session import ChatSession
    from .tui import run_chat

    sampling = _sampling(max_tokens, seed, temperature, top_p, top_k, min_p, repeat_penalty)
    steering = _steering(vector)
    with _load_model(model, threads, chatting=True) as loaded:
        session = ChatSession(loaded, sampling, system=system, steering=steering, n_ctx=ctx)
        try:
            run_chat(session)
        finally:
            session.close()


# -- entry point ---------------------------------------------------------------------------------------------


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"eqz: error: {message}\n")
    sys.exit(code)


def main() -> None:
    """Run the CLI: bad input becomes one line on stderr and a non-zero exit (a traceback only with --debug)."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=sys.argv[1:], prog_name="eqz", standalone_mode=False)
    except EqzError as error:
        if _state["debug"]:
            raise
        _fail(str(error), error.exit_code)
    except ClickException as error:
        hint = f" (see {error.ctx.command_path} --help)" if getattr(error, "ctx", None) else ""
        _fail(error.format_message() + hint, error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # an eqz bug: still one line, unless --debug
        if _state["debug"]:
            raise
        _fail(f"unexpected {type(error).__name__}: {error} (run with --debug for the traceback)", 1)
    sys.exit(code if isinstance(code, int) else 0)
