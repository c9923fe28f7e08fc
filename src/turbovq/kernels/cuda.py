"""Runtime-compiled CUDA C++ kernels: NVRTC compiles the source for the card in use, the driver API launches it.

Why not Triton for everything: some kernels need control of the register layout of tensor-core operands (see
``decode_mma.cu``). Why NVRTC and not a C++ extension: it needs no compiler toolkit, only ``libnvrtc``, which the
CUDA builds of PyTorch install, and it compiles a kernel in about a second (cached per process and device).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

import torch

_LOCK = threading.Lock()
_MODULES: dict[tuple, ctypes.c_void_p] = {}
_FUNCTIONS: dict[tuple, ctypes.c_void_p] = {}
_LIBS: dict[str, ctypes.CDLL] = {}
_SMEM_OPT_IN: dict[int, int] = {}
_OCCUPANCY: dict[tuple, int] = {}
_WGMMA: dict[int, bool] = {}


class CudaCompileError(RuntimeError):
    """NVRTC rejected a source (the message carries its log) or the library is missing."""


def _nvrtc() -> ctypes.CDLL:
    lib = _LIBS.get("nvrtc")
    if lib is not None:
        return lib
    major = (torch.version.cuda or "12").split(".")[0]
    names = [f"libnvrtc.so.{major}", "libnvrtc.so"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            names += sorted(glob.glob(os.path.join(home, "lib*", f"libnvrtc.so.{major}*")))
    for root in sys.path:  # the pip wheels (nvidia-cuda-nvrtc*) that CUDA builds of torch depend on
        names += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", f"libnvrtc.so.{major}*")))
        names += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "lib", "libnvrtc.so*")))
    for name in names:
        try:
            lib = _LIBS["nvrtc"] = ctypes.CDLL(name)
            return lib
        except OSError:
            continue
    raise CudaCompileError(f"libnvrtc not found (tried {names[:4]}...): install the CUDA runtime compiler")


def nvrtc_available() -> bool:
    """Whether NVRTC can be loaded (the CUDA kernels can be compiled; no GPU needed)."""
    try:
        _nvrtc()
        return True
    except CudaCompileError:
        return False


def _driver() -> ctypes.CDLL:
    lib = _LIBS.get("cuda")
    if lib is None:
        lib = _LIBS["cuda"] = ctypes.CDLL("libcuda.so.1")
    return lib


def _check(res: int, what: str) -> None:
    if res != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(res, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {res} ({(msg.value or b'?').decode()})")


def compile_cubin(source: str, arch: str, options: tuple[str, ...] = ()) -> bytes:
    """Machine code (cubin) of ``source`` for ``arch`` (e.g. ``"sm_90"``); works without a GPU."""
    nv = _nvrtc()
    prog = ctypes.c_void_p()
    if nv.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None):
        raise CudaCompileError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}", "-std=c++17", "--extra-device-vectorization", *options]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    try:
        res = nv.nvrtcCompileProgram(prog, len(opts), arr)
        if res:
            size = ctypes.c_size_t()
            nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nv.nvrtcGetProgramLog(prog, log)
            raise CudaCompileError(f"NVRTC failed ({' '.join(options)}):\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        nv.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        nv.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [(k, ctypes.c_uint) for k in ("gx", "gy", "gz", "bx", "by", "bz", "smem")] + [
        ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


class Kernel:
    """One compiled ``extern "C"`` kernel taking a single struct argument (a ``ctypes.Structure``)."""

    def __init__(self, func: ctypes.c_void_p):
        self.func = func

    def __call__(self, grid: tuple[int, int, int], block: int, params: ctypes.Structure, stream: int,
                 smem: int = 0, pdl: bool = False) -> None:  # fmt: skip
        """Launch; ``smem``: bytes of dynamic shared memory; ``pdl`` (sm_90): programmatic dependent launch, the
        blocks may start before the previous kernel on the stream has finished (``griddepcontrol.wait`` in the
        kernel waits for it and its writes)."""
        self._opt_in(smem)
        args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(params), ctypes.c_void_p))
        if not pdl:
            _check(_driver().cuLaunchKernel(self.func, *grid, block, 1, 1, smem, ctypes.c_void_p(stream), args, None),
                   "cuLaunchKernel")  # fmt: skip
            return
        attr = _LaunchAttribute(6)  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value[0] = 1
        cfg = _LaunchConfig(*grid, block, 1, 1, smem, ctypes.c_void_p(stream), ctypes.pointer(attr), 1)
        _check(_driver().cuLaunchKernelEx(ctypes.byref(cfg), self.func, args, None), "cuLaunchKernelEx")

    def _opt_in(self, smem: int) -> None:
        """Dynamic shared memory past a kernel's default limit (48 KiB less its static shared memory) needs an
        opt-in; it is set once per kernel and size, for any size (harmless below the limit)."""
        if smem and _SMEM_OPT_IN.get(self.func.value, 0) < smem:
            _check(_driver().cuFuncSetAttribute(self.func, 8, smem), "cuFuncSetAttribute")  # MAX_DYNAMIC_SHARED_SIZE
            _SMEM_OPT_IN[self.func.value] = smem

    def blocks_per_sm(self, block: int, smem: int = 0) -> int:
        """How many blocks of ``block`` threads fit on one SM at once (registers, shared memory); cached."""
        key = (self.func.value, block, smem)
        n = _OCCUPANCY.get(key)
        if n is None:
            self._opt_in(smem)
            out = ctypes.c_int()
            _check(_driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(out), self.func, block,
                                                                         ctypes.c_size_t(smem)),
                   "cuOccupancyMaxActiveBlocksPerMultiprocessor")  # fmt: skip
            n = _OCCUPANCY[key] = max(1, out.value)
        return n


def enabled() -> bool:
    """The CUDA kernels are on unless ``TURBOVQ_CUDA=0`` (then the Triton ones run)."""
    return os.environ.get("TURBOVQ_CUDA", "1") != "0"


def stream(device: torch.device) -> int:
    """The current stream's handle on ``device`` (what ``torch.cuda.current_stream(device).cuda_stream`` gives,
    without building a Stream object on every launch)."""
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())


def has_wgmma(device: torch.device) -> bool:
    """Whether the card runs wgmma (sm_90, compiled as sm_90a): Hopper's warpgroup tensor-core products."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _WGMMA.get(index)
    if found is None:
        found = _WGMMA[index] = torch.cuda.get_device_capability(index) == (9, 0)
    return found


def kernel(source: str, name: str, device: torch.device, options: tuple[str, ...] = ()) -> Kernel:
    """Compile (once per process, source, options and device) and load ``name`` from ``source``; other kernels of
    the same source and options come from the same module (no second compile)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (source, options, index)  # str hashes are cached: no per-call hashing of the source
    with _LOCK:
        func = _FUNCTIONS.get(key + (name,))
        if func is None:
            module = _MODULES.get(key)
            with torch.cuda.device(index):
                torch.cuda.current_stream()  # makes the device's primary context current in this thread
                if module is None:
                    major, minor = torch.cuda.get_device_capability(index)
                    arch = f"sm_{major}{minor}" + ("a" if has_wgmma(torch.device("cuda", index)) else "")
                    cubin = compile_cubin(source, arch, options)
                    module = ctypes.c_void_p()
                    _check(_driver().cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
                    _MODULES[key] = module
                func = ctypes.c_void_p()
                _check(_driver().cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "cuModuleGetFunction")
            _FUNCTIONS[key + (name,)] = func
    return Kernel(func)
