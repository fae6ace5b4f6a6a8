"""`supir-mlx` command line: a thin shell over the Python API.

Each command lives in its own module and is imported only when it runs, so `supir-mlx --help`
stays fast and a broken optional part cannot take the other commands down.
"""

from __future__ import annotations

import importlib

import click

# command name -> (module, attribute)
COMMANDS = {
    "caption": ("supir_mlx.cli.caption", "caption"),
    "conformance": ("supir_mlx.cli.conformance", "conformance"),
    "convert": ("supir_mlx.cli.convert", "convert"),
    "convert-llava": ("supir_mlx.cli.caption", "convert_llava"),
    "download": ("supir_mlx.cli.download", "download"),
    "info": ("supir_mlx.cli.info", "info"),
    "restore": ("supir_mlx.cli.restore", "restore"),
    "studio": ("supir_mlx.cli.studio", "studio"),
    "watch": ("supir_mlx.cli.watch", "watch"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="supir-mlx")
def main() -> None:
    """SUPIR photo restoration for Apple-silicon Macs (MLX).

    Results are generative reconstructions: plausible detail is synthesised, not recovered.
    """
