"""`supir-mlx restore INPUT... [-o OUT]`: restore photos, folders and globs.

A thin shell over `Restorer`: parse, resolve settings (preset < --settings-from < explicit options),
plan memory, load once, run the batch (skip finished outputs, survive failures and Ctrl-C), print a summary.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

KNOBS = (
    "upscale", "min_size", "sampler", "steps", "cfg", "cfg_start", "linear_cfg", "control_scale", "control_start",
    "linear_control", "restore_cfg", "s_churn", "s_noise", "eta", "color_fix", "seed", "num_samples",
    "positive_prompt", "negative_prompt", "caption_size", "model", "tile_size", "tile_stride", "vae_encoder_tile",
    "vae_decoder_tile", "faces", "face_size", "face_resolution", "face_background", "face_prompt",
)
OUTPUT_FORMATS = {"png": ".png", "tif": ".tif", "tiff": ".tif", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp"}


class Fail(click.ClickException):
    """One-line error, exit status 1, no traceback."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class ProgressBar:
    """Stage events as one line on stderr per stage: a bar, counts, elapsed time and ETA (tiles count as work)."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.stage = None

    def __call__(self, event) -> None:
        if not self.enabled or event.kind != "stage":
            return
        stage, done, total = event["stage"], event["done"], event["total"]
        if stage != self.stage:
            if self.stage is not None:
                sys.stderr.write("\n")
            self.stage = stage
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 24)
        sys.stderr.write(f"\r  {self.label} {stage:9s} [{bar:24s}] {done}/{total}  {_clock(event['elapsed'])} elapsed  "
                         f"ETA {_clock(event['time_left'] or 0.0)} ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.stage is not None:
            sys.stderr.write("\n")
            self.stage = None


def _clock(s: float) -> str:
    s = int(s + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output folder (or file, for one input). Default: next to each input.")
@click.option("--pattern", default="{stem}_supir{ext}", show_default=True, help="Output name: {stem} {ext} {parent} {index}.")
@click.option("--format", "fmt", type=click.Choice(sorted(OUTPUT_FORMATS)), help="Output format (default: the input's).")
@click.option("--bits", type=click.Choice(["8", "16"]), help="Bits per channel (16: PNG/TIFF; default: the input's).")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=95, show_default=True)
@click.option("-r", "--recursive", is_flag=True, help="Look into sub-folders of input folders.")
@click.option("--overwrite", is_flag=True, help="Redo outputs that already exist (default: skip them, which resumes a batch).")
@click.option("--compare", is_flag=True, help="Also write a before/after image <name>_compare next to each output.")
@click.option("--fidelity-map", is_flag=True, help="Also write <name>_fidelity.png: where the output departs from what the input supports.")
@click.option("--no-credentials", is_flag=True, help="Do not embed C2PA Content Credentials.")
@click.option("--signing-cert", type=click.Path(dir_okay=False, path_type=Path), help="PEM certificate chain for the Content Credentials (default: credentials.json in the config folder, else a self-signed pair).")
@click.option("--signing-key", type=click.Path(dir_okay=False, path_type=Path), help="PEM private key of --signing-cert.")
@click.option("--preset", type=click.Choice(["default", "quality", "fidelity", "lightning", "lightning-fidelity"]), default="default", show_default=True)
@click.option("--settings-from", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Repeat the settings recorded in an earlier output.")
# prompt
@click.option("--prompt", help="Caption to use instead of LLaVA's (a sidecar <photo>.txt is used when present).")
@click.option("--no-caption", is_flag=True, help="Restore without any caption.")
@click.option("--caption-size", type=int, help="Short side of the stage-1 image shown to LLaVA (default 512, as officially).")
@click.option("--positive-prompt", help="Text appended to the caption (official a_prompt).")
@click.option("--negative-prompt", help="Negative prompt (official n_prompt).")
# knobs
@click.option("--upscale", type=float, help="Scale factor (default 1).")
@click.option("--min-size", type=int, help="Minimum short side of the working image (default 1024).")
@click.option("--sampler", type=click.Choice(["edm", "dpmpp"]))
@click.option("--steps", type=int)
@click.option("--cfg", type=float, help="Guidance scale (official s_cfg).")
@click.option("--cfg-start", type=float, help="Guidance scale at the start of the linear ramp (spt_linear_CFG).")
@click.option("--linear-cfg/--no-linear-cfg", default=None)
@click.option("--control-scale", type=float, help="Control strength (s_stage2).")
@click.option("--control-start", type=float, help="Control strength at the start of its ramp.")
@click.option("--linear-control/--no-linear-control", default=None)
@click.option("--restore-cfg", type=float, help="Restoration guidance toward the stage-1 latent (s_stage1; <= 0 off).")
@click.option("--s-churn", type=float)
@click.option("--s-noise", type=float)
@click.option("--eta", type=float, help="DPM++ stochasticity.")
@click.option("--color-fix", type=click.Choice(["wavelet", "adain", "none"]))
@click.option("--seed", type=int)
@click.option("--num-samples", type=int)
@click.option("--model", type=click.Choice(["v0Q", "v0F"]), help="SUPIR checkpoint (v0F for light degradation).")
@click.option("--tile-size", type=int, help="Sampler tile in latent pixels (default: automatic).")
@click.option("--tile-stride", type=int)
@click.option("--vae-encoder-tile", type=int, help="VAE encoder tile in image pixels (default: automatic).")
@click.option("--vae-decoder-tile", type=int, help="VAE decoder tile in latent pixels (default: automatic).")
# face mode
@click.option("--faces/--no-faces", default=None, help="Face mode (official gradio_demo_face): every face restored alone at full resolution with its own caption, pasted back.")
@click.option("--face-resolution", type=int, help="Face mode: size each face is restored at inside its canvas (default 1024).")
@click.option("--face-size", type=int, help="Face mode: aligned face crop and sampler canvas (default 1024, as officially).")
@click.option("--face-background/--keep-background", "face_background", default=None, help="Face mode: restore the background too (default) or keep the input behind the faces.")
@click.option("--face-prompt", help="Face mode: caption for every face (default: LLaVA on each face crop).")
@click.option("--face-landmarks", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Face mode: JSON with 5 points (eyes, nose, mouth corners) per face in input pixels instead of detection; a list, or {file name: list}.")
@click.option("--face-weights", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Face mode: a converted detector/parser folder (default: facexlib's, fetched once).")
# weights and memory
@click.option("--weights", type=click.Path(exists=True, file_okay=False, path_type=Path), help="A folder written by `supir-mlx convert`.")
@click.option("--sdxl", help="SDXL base checkpoint: local path or owner/repo/file (any SDXL fine-tune).")
@click.option("--supir", help="SUPIR checkpoint: local path or owner/repo/file.")
@click.option("--source", type=click.Choice(["pruned", "original"]), default="pruned", show_default=True, help="SUPIR file to download.")
@click.option("--captioner", type=click.Choice(["auto", "13b", "7b", "none"]), default="auto", show_default=True,
              help="LLaVA-1.5 size; auto: 13B when the memory plan allows it, else 7B.")
@click.option("--captioner-weights", type=click.Path(exists=True, file_okay=False, path_type=Path), help="A converted LLaVA folder.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help="Diffusion dtype (default: float16 on Metal, float32 on CPU).")
@click.option("--vae-dtype", type=click.Choice(["bfloat16", "float32"]), help="VAE dtype (never float16).")
@click.option("--quantize", type=click.Choice(["4", "8"]), help="Quantize the UNet and control encoder.")
@click.option("--memory-limit", type=float, help="Memory budget in GB (default: what this machine recommends).")
@click.option("--plan", "plan_only", is_flag=True, help="Print the memory plan for each input and exit.")
@click.option("--draft", is_flag=True, help="Restore only a centred crop (about one 1024-px tile) as <name>_draft, to preview the settings quickly.")
@click.option("--offline", is_flag=True, help="Never contact the Hugging Face hub.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "json_events", is_flag=True,
              help="Progress and results as JSON Lines events on stdout (README: Events); human output on stderr.")
def restore(inputs, output, pattern, fmt, bits, jpeg_quality, recursive, overwrite, compare, fidelity_map,
            no_credentials, signing_cert, signing_key, preset, settings_from, prompt, no_caption, face_landmarks,
            face_weights, weights, sdxl, supir, source, captioner, captioner_weights, dtype, vae_dtype, quantize,
            memory_limit, plan_only, draft, offline, quiet, json_events, **knobs) -> None:
    """Restore photos (files, folders or glob patterns) with SUPIR.

    Outputs are generative reconstructions: detail is synthesised, not recovered; every output says so in its
    metadata. Inputs are never modified; outputs are written atomically and never replace an input.
    """
    import signal
    import threading

    from ..distributed import world
    from ..events import Event, JsonLines

    group = world()  # one of several processes started by mlx.launch: share the work (README: several Macs)
    emit = (JsonLines(rank=group.rank()) if group else JsonLines()) if json_events else None
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        _restore(inputs, output, pattern, fmt, bits, jpeg_quality, recursive, overwrite, compare, preset,
                 settings_from, prompt, no_caption, face_landmarks, face_weights, weights, sdxl, supir, source, captioner,
                 captioner_weights, dtype, vae_dtype, quantize, memory_limit, plan_only, draft, offline, quiet, emit, knobs,
                 fidelity_map=fidelity_map, no_credentials=no_credentials, signing_cert=signing_cert,
                 signing_key=signing_key, group=group)
    except click.ClickException as e:
        if emit is not None:  # a program reading the events learns why nothing (more) happened
            emit(Event("error", {"message": e.format_message()}))
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    """SIGTERM (a launcher or service manager stopping us) ends the run like Ctrl-C: no partial file left."""
    raise KeyboardInterrupt


def _restore(inputs, output, pattern, fmt, bits, jpeg_quality, recursive, overwrite, compare, preset, settings_from,
             prompt, no_caption, face_landmarks, face_weights, weights, sdxl, supir, source, captioner, captioner_weights,
             dtype, vae_dtype, quantize, memory_limit, plan_only, draft, offline, quiet, emit, knobs, watch=None,
             fidelity_map=False, no_credentials=False, signing_cert=None, signing_key=None, group=None) -> None:
    """The restore flow; `watch(process, on_event) -> BatchSummary`, when given, feeds the items instead of the
    inputs (`supir-mlx watch`); `group` (mx.distributed) shares the batch, or one image's tiles, among ranks."""
    tag = f"[rank {group.rank()}] " if group else ""

    def say(message: str) -> None:  # human output: stdout, or stderr when stdout carries the JSON events
        click.echo(tag + message, err=emit is not None)

    from ..io.batch import collect_inputs, plan_outputs
    from ..io.images import ImageError
    from ..pipeline.settings import RestoreSettings, SettingsError, settings_for

    try:
        base: dict[str, Any] = {}
        if settings_from:
            from ..io.metadata import settings_from_file

            base = {k: v for k, v in settings_from_file(settings_from).items() if k in KNOBS or k == "prompt"}
            RestoreSettings.from_dict(base)  # unknown keys and bad values fail here, before any work
        given = {k: v for k, v in knobs.items() if v is not None}
        if no_caption and prompt is not None:
            raise Fail("--prompt and --no-caption contradict each other")
        settings = settings_for(preset, **{**base, **given})
        unreadable: list = []
        sources = collect_inputs(inputs, recursive, skipped=unreadable) if watch is None else []
        if not sources and watch is None:
            why = f" ({unreadable[0][0]}: {unreadable[0][1]})" if len(unreadable) == 1 else (
                f" ({len(unreadable)} entries cannot be read, e.g. {unreadable[0][0]}: {unreadable[0][1]})" if unreadable else "")
            raise Fail("no images found in " + ", ".join(inputs) + why)
        out_dir, ext = output, OUTPUT_FORMATS.get(fmt) if fmt else None
        single_file = output is not None and len(sources) == 1 and output.suffix.lower() in set(OUTPUT_FORMATS.values()) | {".jpeg", ".tiff"}
        if single_file:
            out_dir, pattern, ext = output.parent, output.name, ext or output.suffix
        if draft:
            if "{ext}" in pattern:
                pattern = pattern.replace("{ext}", "_draft{ext}")
            else:
                p = Path(pattern)
                pattern = str(p.with_name(f"{p.stem}_draft{p.suffix}"))
        sources = _without_earlier_outputs(sources, inputs, out_dir, pattern, ext, settings.num_samples)
        items = plan_outputs(sources, out_dir, pattern, ext)
        landmarks_for = _face_landmarks(face_landmarks) if face_landmarks else (lambda _: None)
    except (ImageError, SettingsError, ValueError) as e:
        raise Fail(str(e)) from None

    from ..pipeline.planning import WATCH_SIZE, LoadOptions, plan_run

    captions_given = no_caption or prompt is not None
    try:
        options = LoadOptions(weights=weights, model=settings.model, sdxl=sdxl, supir=supir, source=source,
                              captioner=captioner, captioner_weights=captioner_weights, dtype=dtype,
                              vae_dtype=vae_dtype, quantize=int(quantize) if quantize else None,
                              memory_limit_gb=memory_limit, offline=offline)
        if watch is None:
            captioned = [not captions_given and not item.input.with_suffix(".txt").is_file() for item in items]
            run = plan_run([item.input for item in items], settings, options, captioned=captioned, draft=draft)
            if settings.faces and items and run.fits:  # every face is one more restore of its own size, same weights
                from dataclasses import replace

                from ..pipeline.faces import face_pass_plan

                fp = face_pass_plan(settings, weights, dtype, run.quant, memory_limit)
                if isinstance(fp, Exception):
                    raise Fail(f"face mode: {fp}")
                if fp.quant is not None and (run.quant is None or fp.quant.bits < run.quant.bits):
                    options = replace(options, quantize=fp.quant.bits)
                    run = plan_run([item.input for item in items], settings, options, captioned=captioned, draft=draft)
        else:  # images yet to come: the choices a typical photo needs (each image is planned when it arrives)
            run = plan_run([WATCH_SIZE], settings, options, captioned=not captions_given, draft=draft)
    except (ValueError, OSError) as e:  # a converted folder or captioner folder that cannot be used
        raise Fail(str(e).splitlines()[0]) from None
    for note in run.notes:
        click.echo(f"note: {note}", err=True)
    if plan_only:
        for path, reason in unreadable:
            say(f"skip {path}: {reason}")
        for p in run.inputs:
            say(p.line)
            if p.error:
                say(f"  DOES NOT FIT: {p.error}")
            elif p.plan is not None:
                say(str(p.plan))
                if settings.faces:
                    from ..pipeline.faces import describe_face_passes

                    say(describe_face_passes(p.plan, settings, weights, dtype, quantize, memory_limit))
        if not run.fits:
            sys.exit(1)
        return
    if no_credentials and (signing_cert or signing_key):
        raise Fail("--no-credentials contradicts --signing-cert/--signing-key")
    credentials = None if no_credentials else _credentials(signing_cert, signing_key)

    shares = None
    if group is not None:
        from ..distributed import plan_shares

        try:
            shares = plan_shares(items, group, overwrite)
        except ValueError as e:
            raise Fail(str(e)) from None
        if shares.tiles and shares.rank != 0:  # every rank restores the one image; rank 0 reports and writes it
            emit, quiet = None, True
    tile_group = group if shares is not None and shares.tiles else None
    if not run.fits and watch is None:
        raise Fail(run.refusal())
    face_models = _load_faces(face_weights, offline) if settings.faces else None  # small: a bad folder fails first
    restorer = _load(run)
    restorer.face_models = face_models
    progress = ProgressBar("", enabled=not quiet and sys.stderr.isatty())
    totals: dict[str, list[float]] = {}

    def process(item) -> dict:
        from ..events import tagged
        from ..io.images import load_image

        loaded = load_image(item.input)
        for note in loaded.notes:  # survivable damage, one line each instead of the decoders' own output
            say(f"  note: {item.input}: {note}")
        if draft:
            from dataclasses import replace

            from ..pipeline.restore import draft_box

            left, top, right, bottom = draft_box(*loaded.size, settings)
            loaded = replace(loaded, rgb=loaded.rgb[top:bottom, left:right],
                             alpha=None if loaded.alpha is None else loaded.alpha[top:bottom, left:right])
        s = settings
        if no_caption:
            s = s.updated(prompt="")
        elif prompt is not None:
            s = s.updated(prompt=prompt)
        elif (sidecar := item.input.with_suffix(".txt")).is_file():
            s = s.updated(prompt=sidecar.read_text(encoding="utf-8", errors="replace").strip())
        progress.label = item.input.name
        t0 = time.perf_counter()
        try:
            result = restorer.restore(loaded.to_pil(), s, on_event=tagged(on_event, **item.tags()),
                                      face_landmarks=landmarks_for(item.input), group=tile_group)
        finally:
            progress.close()
        if result.faces is not None and not result.faces["found"]:
            say(f"  no face found in {item.input.name}: restored without face mode")
        for name, st in result.stages.items():
            totals.setdefault(name, [0.0, 0])
            totals[name][0] += st.seconds
            totals[name][1] = max(totals[name][1], st.peak_bytes)
        if tile_group is not None and tile_group.rank() != 0:
            return None
        written, prov = _save(item, loaded, result, restorer, bits, fmt, jpeg_quality, overwrite, compare,
                              fidelity_map, credentials, preset)
        seconds = time.perf_counter() - t0
        say(f"  {item.input} -> {item.output}  ({seconds:.1f} s, peak {result.peak_memory / 1e9:.2f} GB)"
            + (f"\n    caption: {result.caption[:120]}" if result.caption and prompt is None else ""))
        return {"outputs": [str(p) for p in written], "seconds": round(seconds, 3), "peak_bytes": result.peak_memory,
                "caption": result.caption, "provenance": provenance_summary(prov)}

    from ..io.batch import run_batch

    def on_event(event):
        if event.kind == "skipped":
            why = f" ({event['output']})" if event["output"] else ""
            say(f"  skip {event['input']}: {event['reason']}{why}")
        elif event.kind == "error":
            click.echo(f"  FAILED {event['message']}", err=True)
        progress(event)
        if emit is not None:
            emit(event)

    if shares is not None:
        from ..distributed import run_shares

        summary = run_shares(shares, process, overwrite=overwrite, on_event=on_event)
    elif watch is None:
        summary = run_batch(items, process, overwrite=overwrite, on_event=on_event, unreadable=unreadable)
    else:
        summary = watch(process, on_event)
    if totals and (tile_group is None or tile_group.rank() == 0):
        say("stage times (all images) and peak memory:")
        for name, (secs, peak) in totals.items():
            say(f"  {name:10s} {secs:8.1f} s   peak {peak / 1e9:6.2f} GB")
    if shares is None or shares.rank == 0:
        say(summary.line())
    if group is not None:
        from ..distributed import barrier

        barrier(group)  # no rank exits (which makes mlx.launch stop the others) before rank 0 has reported
    if not summary.ok:
        sys.exit(130 if summary.interrupted else 1)


def _without_earlier_outputs(sources, inputs, out_dir, pattern, ext, num_samples):
    """Leave out what this same command wrote before (outputs, extra samples, comparisons) when a folder or glob
    picks it up again, so that running a command a second time resumes it; named files are always kept."""
    from ..io.batch import drop_earlier_outputs
    from ..io.compare import compare_path
    from ..pipeline.fidelity import fidelity_path

    def variants(out: Path) -> list[Path]:
        samples = [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(1, num_samples)]
        return [*samples, *(f(p) for p in (out, *samples) for f in (compare_path, fidelity_path))]

    named = [p for p in inputs if Path(p).is_file()]
    return drop_earlier_outputs(sources, out_dir, pattern, ext, keep=named, variants=variants)


def _load(run):
    from ..pipeline.planning import load_restorer
    from ..weights.hub import WeightsUnavailable

    try:
        return load_restorer(run, log=lambda m: click.echo(m, err=True))
    except WeightsUnavailable as e:  # the one message that lists every missing file and where to put it
        raise Fail(str(e)) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise Fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def _load_faces(face_weights, offline):
    from ..pipeline.faces import load_face_models
    from ..weights.faces import FaceWeightsError
    from ..weights.hub import WeightsUnavailable

    try:
        return load_face_models(str(face_weights) if face_weights else None, offline=offline)
    except (WeightsUnavailable, FaceWeightsError, RuntimeError, OSError, ValueError) as e:
        raise Fail(str(e)) from None


def _face_landmarks(path: Path):
    """item path -> landmarks for it: the file holds one list of faces (every input) or {file name: list}."""
    import json

    import numpy as np

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a landmarks JSON file ({e})") from None
    def valid(faces) -> bool:
        try:
            return isinstance(faces, list) and (not faces or np.asarray(faces, dtype=np.float64).shape[1:] == (5, 2))
        except (TypeError, ValueError):
            return False

    table = data if isinstance(data, dict) else None
    if not all(valid(f) for f in (table.values() if table is not None else [data])):
        raise ValueError(f"{path}: landmarks must be a list of faces, each 5 [x, y] points (eyes, nose, mouth corners)")
    return (lambda p: table.get(Path(p).name)) if table is not None else (lambda p: data)


def provenance_summary(prov: dict) -> dict:
    """The part of an output's provenance record a result event carries (the file has all of it)."""
    keys = ("sampler", "steps", "cfg", "control_scale", "restore_cfg", "upscale", "color_fix", "model")
    return {**{k: prov[k] for k in ("notice", "generator", "model", "base_checkpoint", "seed")},
            "settings": {k: prov["settings"][k] for k in keys if k in prov["settings"]}}


def _credentials(cert, key):
    """The Content Credentials signer, checked before any work; None (said once) without the optional library."""
    from ..io.credentials import Credentials, CredentialsError, CredentialsUnavailable

    try:
        creds = Credentials.load(cert, key)
    except CredentialsUnavailable as e:
        if cert or key:
            raise Fail(str(e)) from None
        click.echo(f"note: Content Credentials (C2PA) not added: {e}; outputs still carry the IPTC digital source "
                   "type and the provenance record", err=True)
        return None
    except CredentialsError as e:
        raise Fail(str(e)) from None
    if creds.identity.created:
        click.echo(f"note: made a self-signed key for Content Credentials in {creds.identity.origin}; give your own "
                   "with --signing-cert/--signing-key or credentials.json there", err=True)
    return creds


def _save(item, loaded, result, restorer, bits, fmt, jpeg_quality, overwrite, compare, fidelity_map=False,
          credentials=None, preset=None, ingredient=None) -> tuple[list[Path], dict]:
    """Write every sample (and its comparison, fidelity map) atomically; the files written and the provenance
    record. `ingredient`: the input file the credentials name, when `item.input` is not one (the Studio's)."""
    import numpy as np
    from PIL import Image

    from ..io.images import save_image
    from ..io.metadata import make_provenance

    s = result.settings
    desc = restorer.description
    prov = make_provenance(
        {**s.to_dict(), "prompt": result.caption}, model=desc.get("model", f"SUPIR-{s.model}"),
        base_checkpoint=desc.get("base_checkpoint", ", ".join(desc.get("sources", [])) or "unknown"),
        caption=result.caption, seed=s.seed, source=item.input.name,
    )
    if result.faces is not None:
        prov["faces"] = result.faces
    out_bits = int(bits) if bits else (16 if loaded.bits == 16 and item.output.suffix.lower() in (".png", ".tif", ".tiff") else 8)
    alpha = None
    if loaded.alpha is not None:
        a = loaded.alpha if loaded.alpha.dtype == np.uint8 else (loaded.alpha.astype(np.float32) / 257).round().astype(np.uint8)
        alpha = np.asarray(Image.fromarray(a).resize(result.image.size, Image.BICUBIC))
    written = []
    for i, pixels in enumerate(result.pixels):
        path = item.output if i == 0 else item.output.with_name(f"{item.output.stem}_{i}{item.output.suffix}")
        rgb = pixels if out_bits == 16 else np.asarray(result.images[i])
        record = prov
        if fidelity_map:  # written first: the output's existence is what marks this item done
            from ..pipeline.fidelity import fidelity_path

            fm = result.fidelity(i)
            save_image(fidelity_path(path), fm.render(pixels), overwrite=True)  # left by an unfinished run
            written.append(fidelity_path(path))
            record = {**prov, "fidelity": {**fm.summary(), "map": fidelity_path(path).name}}
        sign = credentials.for_output(record, ingredient or item.input, path.name, preset) if credentials else None
        save_image(path, rgb, bits=out_bits, format=fmt, jpeg_quality=jpeg_quality, alpha=alpha,
                   exif=loaded.exif, xmp=loaded.xmp, iptc=loaded.iptc, provenance=record, overwrite=overwrite,
                   sign=sign)
        written.append(path)
        if compare:
            from ..io.compare import compare_path, write_compare

            write_compare(path, np.asarray(loaded.to_pil()), np.asarray(result.images[i]), provenance=prov, overwrite=overwrite)
            written.append(compare_path(path))
    return written, prov
