"""blip2's own weight-only matmuls for the CPU (blip2/kernels/weight_only.cpp), compiled on first use and called
through ctypes: int4 (every row count) and int8 (decoding steps; a prompt pass runs torch._int_mm).

Why not PyTorch's `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`: they keep activations in floating point
and convert every weight to float, so on few cores they are compute-bound, below the memory's bandwidth, and int4
at a prompt pass is slower than a bf16 matmul. These kernels quantize the activations to int8 (int4: per row and
group; int8: per row) and sum int8 products with VNNI (AVX-512, else AVX2), as llama.cpp's Q4 x Q8 dot products
do: `python -m bench.realsize --kernels` measures them (figures in the README). torchao's x86 kernels for the same
scheme are not in its PyPI wheel, and Intel's extension is discontinued.

Built once per source, compiler and CPU: `c++ -O3 -march=native -fopenmp` (no torch headers), into
$BLIP2_KERNEL_CACHE (default ~/.cache/blip2/kernels), written to a temporary name and renamed, so concurrent
processes never load half a file. Its OpenMP is the runtime torch already loaded (the same libgomp.so.1), sized by
torch.get_num_threads(). Where it cannot be built (no C++ compiler, no OpenMP, a CPU without AVX2) or where
$BLIP2_KERNELS=aten, `available()` is False and weight_only.py keeps PyTorch's kernels; the reason is logged
once.
"""

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("kernels") / "weight_only.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
ENV_KERNEL = "BLIP2_KERNELS"  # "blip2" (default) or "aten" (PyTorch's kernels)
_lib: ctypes.CDLL | None = None
_tried = False
_off = False  # inside disabled()


def cache_dir() -> Path:
    d = os.environ.get("BLIP2_KERNEL_CACHE")
    return Path(d) if d else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blip2" / "kernels"


def cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.platform() + platform.processor()


def build(compiler: str, flags: tuple[str, ...] = FLAGS, out_dir: Path | None = None) -> Path:
    """Compile the kernel (or find it built) and return the shared library's path. Raises OSError or
    subprocess.CalledProcessError (with the compiler's message) when it cannot be built."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), cpu_signature()]).encode())
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"blip2_weight_only_{key.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=True)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.blip2_isa.restype = lib.blip2_int4_mm.restype = lib.blip2_int8_mm.restype = i
    lib.blip2_int4_mm.argtypes = [p, i, i, i, i, p, p, i, p, i]
    lib.blip2_int8_mm.argtypes = [p, i, i, i, i, p, p, i, p, i]
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernel, or None (PyTorch's kernel then): built and loaded once per process."""
    global _lib, _tried
    if _off:
        return None
    if not _tried:
        _tried = True
        choice = os.environ.get(ENV_KERNEL, "blip2")
        if choice not in ("blip2", "aten"):
            log.warning("%s=%r: expected blip2 or aten; using blip2", ENV_KERNEL, choice)
        if choice != "aten" and platform.machine().lower() in ("x86_64", "amd64"):
            try:
                lib = load(build(os.environ.get("CXX", "c++")))
                _lib = lib if lib.blip2_isa() > 0 else None
                if _lib is None:
                    log.warning("weight-only int8/int4: this CPU has neither AVX-512 VNNI nor AVX2; PyTorch's "
                                "kernels are used")
            except (OSError, subprocess.CalledProcessError) as e:
                why = getattr(e, "stderr", None) or str(e)
                log.warning("weight-only int8/int4: blip2's kernels could not be built (%s); PyTorch's kernels are "
                            "used (slower)", why.strip().splitlines()[-1] if why.strip() else type(e).__name__)
    return _lib


def available() -> bool:
    return library() is not None


@contextlib.contextmanager
def disabled():
    """Within: PyTorch's kernels, as if blip2's could not be built (an int4 layer quantized inside keeps PyTorch's
    layout and kernel afterwards; int8 layers pick their kernel at each call: side-by-side comparisons, tests)."""
    global _off
    before, _off = _off, True
    try:
        yield
    finally:
        _off = before


def isa() -> str:
    """The instruction set the kernel was built for: "avx512-vnni", "avx2", or "" when it is not in use."""
    lib = library()
    return {2: "avx512-vnni", 1: "avx2"}.get(lib.blip2_isa(), "") if lib else ""


def int4_mm(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """(M, K) bfloat16 / float32 x @ W^T -> (M, N) float32. weight: uint8 (N, K/2) in blip2's packed layout
    (weight_only.pack_int4 with layout 0); scales_and_zeros: bfloat16 (N/16, K/group, 16, 2)."""
    lib = lib or library()
    k, n = x.shape[1], weight.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float32) or scales_and_zeros.dtype != torch.bfloat16:
        raise TypeError(f"int4_mm takes bfloat16 / float32 activations and bfloat16 scales, got {x.dtype} and "
                        f"{scales_and_zeros.dtype}")
    if weight.shape != (n, k // 2) or n % 16 or k % group_size or group_size % 8 or group_size > 256:
        raise ValueError(f"int4_mm: weight {tuple(weight.shape)} does not fit {k} inputs in groups of {group_size}")
    if scales_and_zeros.shape != (n // 16, k // group_size, 16, 2):
        raise ValueError(f"int4_mm: scales_and_zeros {tuple(scales_and_zeros.shape)}, expected "
                         f"{(n // 16, k // group_size, 16, 2)}")
    if not (weight.is_contiguous() and scales_and_zeros.is_contiguous()) or x.device.type != "cpu":
        raise ValueError("int4_mm: the packed weight and its scales must be contiguous, the activations on the CPU")
    return launch(lib.blip2_int4_mm, x, n, weight.data_ptr(), scales_and_zeros.data_ptr(), group_size)


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """(M, K) bfloat16 / float32 x @ (weight * scales[:, None])^T -> (M, N) float32; weight int8 (N, K) as saved,
    scales (N,) bfloat16 / float32. For a few rows (decoding steps): every row reads the whole weight."""
    lib = lib or library()
    k, n = x.shape[1], weight.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float32) or scales.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"int8_mm takes bfloat16 / float32 activations and scales, got {x.dtype} and {scales.dtype}")
    if weight.dtype != torch.int8 or weight.shape != (n, k) or scales.shape != (n,):
        raise ValueError(f"int8_mm: weight {tuple(weight.shape)} {weight.dtype} and scales {tuple(scales.shape)} "
                         f"do not fit {k} inputs")
    if not (weight.is_contiguous() and scales.is_contiguous()) or x.device.type != "cpu":
        raise ValueError("int8_mm: the weight and its scales must be contiguous, the activations on the CPU")
    return launch(lib.blip2_int8_mm, x, n, weight.data_ptr(), scales.data_ptr(), int(scales.dtype == torch.bfloat16))


def launch(kernel, x: torch.Tensor, n: int, *args: int) -> torch.Tensor:
    """y (M, N) float32 from `kernel`(x, x is bf16, M, K, N, *args, y, threads), the kernels' one calling convention."""
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    threads = torch.get_num_threads()
    if m and kernel(x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, n, *args, y.data_ptr(), threads):
        raise MemoryError(f"{kernel.__name__}: no memory for the quantized activations ({m} x {k})")
    return y
