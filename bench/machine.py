"""What every benchmark prints beside its figures, since the CPUs may be shared and differ from one machine to the
next: the load average, the memory available, and the CPU's count and the instruction sets blip2's code paths pick
by (AVX2 / AVX-512 VNNI for the int4/int8 kernels, AMX for bf16 matmuls and the vision tower's precision)."""

import os

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """The FLAGS this CPU has (Linux; [] elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in FLAGS if f in flags]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def available_memory() -> int:
    """MemAvailable, bytes (0 where /proc/meminfo is not)."""
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), 0)
    except OSError:
        return 0


def cpus() -> str:
    """"2 CPUs (avx2 ... amx_bf16)"."""
    return f"{os.cpu_count()} CPUs ({' '.join(cpu_flags()) or 'no AVX2'})"


def machine(cpu: bool = True) -> str:
    """"load 0.52 0.60 0.81, 22.4 GiB available, 2 CPUs (avx2 ... amx_bf16)"; cpu=False leaves out the CPUs (a
    figure's own line, beside a header that has them)."""
    line = f"load {load_average()}, {available_memory() / 2**30:.1f} GiB available"
    return line + (f", {cpus()}" if cpu else "")
