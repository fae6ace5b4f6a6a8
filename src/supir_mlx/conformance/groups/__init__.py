"""One module per fixture group; each exposes `run(fixture, ctx) -> list[Comparison]`."""
