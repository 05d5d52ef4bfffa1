"""Machine peaks measured in the benchmark's own run: fp32 FMA, AMX bf16, DRAM read bandwidth.

benchmarks/probes.c is compiled with gcc into a temporary directory, once per ISA with explicit
-m flags (never -march=native), and loaded with ctypes. A probe whose ISA the CPU lacks, or whose
flags this gcc does not know, is skipped with a note; without gcc every peak is skipped.

Each measurement returns (cpu, wall): the rate per CPU-second of the busiest thread (the
hardware's rate, unaffected by other processes taking turns on the CPUs) and the wall-clock rate
this run got (lower on a busy shared machine).
"""
import ctypes
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "probes.c")

# variant -> (macro, gcc ISA flags, /proc/cpuinfo flags the CPU must report)
VARIANTS = {
    "dram": ("PROBE_DRAM", [], []),
    "avx2": ("PROBE_FMA_AVX2", ["-mavx2", "-mfma"], ["avx2", "fma"]),
    "avx512": ("PROBE_FMA_AVX512", ["-mavx512f"], ["avx512f"]),
    "amx": ("PROBE_AMX", ["-mamx-tile", "-mamx-bf16"], ["amx_tile", "amx_bf16"]),
}


def cpu_flags():
    """The feature flags of the first CPU in /proc/cpuinfo (the kernel lists only what the OS
    enables), as a set; empty where the file is unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def llc_bytes():
    """Size of the largest cache level that sysfs reports for cpu0 (0 if unknown)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for name in os.listdir(base):
            try:
                with open(os.path.join(base, name, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
            digits = text[:-1] if text[-1:].isalpha() else text
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        pass
    return best


class Probes:
    """Compiled probes. `notes` says what was skipped and why; `available` lists what loaded."""

    def __init__(self, fma_isa=None):
        """fma_isa: the FMA probe to use ('avx2' or 'avx512'); default the widest that loads."""
        self.notes = []
        self.libs = {}
        self._fma_isa = fma_isa
        self._tmp = None
        gcc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc")
        if gcc is None:
            self.notes.append("gcc not found: machine peaks skipped")
            return
        flags = cpu_flags()
        self._tmp = tempfile.mkdtemp(prefix="fa_probes_")
        for name, (macro, isa_flags, needs) in VARIANTS.items():
            missing = [f for f in needs if f not in flags]
            if missing:
                self.notes.append(f"{name} probe skipped: CPU lacks {', '.join(missing)}")
                continue
            out = os.path.join(self._tmp, f"probes_{name}.so")
            cmd = [gcc, "-O2", "-fPIC", "-shared", "-fopenmp", "-std=gnu11", f"-D{macro}",
                   *isa_flags, SOURCE, "-o", out]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                err = (res.stderr.strip().splitlines() or ["?"])[-1]
                self.notes.append(f"{name} probe skipped: gcc failed ({err})")
                continue
            self.libs[name] = ctypes.CDLL(out)
        for lib_name, fn in (("dram", "probe_dram_read_gbs"), ("avx2", "probe_fma_avx2_gflops"),
                             ("avx512", "probe_fma_avx512_gflops"),
                             ("amx", "probe_amx_bf16_gflops")):
            if lib_name in self.libs:
                f = getattr(self.libs[lib_name], fn)
                f.restype = ctypes.c_double
                out = ctypes.POINTER(ctypes.c_double)
                if lib_name == "dram":
                    f.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_double, ctypes.c_int,
                                  out]
                else:
                    f.argtypes = [ctypes.c_int, ctypes.c_double, ctypes.c_int, out]

    @property
    def available(self):
        return sorted(self.libs)

    def fma_isa(self):
        """'avx512' or 'avx2' (the one asked for, else the widest FMA probe that loaded), or None."""
        if self._fma_isa is not None:
            return self._fma_isa if self._fma_isa in self.libs else None
        return next((n for n in ("avx512", "avx2") if n in self.libs), None)

    def fma_gflops(self, threads, min_seconds=0.2, reps=3):
        """fp32 FMA (cpu, wall) GFLOP/s, or None without an FMA probe."""
        isa = self.fma_isa()
        if isa is None:
            return None
        cpu = ctypes.c_double()
        fn = getattr(self.libs[isa], f"probe_fma_{isa}_gflops")
        wall = fn(int(threads), float(min_seconds), int(reps), ctypes.byref(cpu))
        return cpu.value, wall

    def amx_gflops(self, threads, min_seconds=0.2, reps=3):
        """AMX bf16 (cpu, wall) GFLOP/s, or None when the probe is unavailable or the OS
        refuses AMX."""
        if "amx" not in self.libs:
            return None
        cpu = ctypes.c_double()
        wall = self.libs["amx"].probe_amx_bf16_gflops(int(threads), float(min_seconds), int(reps),
                                                       ctypes.byref(cpu))
        if wall < 0:
            if not any(n.startswith("amx") for n in self.notes):
                self.notes.append("amx probe skipped: arch_prctl(ARCH_REQ_XCOMP_PERM) refused")
            return None
        return cpu.value, wall

    def dram_gbs(self, threads, nbytes=None, min_seconds=0.3, reps=3):
        """Streaming read (cpu, wall) GB/s over a buffer of nbytes (default: max(1 GiB, 8 x the
        last-level cache)), or None."""
        if "dram" not in self.libs:
            return None
        if nbytes is None:
            nbytes = max(1 << 30, 8 * llc_bytes())
        cpu = ctypes.c_double()
        wall = self.libs["dram"].probe_dram_read_gbs(int(nbytes), int(threads),
                                                      float(min_seconds), int(reps),
                                                      ctypes.byref(cpu))
        return None if wall < 0 else (cpu.value, wall)

    def close(self):
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
