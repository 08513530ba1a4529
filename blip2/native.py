"""blip2's own CPU kernels (blip2/kernels/), compiled on first use and called through ctypes: weight-only matmuls
(weight_only.cpp), int4 (every row count) and int8 (decoding steps; a prompt pass runs torch._int_mm); and, for
decoding steps, where one call beats the torch ops it replaces: T5's RMSNorm (rms_norm.cpp, eight ops, the same
bits) and one query's attention (attention.cpp, SDPA's dispatch and thread fork); and a decoder's whole step, those
kernels and torch's LayerNorm with its bits (layer_norm.cpp) called from C (decoder_step.cpp, driven by
decoder_step.py). A decoding step's kernels run on
blip2's own worker threads (pool.cpp: between kernels, while Python runs, they read ahead the next one's weights),
torch's ops on one thread meanwhile (decoding_step()).

Why not PyTorch's `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`: they keep activations in floating point
and convert every weight to float, so on few cores they are compute-bound, below the memory's bandwidth, and int4
at a prompt pass is slower than a bf16 matmul. These kernels quantize the activations to int8 (int4: per row and
group; int8: per row) and sum int8 products with VNNI (AVX-512, else AVX2), as llama.cpp's Q4 x Q8 dot products
do: `python -m bench.realsize --kernels` measures them (figures in the README). torchao's x86 kernels for the same
scheme are not in its PyPI wheel, and Intel's extension is discontinued.

Built once per source, compiler and CPU: `c++ -O3 -march=native -fopenmp` (no torch headers), one library, into
$BLIP2_KERNEL_CACHE (default ~/.cache/blip2/kernels), written to a temporary name (`.NAME.PID.tmp`, removed by the
next build once that process is gone) and renamed, so concurrent processes never load half a file. The cache is
trusted as pip and ccache trust theirs: the folder and the library must belong to this user and be writable by no
one else, else nothing is loaded from it (a library planted there would run its code here). A cached library whose
bytes no longer match the digest written beside it at its build (cut short, corrupt, replaced) is built again.
Its OpenMP is the runtime torch already loaded (the same libgomp.so.1), sized by torch.get_num_threads(). Where
it cannot be built (no C++ compiler, no OpenMP, a CPU without AVX2), where the cache is not trusted, or where
$BLIP2_KERNELS=aten, `available()` is False and weight_only.py keeps PyTorch's kernels; the reason is logged once.
"""

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
KERNELS = Path(__file__).with_name("kernels")
SOURCES = tuple(KERNELS / f for f in ("weight_only.cpp", "pool.cpp", "rms_norm.cpp", "attention.cpp",
                                      "layer_norm.cpp", "decoder_step.cpp"))  # compiled
HEADERS = (KERNELS / "bf16.h", KERNELS / "pool.h")  # included (part of the build's key)
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


def check_private(path: Path) -> None:
    """Raise OSError unless `path` belongs to this user and no one else can write it (pip's and ccache's rule for
    their caches): a shared object someone else can put or change there would run its code in this process."""
    if not hasattr(os, "getuid"):
        return
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        who = f"belongs to uid {st.st_uid}" if st.st_uid != os.getuid() else \
            f"is writable by {'others' if st.st_mode & 0o002 else 'its group'} (mode {st.st_mode & 0o777:o})"
        raise OSError(f"the kernel cache {path} {who}, so a library planted there could run its code here; nothing "
                      f"is loaded from it. Fix: point BLIP2_KERNEL_CACHE at a folder of your own (mkdir -m 700), "
                      f"or chmod go-w it")


def build(compiler: str, flags: tuple[str, ...] = FLAGS, out_dir: Path | None = None) -> Path:
    """Compile the kernel (or find it built) and return the shared library's path. Raises OSError (an untrusted
    cache folder: check_private) or subprocess.CalledProcessError (with the compiler's message) when it cannot be
    built. A cached library is used only when its bytes still have the digest written beside it at its build (a
    damaged one can crash the process inside dlopen); else it is built again."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [f.read_text() for f in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, version, " ".join(flags), cpu_signature()]).encode())
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"blip2_weight_only_{key.hexdigest()[:16]}.so"
    digest = lib.with_suffix(".sha256")
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(out_dir)
    if lib.is_file():
        check_private(lib)
        if intact(lib, digest):
            return lib
        log.warning("%s does not match the digest of its build (cut short, corrupt or replaced): building it "
                    "again", lib)
    for stale in out_dir.glob(".*.tmp"):  # left by a build that was killed: its process is gone
        pid = stale.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp, tmp_digest = (out_dir / f".{f.name}.{os.getpid()}.tmp" for f in (lib, digest))
    try:
        subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(tmp)], capture_output=True, text=True,
                       check=True)
        tmp_digest.write_text(sha256(tmp))
        os.replace(tmp_digest, digest)
        os.replace(tmp, lib)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_digest.unlink(missing_ok=True)
    return lib


def intact(lib: Path, digest: Path) -> bool:
    if not digest.is_file():
        return False
    check_private(digest)
    return digest.read_text() == sha256(lib)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def load(path: Path) -> ctypes.CDLL:
    """The kernels in the shared library at `path`. Raises OSError naming the file when it does not load or lacks
    one of the kernels' symbols."""
    try:
        lib = ctypes.CDLL(str(path))
        kernels = (lib.blip2_isa, lib.blip2_int4_mm, lib.blip2_int8_mm, lib.blip2_rms_norm, lib.blip2_attend,
                   lib.blip2_decoder_step, lib.blip2_layer_norm)
        lib.blip2_pool_allow.argtypes, lib.blip2_pool_allow.restype = [ctypes.c_int], None
        lib.blip2_pool_runs.argtypes, lib.blip2_pool_runs.restype = [], ctypes.c_long
    except (OSError, AttributeError) as e:
        raise OSError(f"{path} is not a loadable build of blip2's kernels ({e})") from None
    p, i = ctypes.c_void_p, ctypes.c_int
    for f in kernels:
        f.restype = i
    kernels[1].argtypes = [p, i, i, i, i, p, p, i, p, p, i, i]  # blip2_int4_mm
    kernels[2].argtypes = [p, i, i, i, i, p, p, i, p, p, i, i]  # blip2_int8_mm
    kernels[3].argtypes = [p, i, i, i, p, i, ctypes.c_float, p, i, i]  # blip2_rms_norm
    kernels[4].argtypes = [p, p, p, p, p, i, i, i, i, i, *[ctypes.c_int64] * 9, ctypes.c_float, i]  # blip2_attend
    kernels[5].argtypes = [p, p, p, p]  # blip2_decoder_step (decoder_step.py)
    kernels[6].argtypes = [p, i, i, p, p, ctypes.c_float, i, p]  # blip2_layer_norm
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


OUT_DTYPES = (torch.bfloat16, torch.float32)  # what the kernels write (bfloat16 rounded as torch rounds)


@dataclass(frozen=True)
class Call:
    """A kernel bound to a weight that int4_call / int8_call checked: (..., K) bfloat16 / float32 x -> (..., N) in
    `dtype`. A layer keeps its Call across decoding steps, so a step does not check again each of its ~200
    weights."""

    kernel: Callable[..., int]  # blip2_int4_mm or blip2_int8_mm: (x, x is bf16, M, K, N, *args, y, y is bf16, threads)
    k: int
    n: int
    dtype: torch.dtype
    args: tuple[int | None, ...]  # the weight's and its scales' memory, the group size or the scales' dtype, the bias
    tensors: tuple[torch.Tensor, ...]  # the memory args points into, kept alive while this Call is

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        if x.dtype not in (torch.bfloat16, torch.float32) or not x.is_cpu:
            raise TypeError(f"{self.kernel.__name__} takes bfloat16 / float32 activations on the CPU, got {x.dtype} "
                            f"on {x.device}")
        if x.dim() == 0 or x.shape[-1] != self.k:
            raise ValueError(f"{self.kernel.__name__}: activations {tuple(x.shape)} do not fit the weight's {self.k} "
                             f"inputs")
        x = x.contiguous()
        m = x.numel() // self.k
        y = torch.empty(x.shape[:-1] + (self.n,), dtype=self.dtype)
        if m and self.kernel(x.data_ptr(), x.dtype == torch.bfloat16, m, self.k, self.n, *self.args, y.data_ptr(),
                             self.dtype == torch.bfloat16, threads()):
            raise MemoryError(f"{self.kernel.__name__}: no memory for the quantized activations ({m} x {self.k})")
        return y


def int4_call(weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, k: int,
              bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
              lib: ctypes.CDLL | None = None) -> Call:
    """x (M, k) -> x @ W^T + bias (M, N) in `dtype` (bfloat16: the product rounded, then the sum with the bias, as
    y.to(bfloat16) + bias). weight: uint8 (N, k/2) in blip2's packed layout (weight_only.pack_int4 with layout 0);
    scales_and_zeros: bfloat16 (N/16, k/group, 16, 2); bias (N,) in `dtype`, or None."""
    lib = lib or library()
    n = weight.shape[0]
    if scales_and_zeros.dtype != torch.bfloat16 or weight.dtype != torch.uint8:
        raise TypeError(f"int4_mm takes a uint8 packed weight and bfloat16 scales, got {weight.dtype} and "
                        f"{scales_and_zeros.dtype}")
    if not 8 <= group_size <= 256 or group_size % 8 or weight.shape != (n, k // 2) or n % 16 or k % group_size:
        raise ValueError(f"int4_mm: weight {tuple(weight.shape)} does not fit {k} inputs in groups of {group_size}")
    if scales_and_zeros.shape != (n // 16, k // group_size, 16, 2):
        raise ValueError(f"int4_mm: scales_and_zeros {tuple(scales_and_zeros.shape)}, expected "
                         f"{(n // 16, k // group_size, 16, 2)}")
    return bind("int4_mm", lib.blip2_int4_mm, weight, scales_and_zeros, group_size, bias, k, dtype)


def int8_call(weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32, lib: ctypes.CDLL | None = None) -> Call:
    """x (M, K) -> x @ (weight * scales[:, None])^T + bias (M, N) in `dtype` (as int4_call); weight int8 (N, K) as
    saved, scales (N,) bfloat16 / float32. For a few rows (decoding steps): every row reads the whole weight."""
    lib = lib or library()
    n, k = weight.shape
    if scales.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"int8_mm takes bfloat16 / float32 scales, got {scales.dtype}")
    if weight.dtype != torch.int8 or scales.shape != (n,):
        raise ValueError(f"int8_mm: weight {tuple(weight.shape)} {weight.dtype} and scales {tuple(scales.shape)} "
                         f"do not fit {k} inputs")
    return bind("int8_mm", lib.blip2_int8_mm, weight, scales, int(scales.dtype == torch.bfloat16), bias, k, dtype)


def int4_mm(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
            bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """int4_call(...)(x): (M, K) bfloat16 / float32 x @ W^T + bias -> (M, N) in `dtype`."""
    return int4_call(weight, scales_and_zeros, group_size, x.shape[-1], bias, dtype, lib)(x)


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """int8_call(...)(x): (M, K) bfloat16 / float32 x @ (weight * scales[:, None])^T + bias -> (M, N) in `dtype`."""
    return int8_call(weight, scales, bias, dtype, lib)(x)


def bind(name: str, kernel: Callable[..., int], weight: torch.Tensor, scales: torch.Tensor, extra: int,
         bias: torch.Tensor | None, k: int, dtype: torch.dtype) -> Call:
    """`kernel` bound to a weight whose shapes and dtypes the caller checked: its memory is checked here (the kernels
    read it raw: contiguous on the CPU, a tensor on the meta device has none), and the bias (N,) in the output's
    dtype. `extra`: the kernel's argument after the scales (int4's group size, int8's scales-are-bf16)."""
    n = weight.shape[0]
    if dtype not in OUT_DTYPES or (bias is not None and (bias.dtype != dtype or bias.shape != (n,))):
        raise TypeError(f"{name} writes bfloat16 or float32 with a bias (N,) of that dtype, got {dtype} and "
                        f"{None if bias is None else (bias.dtype, tuple(bias.shape))}")
    tensors = (weight, scales) + (() if bias is None else (bias,))
    if not all(t.is_cpu and t.is_contiguous() for t in tensors):
        raise ValueError(f"{name}: the weight, its scales and the bias must be contiguous, all on the CPU (a tensor on "
                         f"the meta device was never loaded)")
    # detached aliases keep the memory alive (a parameter's .data may be replaced while the Call points into it)
    return Call(kernel, k, n, dtype, (weight.data_ptr(), scales.data_ptr(), extra,
                None if bias is None else bias.data_ptr()), tuple(t.detach() for t in tensors))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, lanes: int, lib: ctypes.CDLL | None = None
             ) -> torch.Tensor:
    """T5's RMSNorm (transformers' T5LayerNorm) of x (..., d) in one call, rounded as its torch ops round where
    `lanes` is the width (8 or 16 floats) torch's CPU sum adds a row at (t5.norm_lanes finds it). x bfloat16 /
    float32, weight (d,) bfloat16 / float32, both on the CPU -> (..., d) in bfloat16 where the weight is, else
    float32 (as the reference's dtypes)."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError("blip2's kernels are not built in this process (native.available() is False)")
    if not (x.dtype in OUT_DTYPES and weight.dtype in OUT_DTYPES and x.is_cpu and weight.is_cpu):
        raise TypeError(f"rms_norm takes bfloat16 / float32 x and weight on the CPU, got {x.dtype} on {x.device} and "
                        f"{weight.dtype} on {weight.device}")
    d = weight.shape[0]
    if weight.shape != (d,) or x.dim() == 0 or x.shape[-1] != d or lanes not in (8, 16):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit, or lanes "
                         f"{lanes} is not 8 or 16")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty(x.shape, dtype=weight.dtype)
    lib.blip2_rms_norm(x.data_ptr(), x.dtype == torch.bfloat16, x.numel() // d, d, weight.data_ptr(),
                       weight.dtype == torch.bfloat16, eps, y.data_ptr(), lanes, threads())
    return y


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, form: int,
               lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """torch's layer_norm of bfloat16 x (..., d) with bfloat16 weight and bias (d,), in one call, with its bits where
    `form` is the one torch computes in here (opt.layer_norm_form finds it: bit 0 the width, 8 or 16 floats; bit 1
    the last line's form). d must be a multiple of 16 (32 at 16 floats)."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError("blip2's kernels are not built in this process (native.available() is False)")
    d = weight.shape[0]
    if not all(t.dtype == torch.bfloat16 and t.is_cpu for t in (x, weight, bias)):
        raise TypeError(f"layer_norm takes bfloat16 x, weight and bias on the CPU, got {x.dtype}, {weight.dtype}, "
                        f"{bias.dtype}")
    if weight.shape != (d,) or bias.shape != (d,) or x.dim() == 0 or x.shape[-1] != d or form not in range(4) \
            or d % (32 if form & 1 else 16):
        raise ValueError(f"layer_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{tuple(bias.shape)} do not fit, or form {form} (0-3) does not divide {d}")
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    y = torch.empty_like(x)
    lib.blip2_layer_norm(x.data_ptr(), x.numel() // d, d, weight.data_ptr(), bias.data_ptr(), eps, form, y.data_ptr())
    return y


_found: dict[tuple[int, str], object] = {}  # (id(library()), what) -> what probe() found


def probe(what: str, candidates: dict, gives_torchs_bits: Callable[[object, ctypes.CDLL], bool]) -> object | None:
    """The first of `candidates` (value -> how it computes) with which blip2's kernel for `what` gives the bits of
    torch's ops here, tried once per process against torch itself (t5.norm_lanes, opt.layer_norm_form); None where
    none does or blip2's kernels are not built (disabled() included): torch's ops are used then. Logged."""
    lib = library()
    if lib is None:
        return None
    if (id(lib), what) not in _found:
        found = next((c for c in candidates if gives_torchs_bits(c, lib)), None)
        _found[id(lib), what] = found
        if found is None:
            log.warning("%s: torch computes it here in an order blip2's kernel does not reproduce; torch's ops are "
                        "used", what)
        else:
            log.info("%s: blip2's kernel, with torch's bits (%s)", what, candidates[found])
    return _found[id(lib), what]


def serves(*tensors: torch.Tensor | None) -> bool:
    """Whether blip2's decoding-step kernels (rms_norm, attend) may stand in for torch's ops on these tensors: they
    are built here, the tensors are bfloat16 / float32 on the CPU, no gradient is wanted of them and torch.compile
    is not tracing (it sees torch's ops). Else torch's ops run."""
    grad = torch.is_grad_enabled()
    return all(t is None or t.dtype in OUT_DTYPES and t.is_cpu and not (grad and t.requires_grad) for t in tensors) \
        and not torch.compiler.is_compiling() and library() is not None


def attends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether attend serves this attention: one query, keys and values (at least one) of its shape, one dtype (a
    bool mask: SDPA), each row contiguous, and serves()."""
    return q.dim() == 4 and q.shape[2] == 1 and k.shape == v.shape and k.shape[:2] == q.shape[:2] and \
        k.shape[2] > 0 and k.shape[3] == q.shape[3] and k.stride(-1) == 1 and v.stride(-1) == 1 and \
        k.dtype == v.dtype == q.dtype and (mask is None or mask.dtype == q.dtype) and serves(q, k, v, mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float | None = None) -> torch.Tensor:
    """One query's attention: q (B, H, 1, hd), k / v (B, H, T, hd) (their last dimension contiguous), mask
    additive, broadcastable to (B, H, 1, T), or None; all of one dtype, bfloat16 or float32, on the CPU ->
    (B, 1, H * hd) in that dtype: softmax(scale * q k^T + mask) v in float32, as scaled_dot_product_attention
    (scale None: hd^-1/2)."""
    lib = library()
    if lib is None:
        raise RuntimeError("blip2's kernels are not built in this process (native.available() is False)")
    b, h, one, hd = q.shape
    t = k.shape[2]
    if one != 1 or k.shape != (b, h, t, hd) or v.shape != (b, h, t, hd) or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"attend: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: one query, keys and "
                         f"values of q's batch, heads and width, each row contiguous")
    if not all(x.dtype == q.dtype and x.dtype in OUT_DTYPES and x.is_cpu for x in (k, v) + (() if mask is None else
                                                                                      (mask,))):
        raise TypeError(f"attend takes q, k, v and the mask in one dtype, bfloat16 or float32, on the CPU; got "
                        f"{[None if x is None else x.dtype for x in (q, k, v, mask)]}")
    if q.stride(3) != 1 or q.stride(1) != hd or b > 1 and q.stride(0) != h * hd:  # (B, H*hd) memory: a linear's output
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.empty(b, 1, h * hd, dtype=q.dtype)
    m = mask.expand(b, h, 1, t) if mask is not None else None  # broadcast dimensions: stride 0
    ms = (m.stride(0), m.stride(1), m.stride(3)) if m is not None else (0, 0, 0)
    if lib.blip2_attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), None if m is None else m.data_ptr(),
                        out.data_ptr(), q.dtype == torch.bfloat16, b, h, t, hd, *k.stride()[:3], *v.stride()[:3], *ms,
                        hd ** -0.5 if scale is None else scale, threads()):
        raise MemoryError("attend: no memory for the attention scores")
    return out


_step = threading.local()  # .threads: inside decoding_step(), the threads torch had


def threads() -> int:
    """The threads blip2's kernels run on: torch's count, or inside decoding_step() the count torch had before."""
    return getattr(_step, "threads", 0) or torch.get_num_threads()


@contextlib.contextmanager
def decoding_step():
    """Within: torch's own ops on one thread (a decoding step's are small; forking OpenMP's workers for one, as
    F.gelu does at 5120 elements, leaves a worker spinning on the core blip2's pool works on: kernels/pool.cpp), and
    blip2's kernels on the threads torch had, on its pool (which serves only inside this). torch.set_num_threads is
    process-wide: another thread's torch ops run on one thread meanwhile."""
    n, lib = torch.get_num_threads(), library()
    if n < 2 or getattr(_step, "threads", 0) or lib is None:
        yield
        return
    _step.threads = n
    torch.set_num_threads(1)
    lib.blip2_pool_allow(1)  # this thread's kernels on the pool (kernels/pool.cpp serves no one else)
    try:
        yield
    finally:
        lib.blip2_pool_allow(0)
        torch.set_num_threads(n)
        _step.threads = 0
