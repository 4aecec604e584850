"""What the run ran on, and which device and precision a stage uses."""
from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import psutil

VERSIONED = ("torch", "transformers", "datasets", "dvc", "mlflow")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def nvidia_gpus() -> list[tuple[str, float]]:
    """(name, memory in GiB) of each NVIDIA GPU, from the driver (NVML): the stages that load no model
    (download, preprocess) may open the run, and they do not import torch. None without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001  (no package, no driver, no GPU: all mean none)
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        names = [pynvml.nvmlDeviceGetName(h) for h in handles]  # str, or bytes from older nvidia-ml-py
        names = [name.decode() if isinstance(name, bytes) else str(name) for name in names]
        return [(name, pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30) for name, h in zip(names, handles)]
    finally:
        pynvml.nvmlShutdown()


def describe() -> dict[str, str]:
    """Hardware and library versions, as flat string tags."""
    gpus = nvidia_gpus()
    info = {
        "hardware.cpu": cpu_model(),
        "hardware.cpu_cores": str(psutil.cpu_count(logical=True) or os.cpu_count()),
        "hardware.ram_gb": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "hardware.gpu_count": str(len(gpus)),
    }
    if gpus:
        info["hardware.gpu"] = gpus[0][0]
        info["hardware.gpu_memory_gb"] = f"{gpus[0][1]:.1f}"
    info.update({f"version.{p}": _version(p) for p in VERSIONED})
    return info


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16; without them bf16 on the CPU is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device_and_precision(precision: str) -> tuple[str, str]:
    """(device, precision) training uses: `auto` picks bf16 where the hardware runs it natively."""
    import torch

    device = pick_device()
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_fast_bf16()
        precision = "bf16" if fast else "fp32"
    return device, precision
