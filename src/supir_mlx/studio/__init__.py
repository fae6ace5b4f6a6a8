"""supir-mlx Studio: a local web app over the same `Restorer` as the CLI (`supir-mlx studio`, extra `studio`).

engine.py holds the state, the queue and every rule; server.py is the HTTP layer (Starlette + uvicorn, server-sent
events); static/ is the page.
"""
