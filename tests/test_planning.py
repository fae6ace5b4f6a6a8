"""The plan and the run are one thing: what `restore --plan` prints is the plan each restore runs with, for
converted folders as for downloaded weights (pipeline.planning)."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from supir_mlx.cli import main
from supir_mlx.config import SUPIRConfig
from supir_mlx.pipeline.planning import LoadOptions, plan_run
from supir_mlx.pipeline.restore import Restorer
from supir_mlx.pipeline.settings import settings_for

FAST = ["--steps", "2", "--min-size", "64", "--prompt", "a test chart", "-q"]


def convert(reference_dir, out, dtype="float32"):
    r = CliRunner().invoke(main, ["convert", str(reference_dir / "tiny" / "supir_tiny.safetensors"), "--config",
                                  str(reference_dir / "tiny" / "config.json"), "--dtype", dtype, "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, reference_dir):
    root = tmp_path_factory.mktemp("w")
    return {"fp32": convert(reference_dir, root / "tiny32"), "fp16": convert(reference_dir, root / "tiny16", "float16")}


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SUPIR_MLX_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def photo(path, size):
    rng = np.random.default_rng(sum(size))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(path)
    return path


def plan_blocks(text):
    """{input file name: its printed plan} from `restore --plan` output."""
    blocks, name = {}, None
    for line in text.splitlines():
        if m := re.match(r"^(\S+): \d+x\d+ -> output", line):
            name = m.group(1).rsplit("/", 1)[-1]
            blocks[name] = []
        elif name and line.startswith(("Memory plan", "  ")):
            blocks[name].append(line)
    return {k: "\n".join(v) for k, v in blocks.items()}


@pytest.mark.parametrize("folder, extra", [
    ("fp32", ["--memory-limit", "64"]),  # everything resident
    ("fp32", ["--memory-limit", "0.35"]),  # only fits loading the weights per stage
    ("fp16", ["--memory-limit", "1", "--quantize", "8"]),  # --plan and the run both quantize a converted folder
    ("fp32", ["--memory-limit", "64", "--quantize", "4", "--tile-size", "8"]),
])
def test_the_run_uses_exactly_the_printed_plan(folders, tmp_path, monkeypatch, folder, extra):
    src = tmp_path / "in"
    src.mkdir()
    photo(src / "wide.png", (48, 24))
    photo(src / "small.png", (20, 20))
    args = ["restore", str(src), "-o", str(tmp_path / "out"), "--weights", str(folders[folder]), *FAST, *extra]
    r = CliRunner().invoke(main, [*args, "--plan"])
    assert r.exit_code == 0, r.output
    printed = plan_blocks(r.output)
    assert set(printed) == {"wide.png", "small.png"} and "fits" in printed["wide.png"]
    if "--quantize" in extra:
        bits = extra[extra.index("--quantize") + 1]
        assert f"quantization {bits}-bit" in printed["wide.png"]

    used = {}
    real = Restorer.restore

    def spy(self, image, settings=None, **kw):
        result = real(self, image, settings, **kw)
        used[len(used)] = str(result.plan)
        return result

    monkeypatch.setattr(Restorer, "restore", spy)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "2 done" in r.output
    assert sorted(used.values()) == sorted(printed.values())  # batch order is by name: small, then wide


def _full_size_folder(path):
    """A folder describing the real SDXL/SUPIR-v0 architecture in fp16, with sparse shards of the right sizes:
    enough for everything that happens before the weights are read."""
    from supir_mlx import memory
    import mlx.core as mx

    path.mkdir()
    (path / "config.json").write_text(json.dumps(SUPIRConfig.sdxl_v0().to_dict()))
    cfg = SUPIRConfig.sdxl_v0()
    total = sum(memory.weight_bytes(cfg, c, mx.float16, None) for c in ("denoiser", "text"))
    total += memory.weight_bytes(cfg, "vae", mx.float32, None)
    shards, left, limit = [], total, 2 * 1024**3
    while left:
        n = min(limit, left)
        name = f"weights-{len(shards) + 1:05d}.safetensors"
        shards.append({"file": name, "bytes": n, "tensors": 1})
        header = b""
        for _ in range(2):  # one uint8 tensor filling the rest of the (sparse) file
            rest = n - 8 - len(header)
            header = json.dumps({"w": {"dtype": "U8", "shape": [rest], "data_offsets": [0, rest]}}).encode()
        with open(path / name, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            f.truncate(n)
        left -= n
    (path / "manifest.json").write_text(json.dumps({"format": "supir-mlx-weights", "version": 1, "shards": shards}))
    return path


def test_a_full_size_folder_gets_the_quantization_downloads_get(tmp_path, monkeypatch):
    """24 GB machine, CPU backend (fp32 compute): budget 12 GB. Unquantized does not fit, 8-bit does; the
    folder run loads 8-bit as the plan says instead of refusing."""
    folder = _full_size_folder(tmp_path / "full")
    img = photo(tmp_path / "p.png", (512, 512))
    args = ["restore", str(img), "--weights", str(folder), "--prompt", "x", "--memory-limit", "12", "--dtype", "float32"]
    r = CliRunner().invoke(main, [*args, "--plan"])
    assert r.exit_code == 0, r.output
    assert "quantization 8-bit" in r.output and "fits" in r.output

    loaded = {}

    def fake_from_weights(directory, **kw):
        loaded.update(kw, directory=directory)
        raise RuntimeError("stop before reading the weights")

    monkeypatch.setattr(Restorer, "from_weights", staticmethod(fake_from_weights))
    r = CliRunner().invoke(main, args)
    assert loaded["quantize"] == 8 and loaded["dtype"] == "float32" and loaded["memory_limit_gb"] == 12
    assert "stop before reading the weights" in r.output and "--quantize applies" not in r.output
    # the same choices through the API, for downloaded weights and the folder alike
    s = settings_for(prompt="x")
    for opts in (LoadOptions(weights=folder, memory_limit_gb=12, dtype="float32"),
                 LoadOptions(memory_limit_gb=12, dtype="float32", captioner="none")):
        run = plan_run([(512, 512)], s, opts, captioned=False)
        assert run.quant.bits == 8 and run.inputs[0].plan.quant.bits == 8


def test_batch_choices_apply_to_every_input(folders):
    """The weights are loaded once: the strongest quantization any input needs is in every input's plan."""
    s = settings_for(min_size=64)
    full = LoadOptions(dtype="float32", memory_limit_gb=12, captioner="none")
    run = plan_run([(256, 256), (1024, 1024)], s, full, captioned=False)
    assert run.fits and {p.plan.quant.bits for p in run.inputs} == {run.quant.bits}
    alone = plan_run([(256, 256)], s, full, captioned=False)
    assert alone.inputs[0].plan.quant is None or alone.inputs[0].plan.quant.bits >= run.quant.bits
    # refusal: one line naming the input
    tight = plan_run([(64, 64)], s, LoadOptions(weights=folders["fp32"], memory_limit_gb=0.1), captioned=False)
    assert not tight.fits and tight.refusal().startswith("64x64 input: a 64x64 restore needs at least")
