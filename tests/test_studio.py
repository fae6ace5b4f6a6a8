"""The Studio server over HTTP on the tiny random-weight model: token, uploads, queue, cancel, save, bad input."""

import http.client
import io
import json
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the studio extra is part of the test extra")

from studio_helpers import FAST, chart, request, running_studio, wait_for  # noqa: E402

from supir_mlx.io.credentials import Credentials, read_credentials  # noqa: E402
from supir_mlx.io.images import load_image  # noqa: E402
from supir_mlx.io.metadata import read_provenance  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_weights, tmp_path_factory):
    from supir_mlx import Restorer

    root = tmp_path_factory.mktemp("studio")
    folder = root / "scans"
    folder.mkdir()
    chart(folder / "old.png", (40, 30))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with running_studio(lambda: Restorer.from_weights(tiny_weights), root / "out", root / "work", folder,
                        max_upload_bytes=300_000) as (studio, server):
        wait_for(lambda: studio.model_state != "loading", what="the model")
        yield studio, server, root


def upload(server, path_or_bytes, name):
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return request(f"{server.url}api/photos?name={name}", data)


def run_job(server, studio, photo, caption="a test chart", **settings):
    code, body = request(server.url + "api/jobs", {"photo": photo, "settings": {**FAST, **settings}, "caption": caption})
    assert code == 200, body
    return wait_for(lambda: studio.jobs[body["id"]].state not in ("queued", "running") and studio.jobs[body["id"]],
                    what="the job")


def test_every_request_needs_the_token(served):
    studio, server, _ = served
    base = f"http://127.0.0.1:{server.port}"
    for path in ("/", "/api/state", "/static/app.js", f"/{server.token}x/api/state", f"/{server.token[:-1]}/api/state",
                 "/api/photos?name=a.png"):
        code, body = request(base + path, b"x" if "photos" in path else None)
        assert code == 403, path
        assert b"forbidden" in body
    code, state = request(server.url + "api/state")
    assert code == 200 and state["model"]["state"] == "ready"
    assert request(server.url)[0] == 200 and request(server.url + "static/app.js")[0] == 200


def test_folder_photos_are_listed_and_bad_ones_reported(served):
    studio, server, root = served
    _, state = request(server.url + "api/state")
    assert [p["name"] for p in state["photos"] if p["name"] == "old.png"] == ["old.png"]
    assert any("broken.jpg" in e and "not a supported image" in e for e in state["folder_errors"])


@pytest.mark.parametrize("name, data, status, message", [
    ("../../evil.png", "chart", 400, "not allowed"),
    ("..%2F..%2Fevil.png", "chart", 400, "not allowed"),
    ("sub%5Cevil.png", "chart", 400, "not allowed"),
    (".hidden.png", "chart", 400, "not allowed"),
    ("notes.txt", "chart", 400, "unsupported file type"),
    ("fake.jpg", b"this is not a jpeg", 400, "not a supported image file"),
    ("empty.png", b"", 400, "empty file"),
    ("huge.png", b"\0" * 300_001, 413, "upload limit"),
    ("bomb.png", "bomb", 400, "refused before decoding"),
])
def test_bad_uploads_are_one_sentence_and_the_server_lives(served, tmp_path, name, data, status, message):
    studio, server, root = served
    if data == "chart":
        data = chart(tmp_path / "c.png").read_bytes()
    elif data == "bomb":  # 13000 x 12000 one-bit pixels: a few KB of PNG, 156 M pixels once decoded
        Image.new("1", (13000, 12000)).save(tmp_path / "b.png")
        data = (tmp_path / "b.png").read_bytes()
    before = set(root.rglob("*"))
    code, body = upload(server, data, name)
    assert code == status and message in body["error"] and "\n" not in body["error"]
    assert "Traceback" not in body["error"] and str(root) not in body["error"]
    assert set(root.rglob("*")) == before  # nothing written anywhere, nothing left behind
    assert request(server.url + "api/state")[0] == 200


@pytest.mark.parametrize("payload, message", [
    ({"settings": {"steps": 0}}, "steps must be"),
    ({"settings": {"cfg": "lots"}}, "cfg must be a finite number"),
    ({"settings": {"cfg": 1e400}}, "cfg must be a finite number"),
    ({"settings": {"linear_cfg": "yes"}}, "linear_cfg must be on or off"),
    ({"settings": {"nonsense": 1}}, "unknown setting"),
    ({"preset": "nope"}, "unknown preset"),
    ({"photo": "../../etc/passwd"}, "no such photo"),
    ({"caption": 7}, "caption must be text"),
])
def test_bad_settings_are_refused_before_any_work(served, payload, message):
    studio, server, _ = served
    photo = studio.snapshot()["photos"][0]["id"]
    jobs = len(studio.jobs)
    code, body = request(server.url + "api/jobs", {"photo": photo, **payload})
    assert code == 400 and message in body["error"], body
    assert len(studio.jobs) == jobs
    code, body = request(server.url + "api/jobs", b"{not json")
    assert code == 400 and "not valid JSON" in body["error"]


def test_plan_restore_save_with_the_edited_caption(served, tmp_path):
    studio, server, root = served
    code, photo = upload(server, chart(tmp_path / "family.png", (48, 32)), "family.png")
    assert code == 200, photo
    code, plan = request(server.url + "api/plan", {"photo": photo["id"], "settings": {**FAST, "upscale": 2}})
    assert code == 200 and plan["fits"] and "Memory plan for a" in plan["plan"]
    assert plan["estimate"] > 0  # calibrated by the warm-up run

    job = run_job(server, studio, photo["id"], caption="my grandparents, 1952", upscale=2)
    assert job.state == "done", job.message
    assert job.previews == 2 and 0 < job.first_preview < job.seconds  # one preview frame per sampler step
    code, png = request(f"{server.url}api/jobs/{job.id}/image/preview")
    f = studio.restorer.config.vae.downsample_factor
    assert code == 200 and Image.open(io.BytesIO(png)).size == (128 // f, 64 // f)  # the latent of 128x64
    code, png = request(f"{server.url}api/jobs/{job.id}/image/result")
    assert code == 200 and Image.open(io.BytesIO(png)).size == (96, 64)
    assert request(f"{server.url}api/jobs/{job.id}/image/stage1")[0] == 200

    studio.credentials = Credentials.load()  # as `supir-mlx studio` builds it (here: the tests' self-signed key)
    code, saved = request(f"{server.url}api/jobs/{job.id}/save", {})
    assert code == 200 and saved["saved"] == "family_supir.png"
    out = root / "out" / "family_supir.png"
    creds = read_credentials(out)  # valid, and naming the uploaded photo (a real file) as the ingredient
    assert creds["valid"] and creds["ingredients"][0]["title"] == studio.photos[photo["id"]].path.name
    assert Image.open(out).size == (96, 64)
    prov = read_provenance(out)
    assert prov["caption"] == "my grandparents, 1952" and prov["settings"]["upscale"] == 2.0
    assert prov["source"] == "family.png" and "generative reconstruction" in prov["notice"].lower()
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(job.result.image))

    # saving again never replaces silently; 16-bit TIFF with the CLI's name
    code, body = request(f"{server.url}api/jobs/{job.id}/save", {})
    assert code == 400 and "already exists" in body["error"]
    code, saved = request(f"{server.url}api/jobs/{job.id}/save", {"format": "tif", "bits": "16"})
    assert code == 200 and saved["saved"] == "family_supir.tif"
    assert load_image(root / "out" / "family_supir.tif").bits == 16
    assert read_provenance(root / "out" / "family_supir.tif")["caption"] == "my grandparents, 1952"
    code, saved = request(f"{server.url}api/jobs/{job.id}/save", {"fidelity_map": True, "overwrite": True})
    assert code == 200 and (root / "out" / "family_supir_fidelity.png").is_file()
    assert read_provenance(out)["fidelity"]["map"] == "family_supir_fidelity.png"
    code, body = request(f"{server.url}api/jobs/{job.id}/save", {"format": "../x"})
    assert code == 400 and "format must be one of" in body["error"]

    # a re-run with other settings keeps the earlier result to compare
    again = run_job(server, studio, photo["id"], caption="my grandparents, 1952", upscale=2, seed=99)
    state = studio.snapshot()
    assert [p["results"] for p in state["photos"] if p["id"] == photo["id"]] == [[job.id, again.id]]
    assert not np.array_equal(np.asarray(again.result.image), np.asarray(job.result.image))


def _sse(server, sink: list, stop: threading.Event):
    """Collect the events of one stream (one browser tab)."""
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("GET", u.path + "api/events")
    resp = conn.getresponse()
    assert resp.status == 200
    while not stop.is_set():
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            sink.append(json.loads(line[6:]))
    conn.close()


def test_two_tabs_see_one_queue_that_runs_one_job_at_a_time_and_cancel_stops_within_a_step(served, tmp_path):
    studio, server, _ = served
    photo = studio.snapshot()["photos"][0]["id"]
    tabs, stop = ([], []), threading.Event()
    readers = [threading.Thread(target=_sse, args=(server, t, stop), daemon=True) for t in tabs]
    for r in readers:
        r.start()
    wait_for(lambda: all(tabs), what="both streams")

    import mlx.core as mx

    held = mx.get_active_memory()  # the warm model
    long = {"photo": photo, "caption": "", "settings": {**FAST, "steps": 400}}
    first = request(server.url + "api/jobs", long)[1]["id"]
    second = request(server.url + "api/jobs", {**long, "settings": FAST})[1]["id"]
    wait_for(lambda: studio.jobs[first].stage == "sample" and studio.jobs[first].done >= 3, what="sampling")
    assert studio.jobs[second].state == "queued"  # one job at a time
    code, png = request(f"{server.url}api/jobs/{first}/image/preview")
    assert code == 200 and Image.open(io.BytesIO(png)).mode == "RGB"  # a frame while it runs
    code, png = request(f"{server.url}api/jobs/{first}/image/stage1")  # and the stage-1 image, before the result
    assert code == 200 and Image.open(io.BytesIO(png)).size == (40, 30)
    code, body = request(f"{server.url}api/jobs/{first}/cancel", {})
    at_cancel = body["done"]
    assert code == 200
    wait_for(lambda: studio.jobs[first].state == "cancelled", timeout=30, what="the cancel")
    assert studio.jobs[first].done <= at_cancel + 1 < 400  # stopped within one sampler step
    wait_for(lambda: studio.jobs[second].state == "done", what="the queued job")  # the queue goes on
    # the cancelled and the finished job leave nothing in MLX memory beyond the warm model
    wait_for(lambda: mx.get_active_memory() - held < 2_000_000, timeout=10, what="the jobs' memory to be released")

    finished = lambda tab: any(e["type"] == "state" and any(j["id"] == second and j["state"] == "done"
                                                            for j in e["state"]["jobs"]) for e in list(tab))
    wait_for(lambda: all(finished(t) for t in tabs), what="both tabs to see the end")
    stop.set()
    for tab in tabs:
        progress = [e["job"]["done"] for e in tab if e["type"] == "progress" and e["job"]["id"] == first
                    and e["job"]["stage"] == "sample"]
        assert progress and progress[-1] <= at_cancel + 1
        states = [e["state"] for e in tab if e["type"] == "state"]
        running = [[j["id"] for j in s["jobs"] if j["state"] == "running"] for s in states]
        assert all(len(r) <= 1 for r in running)
        assert any(second in r for r in running)
        assert [e for e in tab if e["type"] == "stage1" and e["job"] == first]
        previews = [e["n"] for e in tab if e["type"] == "preview" and e["job"] == first]
        assert previews and previews == list(range(1, len(previews) + 1))  # every frame, in order
    key = lambda tab: [(e["type"], e.get("job", {}).get("id"), e.get("job", {}).get("done")) for e in tab
                       if e["type"] == "progress"]
    assert key(tabs[0]) == key(tabs[1])  # both tabs saw the same progress


def test_a_photo_that_cannot_fit_and_missing_weights_are_one_sentence(tiny_weights, tmp_path):
    from supir_mlx import Restorer
    from supir_mlx.weights.hub import WeightsUnavailable

    with running_studio(lambda: Restorer.from_weights(tiny_weights, memory_limit_gb=0.5), tmp_path / "o",
                        tmp_path / "w") as (studio, server):
        wait_for(lambda: studio.model_state == "ready", what="the model")
        # 3200x2400 out: more than a 0.5 GB budget holds even with weights per stage and the smallest tiles
        _, photo = upload(server, chart(tmp_path / "p.png", (200, 150)), "p.png")
        code, plan = request(server.url + "api/plan", {"photo": photo["id"], "settings": {"upscale": 16}})
        assert code == 200 and plan["fits"] is False and "p.png cannot fit in memory" in plan["message"]
        job = run_job(server, studio, photo["id"], upscale=16)
        assert job.state == "failed" and job.message.startswith("p.png cannot fit in memory")
        assert run_job(server, studio, photo["id"]).state == "done"  # the engine goes on

    def missing():
        raise WeightsUnavailable("weights missing: SUPIR-v0Q.ckpt; put it in ~/.cache/supir-mlx/weights")

    with running_studio(missing, tmp_path / "o2", tmp_path / "w2") as (studio, server):
        wait_for(lambda: studio.model_state == "failed", what="the load")
        _, state = request(server.url + "api/state")
        assert state["model"]["error"].startswith("weights missing: SUPIR-v0Q.ckpt")
        _, photo = upload(server, chart(tmp_path / "p.png"), "p.png")
        code, body = request(server.url + "api/jobs", {"photo": photo["id"]})
        assert code == 400 and "weights missing" in body["error"]


def test_studio_without_its_extra_names_the_extra(monkeypatch):
    import builtins

    from click.testing import CliRunner

    from supir_mlx.cli import main

    real = builtins.__import__

    def no_starlette(name, *a, **kw):
        if name.startswith("starlette") or name.startswith("uvicorn"):
            raise ImportError(f"No module named '{name}'", name=name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_starlette)
    for mod in [m for m in __import__("sys").modules if m.startswith("supir_mlx.studio.server")]:
        monkeypatch.delitem(__import__("sys").modules, mod)
    r = CliRunner().invoke(main, ["studio", "--no-browser"])
    assert r.exit_code == 1 and 'pip install -e ".[studio]"' in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_llava_suggests_a_caption_and_the_untouched_one_is_used(tiny_weights, tmp_path, monkeypatch, reference_dir):
    """With a captioner, each added photo is captioned in the queue; a restore whose caption the user left alone
    captions exactly as the suggestion did, and an edited caption replaces it."""
    from test_llava_caption import _write_tokenizer

    from supir_mlx import Restorer
    from supir_mlx.captioner import Captioner
    from supir_mlx.weights.llava_convert import convert_llava

    source = tmp_path / "llava-hf"
    source.mkdir()
    (source / "model-00001-of-00001.safetensors").write_bytes((reference_dir / "llava" / "llava_tiny.safetensors").read_bytes())
    (source / "config.json").write_bytes((reference_dir / "llava" / "llava_tiny_config.json").read_bytes())
    _write_tokenizer(source)
    llava = convert_llava(source, tmp_path / "llava-4bit", bits=4)
    caption = Captioner.caption  # the random tiny LM never says </s>: keep its captions short
    monkeypatch.setattr(Captioner, "caption", lambda self, image, **kw: caption(self, image, **{**kw, "max_new_tokens": 6}))

    with running_studio(lambda: Restorer.from_weights(tiny_weights, captioner=llava), tmp_path / "o",
                        tmp_path / "w", caption_size=64) as (studio, server):
        _, photo = upload(server, chart(tmp_path / "p.png", (40, 30)), "p.png")
        p = wait_for(lambda: (q := studio.photos[photo["id"]]).caption_state not in ("pending",) and q, what="caption")
        assert p.caption_state == "done" and p.suggestion, p.caption_error
        _, state = request(server.url + "api/state")
        assert state["model"]["captioner"] and state["photos"][0]["suggestion"] == p.suggestion
        untouched = run_job(server, studio, photo["id"], caption=None, caption_size=64)
        assert untouched.state == "done" and untouched.result.caption == p.suggestion
        edited = run_job(server, studio, photo["id"], caption="a hand-written caption")
        assert edited.result.caption == "a hand-written caption"


def test_the_studio_command_serves_its_folder_and_stops_cleanly(tiny_weights, tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys

    folder = tmp_path / "scans"
    folder.mkdir()
    chart(folder / "a.png")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "supir-mlx"), "studio", str(folder), "-o", str(tmp_path / "out"),
                             "--weights", str(tiny_weights), "--no-browser", "--port", "0", "--no-credentials"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        while not (found := re.search(r"http://127\.0\.0\.1:\d+/[\w-]{20,}/", proc.stderr.readline())):
            assert proc.poll() is None, proc.stderr.read()
        url = found.group(0)
        wait_for(lambda: request(url + "api/state")[1]["model"]["state"] == "ready", what="the model")
        _, state = request(url + "api/state")
        assert [p["name"] for p in state["photos"]] == ["a.png"] and state["out_dir"] == str(tmp_path / "out")
        assert request(url.rsplit("/", 2)[0] + "/api/state")[0] == 403
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err and "studio stopped" in err, err
    assert os.listdir(folder) == ["a.png"]  # the folder is only read


def test_a_draft_restores_the_centred_crop_and_saves_it_as_a_draft(served, tmp_path, monkeypatch):
    """As `restore --draft`: the crop's own plan, the crop restored, compared with the same crop, saved as _draft."""
    from supir_mlx.pipeline import restore

    studio, server, root = served
    full = restore.draft_box
    monkeypatch.setattr(restore, "draft_box", lambda w, h, s: full(w, h, s, side=64))  # a 64-px tile keeps it fast
    _, photo = upload(server, chart(tmp_path / "wide.png", (120, 80)), "wide.png")
    code, plan = request(server.url + "api/plan", {"photo": photo["id"], "settings": FAST, "draft": True})
    assert code == 200 and "for a 64x64 output" in plan["plan"]
    code, body = request(server.url + "api/jobs", {"photo": photo["id"], "settings": FAST, "caption": "", "draft": True})
    job = wait_for(lambda: studio.jobs[body["id"]].state not in ("queued", "running") and studio.jobs[body["id"]])
    assert job.state == "done" and job.result.image.size == (64, 64)
    code, png = request(f"{server.url}api/jobs/{job.id}/image/input")
    expected = np.asarray(Image.open(tmp_path / "wide.png"))[8:72, 28:92]  # the centred 64x64 crop
    assert code == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), expected)
    code, saved = request(f"{server.url}api/jobs/{job.id}/save", {})
    assert code == 200 and saved["saved"] == "wide_supir_draft.png"
    assert Image.open(root / "out" / "wide_supir_draft.png").size == (64, 64)
