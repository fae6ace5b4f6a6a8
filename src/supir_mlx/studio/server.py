"""The Studio's web layer: a small Starlette app over the engine, served by uvicorn.

Every URL lives under /<token>/, a secret made at launch: the page's relative links, its fetches, its event
stream and its images all carry it without any client code, and anything else gets 403. Progress reaches
every open tab as server-sent events; the page itself is one static HTML/JS/CSS bundle (static/).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import socket
import threading
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..pipeline.settings import PRESETS
from .engine import Studio, StudioError, knob_schema, parse_settings

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0


class TokenGuard:
    """ASGI middleware: a request whose path does not start with /<token>/ is refused with 403."""

    def __init__(self, app, token: str):
        self.app, self.prefix = app, f"/{token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = scope.get("raw_path") or scope["path"].encode()
            head = path[: len(self.prefix)]
            if not (hmac.compare_digest(head, self.prefix) and path[len(self.prefix):len(self.prefix) + 1] in (b"/", b"")):
                if scope["type"] == "http":
                    await PlainTextResponse("forbidden: open the studio with the link (and its token) that "
                                            "`supir-mlx studio` printed\n", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def create_app(studio: Studio, token: str) -> TokenGuard:
    images: dict[tuple, bytes] = {}  # encoded once: tabs re-request the same pictures
    streams: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()

    def close_streams() -> None:
        """End every event stream (uvicorn waits for open responses before it stops)."""
        for loop, queue in list(streams):
            loop.call_soon_threadsafe(queue.put_nowait, None)

    def cached_png(key: tuple, make) -> Response:
        if key not in images:
            images[key] = _png(make())
        return Response(images[key], media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def body_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > 1_000_000:
            raise StudioError("request too large")
        try:
            data = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise StudioError("the request is not valid JSON") from None
        if not isinstance(data, dict):
            raise StudioError("the request must be a JSON object")
        return data

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def state(request: Request) -> Response:
        return JSONResponse({**studio.snapshot(), "presets": PRESETS, "knobs": knob_schema(),
                             "max_upload_mb": studio.max_upload_bytes / 1e6})

    async def events(request: Request) -> Response:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stop = studio.listen(lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        streams.add((loop, queue))

        async def stream():
            try:
                yield f"data: {json.dumps({'type': 'state', 'state': studio.snapshot()})}\n\n"
                while True:
                    try:
                        ev = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if ev is None:
                        return
                    yield f"data: {json.dumps(ev)}\n\n"
            finally:
                stop()
                streams.discard((loop, queue))

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def upload(request: Request) -> Response:
        declared = request.headers.get("content-length")
        name = request.query_params.get("name", "")
        if declared and declared.isdigit() and int(declared) > studio.max_upload_bytes:
            return JSONResponse({"error": f"{name[:80]}: larger than the upload limit of "
                                          f"{studio.max_upload_bytes / 1e6:.0f} MB"}, status_code=413)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # bounded: refused as soon as the limit is passed
            size += len(chunk)
            if size > studio.max_upload_bytes:
                return JSONResponse({"error": f"{name[:80]}: larger than the upload limit of "
                                              f"{studio.max_upload_bytes / 1e6:.0f} MB"}, status_code=413)
            chunks.append(chunk)
        photo = await run_in_threadpool(studio.add_upload, name, chunks)
        return JSONResponse({"id": photo.id, "name": photo.name})

    def photo_image(request: Request) -> Response:
        from ..io.images import load_image

        p = studio.photo(request.path_params["pid"])
        return cached_png(("photo", p.id), lambda: load_image(p.path).to_pil())

    async def plan(request: Request) -> Response:
        d = await body_json(request)
        s = parse_settings(d.get("preset", "default"), d.get("settings", {}), d.get("caption"))
        return JSONResponse(await run_in_threadpool(studio.plan, str(d.get("photo", "")), s, d.get("draft") is True))

    async def submit(request: Request) -> Response:
        d = await body_json(request)
        preset = d.get("preset", "default")
        s = parse_settings(preset, d.get("settings", {}), d.get("caption"))
        return JSONResponse({"id": studio.submit(str(d.get("photo", "")), s, str(preset), d.get("draft") is True).id})

    def cancel(request: Request) -> Response:
        return JSONResponse(studio.cancel(request.path_params["jid"]).to_json())

    def job_image(request: Request) -> Response:
        job = studio.job(request.path_params["jid"])
        kind = request.path_params["kind"]
        if kind == "input":  # what the result is compared with: the photo, or the draft's crop of it
            photo = studio.photo(job.photo_id)
            return cached_png((job.id, kind), lambda: photo.load(job.settings, job.draft).to_pil())
        if kind == "preview":
            frame = job.preview
            if frame is None:
                raise StudioError("no preview yet")
            return Response(_png(frame), media_type="image/png", headers={"Cache-Control": "no-store"})
        image = job.stage1 if kind == "stage1" else job.result.image if kind == "result" and job.result else None
        if image is None:
            raise StudioError("no such image (yet)")
        return cached_png((job.id, kind), lambda: image)

    async def save(request: Request) -> Response:
        d = await body_json(request)
        bits = d.get("bits")
        out = await run_in_threadpool(studio.save, request.path_params["jid"], d.get("format") or None,
                                      int(bits) if str(bits).isdigit() else None, d.get("jpeg_quality", 95),
                                      d.get("overwrite") is True, d.get("fidelity_map") is True)
        return JSONResponse({"saved": out.name, "folder": str(out.parent)})

    async def refused(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=400 if isinstance(exc, StudioError) else 500)

    api = [
        Route("/", index),
        Route("/api/state", state),
        Route("/api/events", events),
        Route("/api/photos", upload, methods=["POST"]),
        Route("/api/photos/{pid}/image", photo_image),
        Route("/api/plan", plan, methods=["POST"]),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{jid}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{jid}/image/{kind}", job_image),
        Route("/api/jobs/{jid}/save", save, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=[Mount(f"/{token}", routes=api)],
                    exception_handlers={StudioError: refused, Exception: refused})
    guard = TokenGuard(app, token)
    guard.close_streams = close_streams
    return guard


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or on a free port when that one is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for p in (port, 0):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, p))
        except OSError:
            sock.close()
            if p == 0:
                raise
            continue
        sock.listen(64)
        return sock
    raise OSError(f"cannot listen on {host}")


class Server:
    """uvicorn serving the app on a bound socket; `run()` in the foreground (CLI) or `start()` in a thread."""

    def __init__(self, studio: Studio, token: str, host: str = "127.0.0.1", port: int = 7860):
        import uvicorn

        self.studio, self.token = studio, token
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        app = create_app(studio, token)

        class Uvicorn(uvicorn.Server):
            async def shutdown(self, sockets=None):
                app.close_streams()  # first, so that open tabs do not hold the shutdown up
                await super().shutdown(sockets)

        self.uvicorn = Uvicorn(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}/{self.token}/"

    def run(self) -> None:
        self.uvicorn.run(sockets=[self.sock])

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.run, name="studio-http", daemon=True)
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            threading.Event().wait(0.02)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()
