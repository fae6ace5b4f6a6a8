"""supir-mlx: SUPIR photo restoration (generative reconstruction) in MLX."""

__version__ = "0.1.0"

__all__ = ["Restorer", "RestoreResult", "RestoreSettings", "settings_for"]


def __getattr__(name: str):
    # Imported on first use so `supir-mlx --help` and `import supir_mlx` stay fast.
    if name in ("Restorer", "RestoreResult"):
        from .pipeline import restore

        return getattr(restore, name)
    if name in ("RestoreSettings", "settings_for"):
        from .pipeline import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'supir_mlx' has no attribute {name!r}")
