"""The sampling fixture groups through the conformance runner, with the real tiny network."""

from pathlib import Path

import pytest

from supir_mlx.conformance import Context, discover, run_case

REFERENCE = Path(__file__).parent / "reference"
# dpmpp_pipeline_* is a full-pipeline case (VAE, text encoders, sampler), checked with the pipeline.
SELECT = ["sigmas", "denoiser", "sampler", "tiled_sampler", "dpmpp_sigmas", "dpmpp_run_", "dpmpp_tiled_"]
CASES = discover(REFERENCE, SELECT)


@pytest.fixture(scope="module")
def ctx():
    return Context(REFERENCE)


def test_every_sampling_case_is_selected():
    assert {p.parent.name for p in CASES} == {"sigmas", "denoiser", "sampler", "tiled_sampler", "dpmpp"}
    assert len(CASES) == 15


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_case_passes(path, ctx):
    result = run_case(path, ctx)
    assert result.status == "PASS", result.line()
