"""The bundled video DiT and ``nabla demo``.

A tiny diffusers ``WanTransformer3DModel`` trained with rectified flow on three real clips (see
``training/``), shipped as ``nabla_attn/assets/tiny_wan_video.safetensors``. Importing this package
needs the ``demo`` extra (diffusers, safetensors); ``nabla demo`` also uses PyAV, Pillow, matplotlib
and tqdm.
"""

from .metrics import psnr, ssim
from .model import CLASS_NAMES, MaskPolicy, TinyVideoDiT, TinyWanConfig, load_bundled, sample

__all__ = ["CLASS_NAMES", "MaskPolicy", "TinyVideoDiT", "TinyWanConfig", "load_bundled", "psnr", "sample", "ssim"]
