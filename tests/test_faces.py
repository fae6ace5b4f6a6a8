"""Face mode networks and geometry: reference conformance, the real checkpoints' key manifests, strict loading,
detector post-processing properties."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from supir_mlx.conformance import run
from supir_mlx.models.parsenet import ParseNet, ParseNetConfig
from supir_mlx.models.retinaface import RetinaFace, RetinaFaceConfig, nms, priors
from supir_mlx.weights.faces import Unprefixed, load_parsenet, load_retinaface
from supir_mlx.weights.loading import WeightError, is_ignored, plan


def test_face_conformance(reference_dir):
    results = list(run(reference_dir, ["face/"]))
    assert len(results) == 8
    for r in results:
        assert r.status == "PASS", r.line()


class Shapes(dict):
    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self[key])


def _manifest(reference_dir, name: str) -> dict:
    return json.loads((reference_dir / "face" / f"manifest_{name}.json").read_text())


@pytest.mark.parametrize(
    "name, build, prefix",
    [("retinaface_resnet50", lambda: RetinaFace(RetinaFaceConfig()), "module."), ("parsenet", lambda: ParseNet(ParseNetConfig()), "")],
)
def test_real_checkpoints_map_one_to_one(reference_dir, name, build, prefix):
    """Every tensor of the real file (detector keys as stored, with DataParallel's 'module.') fills exactly one
    parameter of the default-config model, and the parameter counts agree."""
    manifest = _manifest(reference_dir, name)
    shapes = Shapes({prefix + k: v for k, v in manifest["tensors"].items()})
    assert len(shapes) == manifest["num_tensors"]
    params = {k: tuple(p.shape) for k, p in tree_flatten(build().parameters())}
    mapping = plan(params, Unprefixed(shapes))
    assert len(mapping) == len(params)
    ignored = [k for k in manifest["tensors"] if is_ignored(k)]
    assert all(k.endswith(".num_batches_tracked") for k in ignored)
    # the manifest counts nn.Module parameters: BatchNorm running statistics and counters are buffers
    numel = sum(int(np.prod(s)) for k, s in params.items() if not k.endswith(("running_mean", "running_var")))
    assert numel == manifest["num_params"]


def test_strict_loading_names_the_key(reference_dir):
    from safetensors.numpy import load_file

    weights = load_file(str(reference_dir / "face" / "parsenet_tiny_weights.safetensors"))
    cfg = ParseNetConfig(in_size=64, out_size=64, min_feat_size=16, base_ch=16, res_depth=2, ch_range=(8, 32))
    load_parsenet(weights, cfg)
    missing = dict(weights)
    del missing["body.1.conv2.conv2d.weight"]
    with pytest.raises(WeightError, match="missing key 'body.1.conv2.conv2d.weight'"):
        load_parsenet(missing, cfg)
    with pytest.raises(WeightError, match="unexpected key 'body.2.conv1.conv2d.weight'"):
        load_parsenet({**weights, "body.2.conv1.conv2d.weight": weights["body.1.conv1.conv2d.weight"]}, cfg)
    with pytest.raises(WeightError, match="shape mismatch"):
        load_parsenet(weights, ParseNetConfig(in_size=64, out_size=64, min_feat_size=16, base_ch=16, res_depth=2))


def test_detector_loads_data_parallel_keys(reference_dir):
    from safetensors.numpy import load_file

    weights = load_file(str(reference_dir / "face" / "retinaface_tiny_weights.safetensors"))
    cfg = RetinaFaceConfig(layers=(1, 1, 1, 1), width_per_group=16, out_channel=64)
    plain = load_retinaface(weights, cfg)
    wrapped = load_retinaface({"module." + k: v for k, v in weights.items()}, cfg)
    x = mx.random.normal((1, 64, 96, 3), key=mx.random.key(0)) * 50
    for a, b in zip(plain(x), wrapped(x)):
        assert np.array_equal(np.array(a), np.array(b))


def test_priors_cover_odd_sizes():
    """Feature maps are ceil(size / step) on every level, matching the network's strided outputs."""
    cfg = RetinaFaceConfig(layers=(1, 1, 1, 1), width_per_group=16, out_channel=64)
    model = RetinaFace(cfg)
    mx.eval(model.parameters())
    model.eval()
    loc, conf, _ = model(mx.zeros((1, 75, 101, 3)))
    assert loc.shape[1] == priors(cfg, 75, 101).shape[0] == 2 * sum(-(-75 // s) * -(-101 // s) for s in cfg.steps)
    assert np.allclose(np.array(conf).sum(-1), 1, atol=1e-6)


def test_nms_suppresses_overlaps_only():
    dets = np.array(
        [[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [20, 20, 30, 30, 0.7], [0, 0, 10, 3, 0.6]], dtype=np.float32
    )
    # box 1 overlaps box 0 with IoU 81/119 = 0.68; box 3 lies inside box 0 with IoU 0.3, which as a float32
    # (0.30000001) exceeds a threshold of 0.3 the way torchvision compares it
    assert nms(dets, 0.4) == [0, 2, 3]
    assert nms(dets, 0.7) == [0, 1, 2, 3]
    assert nms(dets, 0.3) == [0, 2]


def test_release_files_convert_once_through_the_safe_reader(reference_dir, tmp_path):
    """The detector as a legacy torch file with DataParallel keys and the parser as a zip checkpoint (the forms
    facexlib publishes), converted once into an MLX folder that loads to the same network."""
    from safetensors.numpy import load_file
    from torchsave import save_tensors

    from supir_mlx.weights.faces import ensure_faces, load_faces

    det = load_file(str(reference_dir / "face" / "retinaface_tiny_weights.safetensors"))
    par = load_file(str(reference_dir / "face" / "parsenet_tiny_weights.safetensors"))
    save_tensors({"module." + k: v for k, v in det.items() if v.ndim}, tmp_path / "detection.pth", legacy=True)
    save_tensors({k: v for k, v in par.items() if v.ndim}, tmp_path / "parsing.pth")
    dcfg = RetinaFaceConfig(layers=(1, 1, 1, 1), width_per_group=16, out_channel=64)
    pcfg = ParseNetConfig(in_size=64, out_size=64, min_feat_size=16, base_ch=16, res_depth=2, ch_range=(8, 32))
    entry = ensure_faces(tmp_path / "detection.pth", tmp_path / "parsing.pth", tmp_path / "cache", dcfg, pcfg)
    stamp = (entry / "retinaface.safetensors").stat().st_mtime_ns
    assert ensure_faces(tmp_path / "detection.pth", tmp_path / "parsing.pth", tmp_path / "cache", dcfg, pcfg) == entry
    assert (entry / "retinaface.safetensors").stat().st_mtime_ns == stamp  # not converted again
    detector, parser = load_faces(entry)
    x = mx.random.normal((1, 32, 48, 3), key=mx.random.key(1))
    for a, b in zip(detector(x * 50), load_retinaface(det, dcfg)(x * 50)):
        assert np.array_equal(np.array(a), np.array(b))
    assert np.array_equal(np.array(parser(x)[0]), np.array(load_parsenet(par, pcfg)(x)[0]))
