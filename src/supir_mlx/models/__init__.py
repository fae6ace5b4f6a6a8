"""The SUPIR networks in MLX (NHWC), named like the official modules."""
