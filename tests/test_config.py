import json

import pytest

from supir_mlx.config import ConfigError, SUPIRConfig


def test_reference_config_dimensions(reference_dir):
    cfg = SUPIRConfig.from_reference(reference_dir / "tiny" / "config.json")
    assert cfg.unet.model_channels == 32
    assert cfg.project.cross_attn_insert_idx == (6, 3)
    assert cfg.context_dim == 64
    assert cfg.vector_dim == cfg.unet.adm_in_channels == 1568
    assert cfg.clip_l.layer_idx == 2


def test_real_config_dimensions():
    cfg = SUPIRConfig.sdxl_v0()
    assert cfg.context_dim == cfg.unet.context_dim == 2048
    assert cfg.vector_dim == cfg.unet.adm_in_channels == 2816


def test_round_trip(tmp_path, reference_dir):
    cfg = SUPIRConfig.from_reference(reference_dir / "tiny" / "config.json")
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg.to_dict()))
    assert SUPIRConfig.load(p) == cfg


def test_bad_config(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"vae": {}}))
    with pytest.raises(ConfigError):
        SUPIRConfig.load(p)
