"""supir-mlx: SUPIR photo restoration (generative reconstruction) in MLX."""

__version__ = "0.1.0"
