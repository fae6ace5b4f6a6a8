"""Prepare what `bench/gpu_suite.sh install` needs on a GPU machine that cannot reach a package index.

    python bench/gpu_pack.py --official-git ~/src/SUPIR [--out .gpu] [--arch 90] [--python 3.12]

Writes OUT/wheels (MLX with its CUDA backend at this environment's MLX version, mlx-lm, and what the official
code imports beyond a stock PyTorch image: omegaconf + antlr4, open_clip_torch 2.17.1 + ftfy + wcwidth,
kornia 0.6.9, diffusers) and OUT/official (the official code at the pinned commit: SUPIR/, sgm/, options/, CKPT_PTH.py).

--arch N keeps only the sm_N machine code in the CUDA backend and packs its files as a .tar.xz instead of the
wheel: the wheel is ~90 MB, mostly kernels for six GPU generations, and some remote machines take at most
64 MiB per transfer. The other architectures' kernels are overwritten with zeros in place (the CUDA fat
binary keeps its layout and headers, the runtime only loads the entry that matches the device), so the
library is byte-for-byte the released one for that GPU and packs to ~22 MB.
"""

from __future__ import annotations

import argparse
import io
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_official import OFFICIAL_COMMIT  # noqa: E402

FATBIN_MAGIC = 0xBA55ED50
ELF_KIND = 2
OFFICIAL_PATHS = ["SUPIR", "sgm", "options", "CKPT_PTH.py"]


def official_wheels(mlx_lm: str) -> list[str]:
    return [f"mlx-lm=={mlx_lm}", "omegaconf==2.3.0", "open_clip_torch==2.17.1", "ftfy", "wcwidth", "kornia==0.6.9",
            "diffusers", "importlib_metadata"]


def pip_download(reqs: list[str], dest: Path, python: str) -> None:
    platforms = ["manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation",
           "cp", "--python-version", python, "-d", str(dest)]
    for p in platforms:
        cmd += ["--platform", p]
    subprocess.run(cmd + reqs, check=True)


def section(elf: bytes, name: str) -> tuple[int, int]:
    """(file offset, size) of a named section of a 64-bit little-endian ELF file."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name_off, = struct.unpack_from("<I", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        return name_off, offset, size

    strtab = header(shstrndx)[1]
    for i in range(shnum):
        name_off, offset, size = header(i)
        if elf[strtab + name_off : elf.index(b"\0", strtab + name_off)].decode() == name:
            return offset, size
    raise ValueError(f"no section {name}")


def keep_arch(lib: bytearray, arch: int) -> tuple[int, int]:
    """Zero every fat-binary entry of `lib` but the sm_<arch> machine code; (bytes kept, bytes zeroed)."""
    start, size = section(bytes(lib), ".nv_fatbin")
    pos, end, kept, zeroed = start, start + size, 0, 0
    while pos < end:
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", lib, pos)
        if magic != FATBIN_MAGIC:  # fat binaries are 8-byte aligned within the section
            pos += 8
            continue
        p, stop = pos + header_size, pos + header_size + fat_size
        while p < stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", lib, p)
            entry_arch, = struct.unpack_from("<I", lib, p + 28)
            if kind == ELF_KIND and entry_arch == arch:
                kept += payload
            else:
                lib[p + entry_header : p + entry_header + payload] = bytes(payload)
                zeroed += payload
            p += entry_header + payload
        pos = stop
    if not kept:
        raise SystemExit(f"error: the CUDA backend has no sm_{arch} code")
    return kept, zeroed


def pack_cuda_wheel(wheel: Path, arch: int) -> Path:
    out = wheel.with_name(wheel.name.replace(".whl", f"-sm{arch}.tar.xz"))
    with zipfile.ZipFile(wheel) as zf, tarfile.open(out, "w:xz", preset=6) as tar:
        for info in zf.infolist():
            if info.is_dir():
                continue
            data = zf.read(info)
            if info.filename.endswith("lib/libmlx.so"):
                lib = bytearray(data)
                kept, zeroed = keep_arch(lib, arch)
                print(f"{info.filename}: kept {kept / 1e6:.1f} MB of sm_{arch} code, zeroed {zeroed / 1e6:.1f} MB")
                data = bytes(lib)
            member = tarfile.TarInfo(info.filename)
            member.size = len(data)
            member.mode = 0o755 if info.filename.endswith(".so") or ".so." in info.filename else 0o644
            tar.addfile(member, io.BytesIO(data))
    wheel.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official-git", type=Path, required=True, help="a git clone of the official SUPIR repository")
    ap.add_argument("--out", type=Path, default=Path(".gpu"))
    ap.add_argument("--arch", type=int, default=0, help="keep only this SM architecture's CUDA code (90: H100/H200)")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    ap.add_argument("--cuda", default="13", help="CUDA major version of the MLX backend wheel")
    args = ap.parse_args()

    import mlx.core as mx
    from importlib.metadata import version

    wheels = args.out / "wheels"
    shutil.rmtree(args.out, ignore_errors=True)
    wheels.mkdir(parents=True)
    pip_download([f"mlx=={mx.__version__}", f"mlx-cuda-{args.cuda}=={mx.__version__}",
                  *official_wheels(version("mlx-lm"))], wheels, args.python)
    with tempfile.TemporaryDirectory() as tmp:  # antlr4 4.9.3 (omegaconf's pin) exists only as a source release
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp,
                        "antlr4-python3-runtime==4.9.3"], check=True)
        for w in Path(tmp).glob("*.whl"):
            shutil.move(str(w), wheels / w.name)
    if args.arch:
        pack_cuda_wheel(next(wheels.glob(f"mlx_cuda_{args.cuda}-*.whl")), args.arch)

    official = args.out / "official"
    official.mkdir()
    archive = subprocess.run(["git", "-C", str(args.official_git), "archive", OFFICIAL_COMMIT, *OFFICIAL_PATHS],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(official, filter="data")
    (official / "COMMIT").write_text(OFFICIAL_COMMIT + "\n")
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
