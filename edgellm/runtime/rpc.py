"""llama.cpp's RPC backend (ggml-rpc): the bindings llama-cpp-python 0.3.36 lacks, and a safe check first.

A worker (`edgellm worker`, or llama.cpp's own `rpc-server`) offers its devices over TCP; a model loaded
with those devices places layers on them as on extra GPUs. The vendored client calls GGML_ABORT, which
ends the whole process, when a server cannot be reached, fails its handshake or answers malformed. So
every endpoint is checked here first, in Python, with the same protocol (HELLO, device count, device
memory), before llama.cpp is given it. A worker serves one client at a time: a busy one does not answer
the HELLO, and the check's timeout says so.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import llama_cpp as C

from edgellm.errors import EdgeLLMError

PROTO_MAJOR, PROTO_MINOR = 7, 0  # vendored ggml-rpc.h: RPC_PROTO_MAJOR_VERSION / MINOR
CMD_GET_DEVICE_MEMORY, CMD_HELLO, CMD_DEVICE_COUNT = 11, 14, 15  # ggml-rpc.cpp's enum rpc_cmd
CAPS_SIZE = 24  # transport.h RPC_CONN_CAPS_SIZE: all zero asks for plain TCP
DEFAULT_PORT = 50052


class RpcError(EdgeLLMError):
    """A worker named with --rpc cannot be used."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Device:
    endpoint: Endpoint
    index: int
    free: int
    total: int


def parse_endpoints(text: str) -> list[Endpoint]:
    """`HOST:PORT[,HOST:PORT]` (the form of llama.cpp's --rpc), each checked before anything connects."""
    out: list[Endpoint] = []
    for part in (p.strip() for p in text.split(",")):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RpcError(f"--rpc: {part!r} is not HOST:PORT (a port 1-65535)")
        if any(c.isspace() for c in host):
            raise RpcError(f"--rpc: {part!r} has a space in its host")
        endpoint = Endpoint(host, int(port))
        if endpoint in out:
            raise RpcError(f"--rpc: {endpoint} is named twice")
        out.append(endpoint)
    return out


class _Conn:
    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint = endpoint
        try:
            self.sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        except OSError as e:
            raise RpcError(f"worker {endpoint} is unreachable: {e.strerror or e}") from None

    def call(self, cmd: int, payload: bytes, answer: int) -> bytes:
        try:
            self.sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
            size = struct.unpack("<Q", self._recv(8))[0]
            if size != answer:
                raise RpcError(f"worker {self.endpoint} answered a malformed message (not llama.cpp's RPC "
                               f"protocol {PROTO_MAJOR}.x)")
            return self._recv(size)
        except TimeoutError:
            raise RpcError(f"worker {self.endpoint} did not answer (busy with another client, or not a worker)") \
                from None
        except OSError as e:
            raise RpcError(f"worker {self.endpoint} closed the connection: {e.strerror or e}") from None

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RpcError(f"worker {self.endpoint} closed the connection mid-answer")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def check(endpoint: Endpoint, timeout: float = 5.0) -> list[Device]:
    """Connect, shake hands and read each device's memory, as llama.cpp's client would, without its abort."""
    conn = _Conn(endpoint, timeout)
    try:
        hello = conn.call(CMD_HELLO, bytes(CAPS_SIZE), 4 + CAPS_SIZE)
        major, minor, patch = hello[0], hello[1], hello[2]
        if major != PROTO_MAJOR or minor > PROTO_MINOR:
            raise RpcError(f"worker {endpoint} speaks RPC protocol {major}.{minor}.{patch}; this build speaks "
                           f"{PROTO_MAJOR}.{PROTO_MINOR}: run the same llama.cpp on both")
        (count,) = struct.unpack("<I", conn.call(CMD_DEVICE_COUNT, b"", 4))
        devices = []
        for i in range(count):
            free, total = struct.unpack("<QQ", conn.call(CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16))
            devices.append(Device(endpoint, i, free, total))
    finally:
        conn.close()
    if not devices:
        raise RpcError(f"worker {endpoint} offers no device")
    return devices


# -- the C side ------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL, ctypes.CDLL]:
    """(ggml-base: devices; ggml: the device registry; ggml-rpc), from llama-cpp-python's own lib folder."""
    lib_dir = Path(C.__file__).resolve().parent / "lib"
    try:
        base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
        registry = ctypes.CDLL(str(lib_dir / "libggml.so"))
        rpc = ctypes.CDLL(str(lib_dir / "libggml-rpc.so"))
    except OSError:
        raise RpcError("this llama.cpp build has no RPC backend: rebuild with `make setup` (GGML_RPC)") from None
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    rpc.ggml_backend_rpc_add_server.argtypes, rpc.ggml_backend_rpc_add_server.restype = [cp], vp
    rpc.ggml_backend_rpc_start_server.argtypes = [cp, cp, sz, sz, ctypes.POINTER(vp)]
    rpc.ggml_backend_rpc_start_server.restype = None
    base.ggml_backend_reg_dev_count.argtypes, base.ggml_backend_reg_dev_count.restype = [vp], sz
    base.ggml_backend_reg_dev_get.argtypes, base.ggml_backend_reg_dev_get.restype = [vp, sz], vp
    registry.ggml_backend_dev_count.argtypes, registry.ggml_backend_dev_count.restype = [], sz
    registry.ggml_backend_dev_get.argtypes, registry.ggml_backend_dev_get.restype = [sz], vp
    base.ggml_backend_dev_type.argtypes, base.ggml_backend_dev_type.restype = [vp], ctypes.c_int
    base.ggml_backend_dev_name.argtypes, base.ggml_backend_dev_name.restype = [vp], cp
    base.ggml_backend_dev_memory.argtypes = [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]
    base.ggml_backend_dev_memory.restype = None
    return base, registry, rpc


_connected: dict[Endpoint, list[int]] = {}  # workers llama.cpp holds a connection to in this process: their devices


def devices_of(endpoints: list[Endpoint], timeout: float = 5.0) -> list[int]:
    """llama.cpp's device handles for the workers' devices, each endpoint checked first (see the docstring).

    A worker this process already uses is not checked again: it serves one client at a time, and that client
    is llama.cpp's connection in this process."""
    for endpoint in endpoints:
        if endpoint not in _connected:
            check(endpoint, timeout)
    base, _, rpc = _libs()
    handles: list[int] = []
    for endpoint in endpoints:
        if endpoint not in _connected:
            reg = rpc.ggml_backend_rpc_add_server(str(endpoint).encode())
            if not reg:
                raise RpcError(f"worker {endpoint} offers no device")
            _connected[endpoint] = [base.ggml_backend_reg_dev_get(reg, i)
                                    for i in range(base.ggml_backend_reg_dev_count(reg))]
        handles += _connected[endpoint]
    return handles


def free_memory(endpoints: list[Endpoint], timeout: float = 5.0) -> int:
    """The workers' free memory in bytes: over llama.cpp's connection where this process has one, else checked."""
    total = 0
    for endpoint in endpoints:
        if endpoint in _connected:
            base = _libs()[0]
            for dev in _connected[endpoint]:
                free, size = ctypes.c_size_t(), ctypes.c_size_t()
                base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(size))
                total += free.value
        else:
            total += sum(d.free for d in check(endpoint, timeout))
    return total


DEVICE_TYPE_CPU, DEVICE_TYPE_GPU, DEVICE_TYPE_ACCEL = 0, 1, 2  # ggml-backend.h enum ggml_backend_dev_type


def local_devices() -> list[tuple[int, str, int, int]]:
    """This machine's devices a worker offers: its GPUs when it has any, else its CPU, as rpc-server picks
    them. (handle, name, free bytes, total bytes)."""
    from edgellm.runtime import backend

    backend.init()
    base, registry, _ = _libs()
    found: dict[int, list[tuple[int, str, int, int]]] = {}
    for i in range(registry.ggml_backend_dev_count()):
        dev = registry.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        name = base.ggml_backend_dev_name(dev).decode()
        if name.startswith("RPC"):
            continue
        found.setdefault(base.ggml_backend_dev_type(dev), []).append((dev, name, free.value, total.value))
    return found.get(DEVICE_TYPE_GPU) or found.get(DEVICE_TYPE_CPU, [])


_MEMORY_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t))
_capped: list[tuple[object, object]] = []  # the original functions and their wrappers, alive while C may call them


def cap_memory(device: int, limit: int) -> None:
    """Report at most `limit` bytes of this device's memory, free and total, from now on in this process (a
    worker's `--mem`: what its clients plan with, as rpc-server's --mem). The vendored server asks the device
    itself (ggml_backend_dev_memory) with no hook, so its `get_memory`, the third function of the device's
    interface (ggml-backend-impl.h: struct ggml_backend_device { struct ggml_backend_device_i iface; ... },
    get_name, get_description, get_memory, ...), is wrapped in place."""
    if limit <= 0:
        raise RpcError("the memory to offer must be positive")
    slot = ctypes.c_void_p.from_address(device + 2 * ctypes.sizeof(ctypes.c_void_p))
    original = _MEMORY_FN(slot.value)

    def capped(dev: int, free, total) -> None:
        original(dev, free, total)
        free[0], total[0] = min(free[0], limit), min(total[0], limit)

    wrapper = _MEMORY_FN(capped)
    _capped.append((original, wrapper))
    slot.value = ctypes.cast(wrapper, ctypes.c_void_p).value


def serve(endpoint: Endpoint, cache_dir: str | None, threads: int, devices: list[int]) -> None:
    """Run llama.cpp's RPC server on this thread; it returns only if its socket fails."""
    *_, rpc = _libs()
    array = (ctypes.c_void_p * len(devices))(*devices)
    rpc.ggml_backend_rpc_start_server(str(endpoint).encode(), cache_dir.encode() if cache_dir else None,
                                      threads, len(devices), array)
