from pathlib import Path

import pytest

REFERENCE = Path(__file__).parent / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, reference_dir) -> Path:
    """The tiny random-weight reference checkpoint converted once (fp32) for tests that run whole restores."""
    from click.testing import CliRunner

    from supir_mlx.cli import main

    out = tmp_path_factory.mktemp("tiny") / "weights"
    r = CliRunner().invoke(main, [
        "convert", str(reference_dir / "tiny" / "supir_tiny.safetensors"),
        "--config", str(reference_dir / "tiny" / "config.json"), "--dtype", "float32", "-o", str(out),
    ])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def weights(tiny_weights) -> Path:
    """The converted tiny weights under the name the CLI tests use (read-only: copy before breaking them)."""
    return tiny_weights


@pytest.fixture(scope="session", autouse=True)
def config_dir(tmp_path_factory) -> Path:
    """A private config folder: the self-signed Content Credentials key is made there, not in the user's."""
    import os

    folder = tmp_path_factory.mktemp("config")
    os.environ["SUPIR_MLX_CONFIG"] = str(folder)
    return folder
