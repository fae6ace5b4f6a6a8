"""The conformance runner takes every call parameter from a case's index.json `params` (or its metadata), never
from its file name or from constants that happen to match the shipped cases."""

import json
import shutil

from safetensors.numpy import load_file, save_file

from supir_mlx import conformance


def _entry(ref, rel):
    return next(e for e in json.loads((ref / "index.json").read_text()) if e["file"] == rel)


def _variant(root, ref, entries):
    """A reference directory holding `entries` (file -> (tensors, params)), the tiny model and the README."""
    root.mkdir()
    (root / "tiny").symlink_to(ref / "tiny")
    shutil.copy(ref / "README.md", root / "README.md")
    index = []
    for rel, (tensors, params) in entries.items():
        (root / rel).parent.mkdir(exist_ok=True)
        save_file(tensors, str(root / rel))  # no metadata: the params below are all there is
        index.append({"file": rel, "group": rel.split("/")[0], "params": params})
    (root / "index.json").write_text(json.dumps(index))
    return root


def _results(root):
    return {r.name: r for r in conformance.run(root)}


def test_preprocess_cases_whose_names_do_not_say_their_parameters(tmp_path, reference_dir):
    """Official outputs under names that state other parameters: only the params say what was called."""
    pre = reference_dir / "preprocess"
    up1 = "preprocess/pil2tensor_45x30_up1_min100_fixNone.safetensors"
    g2, g1 = "preprocess/gradio_45x30_up2_min64_unit32.safetensors", "preprocess/gradio_45x30_up1_min100_unit32.safetensors"
    gradio = load_file(str(pre / g1.split("/")[1]))
    # fix_resize(hwc3, 64, unit 32) is, by construction, the official up2/min64/unit32 upscale of the same image
    gradio["fix_resize_uint8"] = load_file(str(pre / g2.split("/")[1]))["upscaled_uint8"]
    entries = {
        "preprocess/pil2tensor_45x30_up2_min64_fixNone.safetensors": (load_file(str(reference_dir / up1)),
                                                                       _entry(reference_dir, up1)["params"]),
        "preprocess/gradio_45x30_up2_min64_unit32.safetensors": (gradio, {
            **_entry(reference_dir, g1)["params"], "fix_resize_size": 64, "fix_resize_unit_resolution": 32}),
    }
    results = _results(_variant(tmp_path / "ref", reference_dir, entries))
    assert {n: r.status for n, r in results.items()} == {
        "preprocess/pil2tensor_45x30_up2_min64_fixNone": "PASS", "preprocess/gradio_45x30_up2_min64_unit32": "PASS"}


CASES = [
    "unet/unet_8x8_cs0.6.safetensors",
    "denoiser/denoiser_call_cs0.7.safetensors",
    "tilevae/tilevae.safetensors",
    "sampler/sampler_D_8x12_churn0_rcfg2_linCtrl.safetensors",
    "tiled_sampler/tiled_sampler_T1_12x16_t8s4_churn0.safetensors",
    "dpmpp/dpmpp_sigmas.safetensors",
    "dpmpp/dpmpp_run_DP3_8x8_5steps_eta0.5_linCFG.safetensors",
    "pipeline/pipeline_P1_64x64_wavelet_testpy.safetensors",
]


def test_every_group_reads_the_index_params(tmp_path, reference_dir):
    """The same official cases with their safetensors metadata stripped: the index's params suffice."""
    entries = {rel: (load_file(str(reference_dir / rel)), _entry(reference_dir, rel)["params"]) for rel in CASES}
    results = _results(_variant(tmp_path / "ref", reference_dir, entries))
    assert len(results) == len(CASES)
    bad = {n: r.line() for n, r in results.items() if r.status != "PASS"}
    assert not bad


def test_a_missing_parameter_is_named(tmp_path, reference_dir):
    rel = "unet/unet_8x8_cs0.6.safetensors"
    results = _results(_variant(tmp_path / "ref", reference_dir, {rel: (load_file(str(reference_dir / rel)), {})}))
    r = results["unet/unet_8x8_cs0.6"]
    assert r.status == "ERROR" and "records no 'control_scale'" in r.detail


def test_params_win_over_metadata(tmp_path, reference_dir):
    """A case whose index params disagree with a stale metadata value replays what the index says."""
    from safetensors import safe_open

    rel = "unet/unet_8x8_cs0.6.safetensors"
    with safe_open(str(reference_dir / rel), "numpy") as f:
        meta = {**f.metadata(), "control_scale": "1.0"}  # stale: the outputs were made with 0.6
    root = _variant(tmp_path / "ref", reference_dir, {rel: (load_file(str(reference_dir / rel)), {"control_scale": 0.6})})
    save_file(load_file(str(reference_dir / rel)), str(root / rel), metadata=meta)
    assert _results(root)["unet/unet_8x8_cs0.6"].status == "PASS"
