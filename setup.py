"""Build flash_attn_c: one CPython extension (flash_attn_c._C) from the C kernels in csrc/.

Each ISA's kernels are compiled with that ISA's flags only (no host-specific target, no relaxed math),
so one build runs everywhere and picks its kernels at import time.
"""
import os
import sys

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

COMMON = ["-std=c11", "-O3", "-fno-strict-aliasing", "-fvisibility=hidden", "-Wall", "-Wextra",
          "-Wno-unused-parameter"]
# The kernels only: let a*b+c contract to FMA where the ISA has it (C allows contraction).
KERNEL = COMMON + ["-ffp-contract=fast"]
ISA_FLAGS = {
    "scalar": ["-fno-tree-vectorize"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    # The AMX family's own kernels (bf16 tiles); fa_dispatch.c checks AMX-TILE/BF16, AVX512-BF16
    # and the OS tile-data permission before they can be selected.
    "amx": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx2", "-mfma",
            "-mf16c", "-mamx-tile", "-mamx-bf16"],
}
SANITIZE = os.environ.get("FLASH_ATTN_C_SANITIZE", "")  # e.g. "address,undefined" (make asan)


def kernel_sources(isa):
    return [os.path.join("csrc", f) for f in sorted(os.listdir("csrc"))
            if f.endswith(f"__{isa}.c")]


class BuildExt(build_ext):
    """Compiles each ISA group with its own flags, then links everything into one module."""

    def build_extension(self, ext):
        extra = ["-g"] + ([f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"] if SANITIZE else [])
        objects = []
        for isa, flags in ISA_FLAGS.items():
            objects += self.compiler.compile(kernel_sources(isa), output_dir=self.build_temp,
                                             extra_postargs=KERNEL + flags + extra,
                                             depends=ext.depends)
        ext.extra_objects = objects
        # Relink when a kernel object changed (build_ext only compares sources and depends).
        ext.depends = list(ext.depends) + objects
        ext.extra_compile_args = COMMON + ["-fopenmp"] + extra
        ext.extra_link_args = ["-fopenmp"] + ([f"-fsanitize={SANITIZE}"] if SANITIZE else [])
        super().build_extension(ext)


ext = Extension(
    "flash_attn_c._C",
    sources=["csrc/python/fa_module.c", "csrc/fa_driver.c", "csrc/fa_dispatch.c", "csrc/fa_aux.c",
             "csrc/fa_bwd_driver.c", "csrc/fa_workspace.c"],
    depends=[os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h")],
    include_dirs=[np.get_include(), "csrc"],
)

if sys.platform != "linux":
    raise SystemExit("flash_attn_c builds on Linux x86-64 with GCC (OpenMP) for now")

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
