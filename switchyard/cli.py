"""The `switchyard` command. Each package registers its own subcommands (`<pkg>.cli.register`).

Heavy imports (torch, vllm, transformers) stay inside the commands, so `switchyard --help` is fast.
Errors: a SwitchyardError becomes one line on stderr and a non-zero exit; `--debug` adds the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import typer

try:  # typer >= 0.20 vendors click as typer._click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from switchyard.errors import SwitchyardError

# each module has `register(app)`; a package may split its commands over several modules
COMMAND_MODULES = (
    "demo.cli",
    "merger.cli",
    "merger.quantize_cli",
    "deploy.cli",
    "gateway.cli",
    "loadtests.cli",
)

app = typer.Typer(
    name="switchyard",
    help="Serve fine-tuned LLMs as LoRA adapters or merged checkpoints, and switch between them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    """switchyard: merge-or-adapter serving for fine-tuned LLMs."""


def build_app() -> typer.Typer:
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(app)
    return app


# one-shot commands that end with every file written, fsynced and closed and no child process:
# as the process's own entry point they skip the interpreter's finalisation, which after `import
# torch` takes ~0.3 s (7% of a 1.1B merge's wall time on 2 cores; docs/benchmarks.md, Merge)
QUICK_EXIT = frozenset({"merge"})


def main(argv: list[str] | None = None) -> None:
    entry_point = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        result = build_app()(args=argv, prog_name="switchyard", standalone_mode=False)
    except SwitchyardError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except click_exc.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(0)
    except click_exc.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    code = result if isinstance(result, int) else 0
    command = next((a for a in argv if not a.startswith("-")), None)
    if entry_point and command in QUICK_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
