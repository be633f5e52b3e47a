"""The few CUDA driver calls the loader needs, through ctypes on libcuda.so.1.

Why ctypes and not cuda-bindings: no extra dependency (cuda-bindings is tied to a CUDA major version and
is not installed beside every torch), and the lowest host cost per launch — with argument slots
prepared once, a ctypes `cuLaunchKernel` costs ~4 us against ~10 us through cuda.bindings.

Nothing here runs at import: `libcuda.so.1` is opened on first use, so `import fusedlora` works on a
machine with no GPU and no driver.
"""

from __future__ import annotations

import ctypes
import threading

CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class CudaDriverError(RuntimeError):
    def __init__(self, call: str, code: int, name: str):
        super().__init__(f"{call} failed: {name} ({code})")
        self.code = code
        self.call = call


class Driver:
    """ctypes bindings of libcuda. One instance per process (see `driver()`)."""

    def __init__(self, libname: str = "libcuda.so.1"):
        self.lib = ctypes.CDLL(libname)
        lib = self.lib
        # Launch goes without argtypes: ctypes converts pre-built c_void_p objects at the lowest cost.
        self.cuLaunchKernel = lib.cuLaunchKernel
        self._primary = {}

    def error_name(self, code: int) -> str:
        s = ctypes.c_char_p()
        if self.lib.cuGetErrorName(ctypes.c_int(code), ctypes.byref(s)) == 0 and s.value:
            return s.value.decode()
        return "CUDA_ERROR_UNKNOWN"

    def check(self, code: int, call: str):
        if code != 0:
            raise CudaDriverError(call, code, self.error_name(code))

    def ensure_context(self, device: int):
        """Make `device`'s primary context current on this thread if no context is current.

        torch uses the primary context; a thread that has not touched CUDA through the runtime yet has none."""
        ctx = ctypes.c_void_p()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if ctx.value:
            return
        primary = self._primary.get(device)
        if primary is None:
            dev = ctypes.c_int()
            self.check(self.lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(device)), "cuDeviceGet")
            primary = ctypes.c_void_p()
            self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(primary), dev), "cuDevicePrimaryCtxRetain")
            self._primary[device] = primary
        self.check(self.lib.cuCtxSetCurrent(primary), "cuCtxSetCurrent")

    def load_function(self, image: bytes, name: str, shared: int) -> ctypes.c_void_p:
        """Load a cubin into the current context and return the kernel's CUfunction."""
        module = ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(image)), "cuModuleLoadData")
        func = ctypes.c_void_p()
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "cuModuleGetFunction")
        if shared > 48 * 1024:
            self.check(
                self.lib.cuFuncSetAttribute(
                    func, ctypes.c_int(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), ctypes.c_int(shared)
                ),
                "cuFuncSetAttribute",
            )
        return func


_driver = None
_driver_lock = threading.Lock()


def driver() -> Driver:
    global _driver
    if _driver is None:
        with _driver_lock:
            if _driver is None:
                _driver = Driver()
    return _driver
