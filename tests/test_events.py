"""Events: the README's table is the schema, `restore --json` follows it line by line, the API delivers the same."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from supir_mlx import events
from supir_mlx.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--steps", "2", "--min-size", "64", "--prompt", "a test chart"]


def photo(path, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def readme_schema() -> dict[str, set[str]]:
    """kind -> field names, from the README's events table (the first backticked word of each field entry)."""
    text = README.read_text()
    table = text[text.index("| event | fields | when |"):]
    table = table[: table.index("\n\n")]
    schema = {}
    for row in table.splitlines()[2:]:
        kind, fields, _ = [c.strip() for c in row.strip("|").split("|")]
        # a field is a backticked name at the start of a comma-separated entry (parentheses are explanations)
        entries = re.sub(r"\([^)]*\)", "", fields).split(",")
        schema[kind.strip("`")] = {re.match(r"\s*`(\w+)`", e).group(1) for e in entries}
    return schema


def test_readme_documents_exactly_the_schema():
    assert readme_schema() == {k: set(v) for k, v in events.SCHEMA.items()}


def test_check_catches_what_breaks_the_contract():
    ok = {"event": "skipped", "time": 1.5, "index": 1, "input": "a.png", "output": "b.png", "reason": "output exists"}
    assert events.check(ok) == []
    assert events.check({**ok, "reason": 3}) == ["skipped.reason: int, documented as str"]
    assert events.check({k: v for k, v in ok.items() if k != "reason"}) == ["skipped: missing reason"]
    assert events.check({**ok, "extra": 1}) == ["skipped: undocumented field extra"]
    assert events.check({"event": "nope", "time": 1.0}) == ["unknown event kind 'nope'"]


def test_restore_json_lines_follow_the_schema(weights, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    photo(src / "a.png", seed=1)
    photo(src / "b.png", seed=2)
    (src / "c.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_supir.png").write_bytes(b"done before")  # an existing output: skipped, not redone
    r = CliRunner().invoke(main, ["restore", str(src), "-o", str(out), "--weights", str(weights),
                                                  "--json", "--tile-size", "8", "--tile-stride", "8", *FAST, "--min-size", "128"])
    assert r.exit_code == 1, r.stderr  # one input failed
    lines = r.stdout.splitlines()
    decoded = [json.loads(line) for line in lines]  # stdout is nothing but JSON lines
    for e in decoded:
        assert events.check(e) == [], e
    kinds = [e["event"] for e in decoded]
    assert kinds[0] == "plan" and kinds[-1] == "summary"
    plan = decoded[0]
    assert plan["count"] == 3 and [i["input"] for i in plan["items"]] == [str(src / n) for n in ("a.png", "b.png", "c.png")]
    by_input = {}
    for e in decoded:
        if "input" in e:
            by_input.setdefault(Path(e["input"]).name, []).append(e)
    a = by_input["a.png"]
    assert [e["event"] for e in a if e["event"] != "stage"] == ["start", "step", "step", "result"]
    stages = [e["stage"] for e in a if e["event"] == "stage"]
    assert stages[0] == "stage1" and stages[-1] == "decode" and "condition" in stages and "sample" in stages
    steps = [e for e in a if e["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2] and steps[-1]["time_left"] == 0 and steps[0]["tiles"] > 1
    sample = [e for e in a if e.get("stage") == "sample"]
    assert sample[-1]["done"] == sample[-1]["total"] == 2 * steps[0]["tiles"]  # tiles count as work
    result = a[-1]
    assert result["outputs"] == [str(out / "a_supir.png")] and Path(result["output"]).is_file()
    assert result["caption"] == "a test chart" and result["provenance"]["settings"]["steps"] == 2
    assert "generative reconstruction" in result["provenance"]["notice"].lower()
    assert [e["event"] for e in by_input["b.png"]] == ["skipped"]
    assert [e["event"] for e in by_input["c.png"]] == ["start", "error"]
    assert "c.png" in by_input["c.png"][-1]["message"]
    summary = decoded[-1]
    assert (summary["done"], summary["skipped"], summary["failed"], summary["interrupted"]) == (1, 1, 1, False)
    # the human lines went to stderr
    assert "a_supir.png" in r.stderr and "1 done, 1 skipped, 1 failed" in r.stderr


def test_restore_json_reports_an_early_refusal(weights, tmp_path):
    r = CliRunner().invoke(main, ["restore", str(tmp_path / "missing.png"), "--json",
                                                  "--weights", str(weights)])
    assert r.exit_code == 1
    (line,) = r.stdout.splitlines()
    e = json.loads(line)
    assert events.check(e) == [] and e["event"] == "error" and "missing.png" in e["message"]
    assert "Traceback" not in r.stderr and "missing.png" in r.stderr


@pytest.mark.parametrize("sampler, tiled", [("edm", False), ("edm", True), pytest.param("dpmpp", True, marks=pytest.mark.slow)])
def test_api_step_events_carry_the_latent_and_x0(weights, tmp_path, sampler, tiled):
    """Python callbacks get the current latent and the step's x0; the last step's latent is what gets decoded."""
    from supir_mlx import Restorer

    restorer = Restorer.from_weights(weights)
    seen = []
    tiles = dict(tile_size=8, tile_stride=8) if tiled else {}
    restorer.restore(Image.open(photo(tmp_path / "p.png", size=(32, 32))), prompt="", steps=3, min_size=128, sampler=sampler,
                     color_fix="none", on_event=seen.append, **tiles)
    steps = [e for e in seen if e.kind == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3] and all(e["tiles"] == (4 if tiled else 1) for e in steps)
    assert all(e.latent.shape == (1, 16, 16, 4) and e.denoised.shape == (1, 16, 16, 4) for e in steps)
    assert "latent" not in steps[0].to_json() and events.check(json.loads(steps[0].to_json())) == []
    # at the last sigma (0) the sampler's output is its denoised estimate
    assert np.abs(np.array(steps[-1].latent) - np.array(steps[-1].denoised)).max() < 1e-4
    # the stage events cover every stage in order
    order = [e["stage"] for e in seen if e.kind == "stage"]
    assert [s for i, s in enumerate(order) if i == 0 or order[i - 1] != s] == list(events.STAGES[1:])  # no caption
