"""The official side of `compare_official.py`: one measurement with the official SUPIR PyTorch code.

Runs in its own interpreter (a venv with torch; never a dependency of supir-mlx) with the official work tree
(https://github.com/Fanghua-Yu/SUPIR at the commit compare_official.py names) put on sys.path. The networks
come from the official `options/SUPIR_v0.yaml` through the official `instantiate_from_config`, with random
weights drawn on the target device (nothing is downloaded), cast to the run dtype and called under the
autocast the official wrappers use, as `test.py --loading_half_params` runs them:

    denoiser S   DiscreteDenoiserWithControl(ControlWrapper(LightGLVUNet, GLVControl)), CFG batch 2, latent SxS
    decode P     post_quant_conv + Decoder on a [1, 4, P/8, P/8] latent (decode_first_stage), optionally through
                 the official tiled VAE (VAEHook) with a decoder tile of T latent pixels
    encode P     denoise_encoder + quant_conv on a [1, 3, P, P] image (encode_first_stage_with_denoise),
                 optionally VAEHook with an encoder tile of T pixels
    text         CLIP ViT-L (hidden_states[11]) and OpenCLIP bigG (penultimate + pooled) on a batch of 2 x 77 ids

The config asks for xformers attention (VAE 'vanilla-xformers', UNet 'softmax-xformers'), and the official
tiled VAE calls xformers whatever the config says; where xformers is not installed, torch's
scaled_dot_product_attention serves its one function (`provide_xformers`).

Prints one JSON line: build and call times, and the peak memory (device allocator on CUDA, process
resident set on CPU) over the timed calls, weights included.
"""

from __future__ import annotations

import argparse
import copy
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import time
import types

from block_times import BlockTimes
from peak import ResidentPeak


# Imports of the official package that the measured code never calls, and why they may be missing here.
OPTIONAL_IMPORTS = {
    # open_clip and kornia import its image transforms; PyPI has no torchvision built against torch
    # 2.13.0+cpu (its wheel needs the CUDA torch and fails to load)
    "torchvision": "no wheel matches torch 2.13.0+cpu",
    # sgm's sampling module imports its DPM++ noise sampler; the package pulls in wandb, clip, clean-fid, ...
    "k_diffusion": "only sgm's DPM++ sampler uses it",
}


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a package and all its submodules as modules whose every name is a stand-in class."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, name, path=None, target=None):
        if name == self.package or name.startswith(self.package + "."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = _stand_in_name
        return module

    def exec_module(self, module):
        pass


class _StandIn(type):
    """A class whose every class attribute is another such class (torchvision.transforms.InterpolationMode.BICUBIC)."""

    def __getattr__(cls, attr: str) -> type:
        return _stand_in_name(attr)


def _stand_in_name(attr: str) -> type:
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _StandIn(attr, (), {})


def provide_xformers() -> None:
    """The official config asks for xformers attention in the VAE ('vanilla-xformers') and the UNet
    ('softmax-xformers'), and the official tiled VAE calls xformers whatever the config says. Where xformers is
    not installed (it has no CPU build), `xformers.ops.memory_efficient_attention` is served by torch's
    scaled_dot_product_attention: the same exact attention (softmax(q k^T / sqrt(d)) v), memory-efficient kernels
    on CUDA."""
    try:
        import xformers.ops  # noqa: F401
        return
    except ImportError:
        pass
    import torch.nn.functional as F

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None):
        if attn_bias is not None:
            raise NotImplementedError("attention bias")
        if q.ndim == 3:  # [batch, tokens, dim]
            return F.scaled_dot_product_attention(q, k, v)
        # [batch, tokens, heads, dim]
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    xformers, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.MemoryEfficientAttentionFlashAttentionOp = None
    xformers.ops = ops
    xformers.__version__ = "torch-sdpa"
    xformers.__spec__ = importlib.machinery.ModuleSpec("xformers", None, is_package=True)
    ops.__spec__ = importlib.machinery.ModuleSpec("xformers.ops", None)
    sys.modules.update({"xformers": xformers, "xformers.ops": ops})


def provide_optional_imports() -> None:
    """Where an OPTIONAL_IMPORTS package cannot be imported, a stand-in takes its imports (said on stderr)."""
    for package, why in OPTIONAL_IMPORTS.items():
        try:
            importlib.import_module(package)
        except Exception as e:
            print(f"note: {package} unusable ({type(e).__name__}; {why}); a stand-in takes its imports", file=sys.stderr)
            for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
                del sys.modules[name]
            sys.meta_path.insert(0, _StandInFinder(package))


class BlockProfiler(BlockTimes):
    """Wall time per block type of one call, named and split as bench/profile_blocks.py splits supir-mlx's
    (PyTorch's CPU ops are synchronous: no evaluation hooks needed)."""

    def wrap_forward(self, cls, category: str) -> None:
        cls.forward = self.wrap(category, cls.forward)

    def install(self, mlps=()) -> None:
        """Wrap the block types' classes; `mlps`: open_clip's MLPs, plain nn.Sequential instances wrapped one by one."""
        import torch
        from sgm.modules import attention
        from sgm.modules.diffusionmodules import model, openaimodel

        attn = "attention (incl. q/k/v/out projections)"
        for mlp in mlps:
            mlp.forward = self.wrap("feed-forward (MLP)", mlp.forward)
        if mlps:  # the text encoders: transformers' CLIP and open_clip's blocks
            import open_clip.transformer
            from transformers.models.clip import modeling_clip

            for cls, category in ((modeling_clip.CLIPAttention, attn), (modeling_clip.CLIPSdpaAttention, attn),
                                  (modeling_clip.CLIPMLP, "feed-forward (MLP)")):
                self.wrap_forward(cls, category)
            block = open_clip.transformer.ResidualAttentionBlock
            block.attention = self.wrap(attn, block.attention)  # nn.MultiheadAttention with its projections
            # open_clip's LayerNorm subclass has its own forward (F.layer_norm in the input's dtype)
            self.wrap_forward(open_clip.transformer.LayerNorm, "normalisation (LayerNorm)")
        for cls, category in (
            (torch.nn.Conv2d, "convolution"),
            (torch.nn.GroupNorm, "normalisation (GroupNorm)"),
            (torch.nn.LayerNorm, "normalisation (LayerNorm)"),
            (attention.CrossAttention, attn),
            (attention.MemoryEfficientCrossAttention, attn),
            (model.AttnBlock, attn),
            (model.MemoryEfficientAttnBlock, attn),
            (attention.FeedForward, "feed-forward (GEGLU)"),
            (openaimodel.Upsample, "up-sampling (nearest x2)"),
            (model.Upsample, "up-sampling (nearest x2)"),
        ):
            self.wrap_forward(cls, category)


def build(module_fn, device, dtype):
    """Construct on the meta device (no host copy, no slow CPU init), then draw weights on `device`."""
    import torch

    with torch.device("meta"):
        net = module_fn()
    net = net.to_empty(device=device).to(dtype)
    for name, b in net.named_buffers():
        raise RuntimeError(f"unexpected buffer {name}: meta construction would leave it uninitialised")
    g = torch.Generator(device=device).manual_seed(0)
    for p in net.parameters():
        fan_in = max(1, p[0].numel()) if p.ndim > 1 else 1
        p.normal_(0.0, fan_in**-0.5 if p.ndim > 1 else 0.02, generator=g)
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="official SUPIR work tree")
    ap.add_argument("--case", required=True, choices=("denoiser", "decode", "encode", "text"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--tile", type=int, default=0, help="official tiled VAE with this tile size (0: untiled)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also time one more call per block type (bench/profile_blocks.py)")
    args = ap.parse_args()

    root = os.path.abspath(args.official)
    sys.path.insert(0, root)
    os.chdir(root)  # the official modules read CKPT_PTH.py and options/ relative to the work tree
    import torch
    from omegaconf import OmegaConf

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dev = torch.device("cuda" if args.device == "gpu" else "cpu")
    dtype = getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    cfg = OmegaConf.load(os.path.join(root, "options", "SUPIR_v0.yaml")).model.params
    provide_optional_imports()
    provide_xformers()
    from sgm.util import instantiate_from_config

    def autocast():
        # the official wrappers autocast on "cuda" only; on CPU their calls run in the weights' dtype
        return torch.autocast("cuda", dtype=dtype, enabled=cuda and dtype != torch.float32)

    t0 = time.perf_counter()
    if args.case == "denoiser":
        from sgm.modules.diffusionmodules.wrappers import ControlWrapper

        unet = build(lambda: instantiate_from_config(cfg.network_config), dev, dtype)
        control = build(lambda: instantiate_from_config(cfg.control_stage_config), dev, dtype)
        wrapper = ControlWrapper(unet, dtype=dtype)
        wrapper.load_control_model(control)
        denoiser = instantiate_from_config(cfg.denoiser_config).to(dev)
        s = args.size
        g = torch.Generator(device=dev).manual_seed(1)
        x = torch.randn(2, 4, s, s, generator=g, device=dev)
        cond = {
            "crossattn": torch.randn(2, 77, 2048, generator=g, device=dev),
            "vector": torch.randn(2, 2816, generator=g, device=dev),
            "control": torch.randn(2, 4, s, s, generator=g, device=dev),
        }
        sigma = torch.full((2,), 5.0, device=dev)

        def call():
            return denoiser(wrapper, x, sigma, cond, 1.0)

    elif args.case in ("decode", "encode"):
        from SUPIR.utils import devices
        from SUPIR.utils.tilevae import VAEHook

        devices.device = dev  # the tiled VAE's device (the official module hard-codes cuda)

        def make_vae():
            vae = instantiate_from_config(cfg.first_stage_config)
            vae.denoise_encoder = copy.deepcopy(vae.encoder)  # as SUPIRModel.__init__
            return vae

        vae = build(make_vae, dev, dtype)
        net = vae.decoder if args.case == "decode" else vae.denoise_encoder
        if args.tile:  # SUPIRModel.init_tile_vae
            net.original_forward = net.forward
            net.forward = VAEHook(net, args.tile, args.case == "decode", False, False, False, to_gpu=False)
        g = torch.Generator(device=dev).manual_seed(1)
        scale = cfg.scale_factor
        if args.case == "decode":
            z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g, device=dev)

            def call():  # SUPIRModel.decode_first_stage
                with autocast():
                    return vae.decode(z.to(dtype) / scale).float()

        else:
            img = torch.rand(1, 3, args.size, args.size, generator=g, device=dev) * 2 - 1

            def call():  # SUPIRModel.encode_first_stage_with_denoise(use_sample=False)
                with autocast():
                    h = vae.denoise_encoder(img.to(dtype))
                    mean = vae.quant_conv(h).chunk(2, dim=1)[0]
                return scale * mean.float()

    else:  # text
        import open_clip
        from transformers import CLIPTextConfig, CLIPTextModel

        from sgm.modules.encoders.modules import FrozenOpenCLIPEmbedder2

        clip_l = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           projection_dim=768, hidden_act="quick_gelu")
        ).to(dev, dtype).eval()
        # FrozenOpenCLIPEmbedder2 loads the laion2b weights; the same architecture without them:
        open_clip.create_model_and_transforms = lambda arch, device, pretrained: (
            open_clip.create_model(arch, device=device), None, None)
        bigg = FrozenOpenCLIPEmbedder2(arch="ViT-bigG-14", layer="penultimate", always_return_pooled=True,
                                       legacy=False, device=str(dev)).to(dev, dtype).eval()
        mlps = [block.mlp for block in bigg.model.transformer.resblocks]
        ids = torch.randint(1, 49407, (2, 77), device=dev)
        ids[:, -1] = 49407

        def call():  # FrozenCLIPEmbedder.forward after tokenising, FrozenOpenCLIPEmbedder2.forward after tokenising
            with autocast():
                h = clip_l(input_ids=ids, output_hidden_states=True).hidden_states[11]
                o = bigg.encode_with_transformer(ids)
                return h, o["penultimate"], o["pooled"]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    build_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        call()
        sync()
    rss = ResidentPeak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak()
    result = {
        "side": "official", "torch": torch.__version__, "build_s": build_s, "times": times,
        "median": statistics.median(times), "peak": peak,
        "peak_kind": "cuda allocator" if cuda else rss.kind,
    }
    if args.profile and not cuda:  # CUDA ops are asynchronous: per-block wall times would need a sync in each
        profiler = BlockProfiler()
        profiler.install(mlps if args.case == "text" else ())
        t = time.perf_counter()
        call()
        result["profile"] = {"total": time.perf_counter() - t, "seconds": profiler.seconds, "calls": profiler.calls}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
