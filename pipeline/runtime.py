"""Where and how the networks compute: the device, mixed precision and the process group.

Shared by training, evaluation, prediction, adaptation and the benchmarks.
"""

from __future__ import annotations

import logging
import os

import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; other names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(
            f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS is not available here; use device=auto or cpu")
    return device


def cpu_bf16_units() -> list[str]:
    """This CPU's units that compute bf16 natively, as PyTorch finds them: ``AVX512-BF16``,
    ``AMX``, both or neither."""
    probes = (("_is_avx512_bf16_supported", "AVX512-BF16"), ("_is_amx_tile_supported", "AMX"))
    return [unit for name, unit in probes if getattr(torch.cpu, name, lambda: False)()]


def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where autocast pays.

    Elsewhere PyTorch emulates bf16 on the CPU, which is slower than float32.
    """
    return bool(cpu_bf16_units())


def precision(device: torch.device, enabled: bool) -> str:
    """What the networks compute in here, for logs and metrics.json: ``bfloat16``,
    ``float16`` (mixed precision, :func:`amp_dtype`) or ``float32``."""
    return str(amp_dtype(device, enabled) or torch.float32).removeprefix("torch.")


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The dtype mixed precision computes in here, or None where it is off: on CUDA bf16
    where supported, else fp16; on a CPU with native bf16 (:func:`cpu_bf16`) bf16."""
    if enabled and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if enabled and device.type == "cpu" and cpu_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, enabled: bool):
    """Autocast to :func:`amp_dtype`; a no-op where that is None."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def setup_distributed(device: torch.device) -> torch.device:
    """Join the process group that torchrun describes (``WORLD_SIZE`` > 1); a no-op otherwise.

    NCCL on GPUs (each rank on ``cuda:LOCAL_RANK``), gloo on CPUs.

    Returns:
        The device this rank trains on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    log.info(
        "distributed: rank %d of %d on %s",
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        device,
    )
    return device


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def in_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``x`` contiguous in ``memory_format`` where that applies (images, 4-D); a batch of raw
    windows (3-D) has no channels-last form and is made contiguous as it is."""
    if x.dim() == 4:
        return x.contiguous(memory_format=memory_format)
    return x.contiguous()


def reading_workers(workers: int | str, *, key: str) -> int:
    """``key`` (``predict.workers``, ``data.workers``): a count of processes that read files
    ahead of the model, or ``auto``: the cores beyond two, at most 8.

    The model's own threads use two cores; on a 2-core machine reading in the
    main process is fastest (measured), on larger ones worker processes read
    ahead of the model.

    Raises:
        ConfigError: neither auto nor a whole number 0 or above.
    """
    if workers == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(0, min(8, (cores or 1) - 2))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(
            f"{key}={workers!r} must be auto or a whole number of reading processes "
            "(0: read in the main process)"
        )
    return workers


def _memory_cgroup() -> tuple[str, str, str] | None:
    """(limit file, usage file, reclaimable page-cache field) of this process's memory
    cgroup, v1 or v2, or None where there is none to read."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for _, controllers, path in lines:
        if "memory" in controllers.split(","):  # v1
            folder = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
            return (
                os.path.join(folder, "memory.limit_in_bytes"),
                os.path.join(folder, "memory.usage_in_bytes"),
                "total_inactive_file",
            )
    for _, controllers, path in lines:
        if controllers == "":  # v2's unified hierarchy
            folder = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
            return (
                os.path.join(folder, "memory.max"),
                os.path.join(folder, "memory.current"),
                "inactive_file",
            )
    return None


def available_memory() -> int:
    """Bytes this process can still allocate: the kernel's ``MemAvailable``, or less where
    its memory cgroup (v1 or v2) allows less: the limit minus the usage, the page cache the
    cgroup can reclaim counted as free."""
    with open("/proc/meminfo", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f)
    free = int(fields["MemAvailable"].split()[0]) * 1024
    files = _memory_cgroup()
    if files is None:
        return free
    limit_file, usage_file, reclaimable = files
    try:
        with open(limit_file, encoding="ascii") as f:
            limit = f.read().strip()
        with open(usage_file, encoding="ascii") as f:
            usage = int(f.read())
        with open(os.path.join(os.path.dirname(usage_file), "memory.stat"), encoding="ascii") as f:
            stat = dict(line.split() for line in f if line.strip())
    except (OSError, ValueError):
        return free
    if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's 2**63 rounded: no limit
        free = min(free, int(limit) - usage + int(stat.get(reclaimable, 0)))
    return max(free, 0)
