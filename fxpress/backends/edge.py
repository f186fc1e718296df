"""Run aarch64 artifacts on an x86 host: TVM's aarch64 runtime under qemu-aarch64.

``fxpress.compile(graph, "aarch64")`` writes the library as a tar of aarch64
objects.  :func:`run_under_qemu` runs a saved artifact (or a CompiledModel,
saved to a temporary folder first) the way a board would:

1. the tar's objects are linked into ``model.so`` with ``aarch64-linux-gnu-g++``;
2. ``tvm_run`` (:data:`HARNESS`, C++ on tvm-ffi's API, built once per source, compiler and
   runtime and cached under ``$FXPRESS_CACHE/edge``) loads it with TVM's aarch64 runtime,
   starts the Relax VM on the CPU, calls ``main_transform_params`` on the parameters (in the
   manifest's ``param_names`` order) and ``main(*inputs, *weights)``, as
   :class:`fxpress.backends.tvm.build.TVMExecutable` does on the host;
3. tensors cross as raw files (:func:`write_tensors`): ``FXT1``, a uint32 count, then per tensor
   the DLPack dtype (uint8 code, uint8 bits, uint16 lanes), uint32 ndim, int64 shape, uint64
   byte count and the bytes, little-endian.

The runtime is the ``libtvm_runtime.so`` / ``libtvm_ffi.so`` of the aarch64 wheels of the
installed apache-tvm / apache-tvm-ffi versions, unpacked by ``scripts/fetch_aarch64_runtime.sh``
into ``$FXPRESS_CACHE/aarch64-runtime`` (a set-up step: nothing is downloaded here).
:func:`edge_tools` says what is present; anything missing is an :class:`EdgeError` naming it and the
command that installs it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxpress.errors import FxpressError
from fxpress.utils.cache import cache_root

log = logging.getLogger(__name__)

TRIPLE = "aarch64-linux-gnu"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_ffi.so")
FETCH_SCRIPT = "scripts/fetch_aarch64_runtime.sh"
INSTALL_TOOLCHAIN = "apt-get install g++-aarch64-linux-gnu qemu-user"
MAGIC = b"FXT1"


class EdgeError(FxpressError):
    """An aarch64 artifact cannot run under emulation here: a tool is missing, or the run failed."""


def runtime_dir() -> Path:
    """Where scripts/fetch_aarch64_runtime.sh unpacks TVM's aarch64 runtime."""
    return cache_root() / "aarch64-runtime"


def wanted_runtime_version() -> str:
    """The VERSION line the runtime must carry: the apache-tvm and apache-tvm-ffi installed here."""
    from importlib.metadata import version

    return f"apache-tvm=={version('apache-tvm')} apache-tvm-ffi=={version('apache-tvm-ffi')}"


@dataclass(frozen=True)
class EdgeTools:
    """What running aarch64 code here needs; None where it is missing."""

    cxx: str | None  # aarch64-linux-gnu-g++
    qemu: str | None  # qemu-aarch64
    sysroot: Path | None  # the aarch64 glibc and libstdc++ (qemu -L)
    runtime: Path | None  # TVM's aarch64 runtime libraries, matching the installed TVM
    problems: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return not self.problems

    def explain(self) -> str:
        """One line: what is missing and the commands that install it (the tests' skip message)."""
        return "; ".join(self.problems)


def edge_tools() -> EdgeTools:
    """Look for the cross compiler, qemu-aarch64, the aarch64 sysroot and the runtime (no side effects)."""
    cxx = shutil.which(os.environ.get("FXPRESS_AARCH64_CXX", f"{TRIPLE}-g++"))
    qemu = shutil.which(os.environ.get("FXPRESS_QEMU_AARCH64", "qemu-aarch64"))
    sysroot = Path(os.environ.get("FXPRESS_AARCH64_SYSROOT", f"/usr/{TRIPLE}"))
    problems = []
    if cxx is None:
        problems.append(f"no {TRIPLE}-g++ on PATH (install: `{INSTALL_TOOLCHAIN}`)")
    if qemu is None:
        problems.append(f"no qemu-aarch64 on PATH (install: `{INSTALL_TOOLCHAIN}`)")
    if not (sysroot / "lib" / "libc.so.6").is_file():
        problems.append(f"no aarch64 sysroot at {sysroot} (install: `{INSTALL_TOOLCHAIN}`, "
                        f"or set FXPRESS_AARCH64_SYSROOT)")
        sysroot = None
    folder = runtime_dir()
    runtime: Path | None = folder
    absent = [name for name in RUNTIME_LIBS if not (folder / name).is_file()]
    if absent:
        problems.append(f"TVM's aarch64 runtime is not in {folder} (lacks {', '.join(absent)}; "
                        f"fetch it once with `{FETCH_SCRIPT}`)")
        runtime = None
    else:
        recorded = (folder / "VERSION").read_text().strip() if (folder / "VERSION").is_file() else "(unrecorded)"
        wanted = wanted_runtime_version()
        if recorded != wanted:
            problems.append(f"TVM's aarch64 runtime in {folder} is {recorded}, the compiler here is {wanted} "
                            f"(refetch it with `{FETCH_SCRIPT}`)")
            runtime = None
    return EdgeTools(cxx, qemu, sysroot, runtime, tuple(problems))


def require_edge_tools() -> EdgeTools:
    tools = edge_tools()
    if not tools.ready:
        raise EdgeError(f"cannot run aarch64 code under emulation: {tools.explain()}")
    return tools


# -- the harness -----------------------------------------------------------------------------------
HARNESS = r"""
// tvm_run (fxpress.backends.edge): run a Relax VM library on tensors read from FXT1 files.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

const char kMagic[4] = {'F', 'X', 'T', '1'};

struct AlignedAlloc {  // 64 bytes, as TVM's own allocator: compiled kernels may assume it
  void AllocData(DLTensor* t) {
    size_t bytes = ffi::GetDataSize(*t);
    void* ptr = nullptr;
    if (posix_memalign(&ptr, 64, bytes ? bytes : 1) != 0) throw std::bad_alloc();
    t->data = ptr;
  }
  void FreeData(DLTensor* t) { free(t->data); }
};

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "tvm_run: %s\n", message.c_str());
  std::exit(2);
}

void read_exact(FILE* f, void* out, size_t bytes, const char* path) {
  if (bytes && std::fread(out, 1, bytes, f) != bytes) fail(std::string("truncated tensor file ") + path);
}

std::vector<ffi::Tensor> read_tensors(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) fail(std::string("cannot open ") + path);
  char magic[4];
  uint32_t count = 0;
  read_exact(f, magic, 4, path);
  if (std::memcmp(magic, kMagic, 4) != 0) fail(std::string("not an FXT1 tensor file: ") + path);
  read_exact(f, &count, 4, path);
  std::vector<ffi::Tensor> tensors;
  for (uint32_t i = 0; i < count; ++i) {
    uint8_t code = 0, bits = 0;
    uint16_t lanes = 0;
    uint32_t ndim = 0;
    uint64_t nbytes = 0;
    read_exact(f, &code, 1, path);
    read_exact(f, &bits, 1, path);
    read_exact(f, &lanes, 2, path);
    read_exact(f, &ndim, 4, path);
    std::vector<int64_t> shape(ndim);
    read_exact(f, shape.data(), sizeof(int64_t) * ndim, path);
    read_exact(f, &nbytes, 8, path);
    DLDataType dtype{code, bits, lanes};
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape), dtype, DLDevice{kDLCPU, 0});
    if (ffi::GetDataSize(*t.GetDLTensorPtr()) != nbytes) fail(std::string("byte count mismatch in ") + path);
    read_exact(f, t.data_ptr(), nbytes, path);
    tensors.push_back(t);
  }
  std::fclose(f);
  return tensors;
}

void write_tensors(const char* path, const std::vector<ffi::Tensor>& tensors) {
  FILE* f = std::fopen(path, "wb");
  if (!f) fail(std::string("cannot write ") + path);
  uint32_t count = static_cast<uint32_t>(tensors.size());
  std::fwrite(kMagic, 1, 4, f);
  std::fwrite(&count, 4, 1, f);
  for (const ffi::Tensor& t : tensors) {
    const DLTensor* dl = t.GetDLTensorPtr();
    if (dl->device.device_type != kDLCPU || !ffi::IsContiguous(*dl)) fail("an output is not a contiguous CPU tensor");
    uint32_t ndim = static_cast<uint32_t>(dl->ndim);
    uint64_t nbytes = ffi::GetDataSize(*dl);
    std::fwrite(&dl->dtype.code, 1, 1, f);
    std::fwrite(&dl->dtype.bits, 1, 1, f);
    std::fwrite(&dl->dtype.lanes, 2, 1, f);
    std::fwrite(&ndim, 4, 1, f);
    std::fwrite(dl->shape, sizeof(int64_t), ndim, f);
    std::fwrite(&nbytes, 8, 1, f);
    std::fwrite(static_cast<const char*>(dl->data) + dl->byte_offset, 1, nbytes, f);
  }
  if (std::fclose(f) != 0) fail(std::string("cannot write ") + path);
}

// One level, as fxpress's TVMExecutable does on the host: a tensor, or a tuple of tensors.
std::vector<ffi::Tensor> flatten(const ffi::Any& result) {
  std::vector<ffi::Tensor> out;
  if (auto t = result.as<ffi::Tensor>()) {
    out.push_back(*t);
  } else {
    for (const ffi::Any& item : result.cast<ffi::Array<ffi::Any>>()) out.push_back(item.cast<ffi::Tensor>());
  }
  return out;
}

ffi::Optional<ffi::Function> vm_function(const ffi::Module& vm, const char* name) {
  try {
    return vm->GetFunction(name, false);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) fail("usage: tvm_run LIBRARY.so PARAMS.fxt INPUTS.fxt OUTPUTS.fxt [REPEAT]");
  int repeat = argc > 5 ? std::atoi(argv[5]) : 1;
  try {
    auto t0 = std::chrono::steady_clock::now();
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    auto load = lib->GetFunction("vm_load_executable", true);
    if (!load.has_value()) fail(std::string(argv[1]) + " is not a Relax VM library (no vm_load_executable)");
    ffi::Module vm = (*load)().cast<ffi::Module>();
    // (device type, device id, allocator) for the CPU; 2 = pooled, relax.VirtualMachine's default.
    vm->GetFunction("vm_initialization", false).value()(static_cast<int>(kDLCPU), 0, 2);
    std::vector<ffi::Tensor> params = read_tensors(argv[2]);
    std::vector<ffi::Tensor> inputs = read_tensors(argv[3]);
    std::vector<ffi::Any> weights;
    auto transform = vm_function(vm, "main_transform_params");
    if (!params.empty() && transform.has_value()) {
      ffi::Array<ffi::Tensor> raw(params.begin(), params.end());
      for (const ffi::Any& w : (*transform)(raw).cast<ffi::Array<ffi::Any>>()) weights.push_back(w);
    } else {
      for (const ffi::Tensor& p : params) weights.push_back(p);
    }
    auto main_fn = vm_function(vm, "main");
    if (!main_fn.has_value()) fail(std::string(argv[1]) + " has no function main");
    std::vector<ffi::AnyView> args;
    for (const ffi::Tensor& x : inputs) args.push_back(x);
    for (const ffi::Any& w : weights) args.push_back(w);
    double setup_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    ffi::Any result;
    double best = 1e300;
    for (int i = 0; i < (repeat > 0 ? repeat : 1); ++i) {
      auto start = std::chrono::steady_clock::now();
      main_fn.value().CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      if (ms < best) best = ms;
    }
    write_tensors(argv[4], flatten(result));
    std::fprintf(stderr, "tvm_run: setup_ms=%.3f main_ms=%.3f\n", setup_ms, best);
  } catch (const std::exception& err) {
    fail(err.what());
  }
  return 0;
}
"""


def _run(command: list[str], what: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise EdgeError(f"{what} took over {timeout:.0f} s: {' '.join(command[:3])} ...") from err
    except OSError as err:
        raise EdgeError(f"{what}: cannot start {command[0]}: {err}") from err
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]  # a compiler's first error, else the last line
        raise EdgeError(f"{what} failed (exit {done.returncode}): "
                        f"{(errors[0] if errors else lines[-1] if lines else '')[:500]}")
    return done


def _include_dir() -> Path:
    import tvm_ffi.libinfo

    return Path(tvm_ffi.libinfo.find_include_path())


def aarch64_runner(tools: EdgeTools | None = None) -> Path:
    """The aarch64 ``tvm_run`` executable, built on first use (cached by source, compiler and runtime)."""
    tools = tools or require_edge_tools()
    version = _run([tools.cxx, "--version"], f"{TRIPLE}-g++ --version", 60).stdout.splitlines()[0]
    key = hashlib.sha256("\n".join([HARNESS, version, wanted_runtime_version()]).encode()).hexdigest()[:16]
    target = cache_root() / "edge" / f"tvm_run-{key}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source = Path(work) / "tvm_run.cc"
        source.write_text(HARNESS)
        built = Path(work) / "tvm_run"
        start = time.perf_counter()
        # --no-as-needed: nothing refers to libtvm_runtime by name, but loading it registers the VM.
        _run([tools.cxx, "-std=c++17", "-O2", f"-I{_include_dir()}", "-o", str(built), str(source),
              f"-L{tools.runtime}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_runtime_extra", "-ltvm_ffi"],
             f"building the aarch64 harness with {TRIPLE}-g++", 600)
        os.replace(built, target)
    log.info("built %s in %.1f s", target, time.perf_counter() - start)
    return target


def link_library(folder: Path, library: str, out: Path, tools: EdgeTools) -> Path:
    """The artifact's library as an aarch64 shared object: a tar of objects is linked into `out`."""
    path = folder / library
    if library.endswith(".so"):
        return path
    if not library.endswith(".tar"):
        raise EdgeError(f"{path}: an aarch64 library is a .tar of objects or a .so, not {library!r}")
    objects = out.parent / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            if member.isfile() and Path(member.name).name == member.name:  # flat, as export_library writes it
                (objects / member.name).write_bytes(archive.extractfile(member).read())
    _run([tools.cxx, "-shared", "-fPIC", "-o", str(out), *sorted(str(p) for p in objects.iterdir())],
         f"linking {path} for aarch64", 300)
    return out


# -- tensors as files ------------------------------------------------------------------------------
_DLPACK = {torch.float32: (2, 32), torch.float16: (2, 16), torch.float64: (2, 64), torch.bfloat16: (4, 16),
           torch.int8: (0, 8), torch.int16: (0, 16), torch.int32: (0, 32), torch.int64: (0, 64),
           torch.uint8: (1, 8), torch.uint16: (1, 16), torch.uint32: (1, 32), torch.uint64: (1, 64),
           torch.bool: (6, 8)}
_TORCH = {code: dtype for dtype, code in _DLPACK.items()} | {(1, 1): torch.bool}


def write_tensors(path: Path, tensors: list[torch.Tensor]) -> None:
    """Write `tensors` in the harness's FXT1 format."""
    with open(path, "wb") as handle:
        handle.write(MAGIC + struct.pack("<I", len(tensors)))
        for tensor in tensors:
            tensor = tensor.detach().cpu().contiguous()
            if tensor.dtype not in _DLPACK:
                raise EdgeError(f"cannot pass a {tensor.dtype} tensor to the aarch64 harness")
            code, bits = _DLPACK[tensor.dtype]
            data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            handle.write(struct.pack("<BBHI", code, bits, 1, tensor.dim()))
            handle.write(struct.pack(f"<{tensor.dim()}q", *tensor.shape))
            handle.write(struct.pack("<Q", len(data)))
            handle.write(data)


def read_tensors(path: Path) -> list[torch.Tensor]:
    """Read an FXT1 file (what the harness writes)."""
    blob = path.read_bytes()
    if blob[:4] != MAGIC:
        raise EdgeError(f"{path} is not an FXT1 tensor file")
    (count,), offset = struct.unpack_from("<I", blob, 4), 8
    tensors = []
    for _ in range(count):
        code, bits, lanes, ndim = struct.unpack_from("<BBHI", blob, offset)
        offset += 8
        shape = struct.unpack_from(f"<{ndim}q", blob, offset)
        offset += 8 * ndim
        (nbytes,) = struct.unpack_from("<Q", blob, offset)
        offset += 8
        dtype = _TORCH.get((code, bits)) if lanes == 1 else None
        if dtype is None:
            raise EdgeError(f"{path}: an output has DLPack dtype (code {code}, bits {bits}, lanes {lanes}), "
                            f"which fxpress does not read")
        data = bytearray(blob[offset:offset + nbytes])
        offset += nbytes
        flat = torch.frombuffer(data, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors.append(flat.view(dtype).reshape(shape))
    return tensors


# -- running ---------------------------------------------------------------------------------------
@dataclass
class EdgeRun:
    """Outputs of one emulated run; `main_ms` is the best of `repeat` calls of main inside qemu, `setup_ms`
    loading the library and transforming the parameters, `wall_s` the whole qemu process."""

    outputs: list[torch.Tensor]
    main_ms: float
    setup_ms: float
    wall_s: float


def _artifact_folder(artifact: Any, work: Path) -> Path:
    from fxpress.backends.artifact import CompiledModel

    if isinstance(artifact, CompiledModel):
        if artifact.target != "aarch64":
            raise EdgeError(f"{artifact.name} was compiled for {artifact.target}, not aarch64")
        return artifact.save(work / "artifact")
    return Path(artifact)


def run_edge(artifact: Any, inputs: tuple | list, *, repeat: int = 1, threads: int = 1,
             timeout: float = 900) -> EdgeRun:
    """Run an aarch64 artifact (a saved folder or a CompiledModel) under qemu-aarch64 on `inputs` (the
    model's arguments, as for ``compiled(*inputs)``); outputs are the flat output tensors."""
    from fxpress.backends.artifact import PARAMS
    from fxpress.backends.artifact_check import read_manifest, read_params, verify_files
    from fxpress.backends.signature import TensorSpec, check_inputs
    from fxpress.backends.structure import IOStructure

    tools = require_edge_tools()
    runner = aarch64_runner(tools)
    with tempfile.TemporaryDirectory(prefix="fxpress-edge-") as tmp:
        work = Path(tmp)
        folder = _artifact_folder(artifact, work)
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        if manifest["target"] != "aarch64":
            raise EdgeError(f"{folder} was compiled for {manifest['target']}, not aarch64")
        names = list(manifest["param_names"])
        params = read_params(folder / PARAMS, names)
        specs = [TensorSpec.from_json(record) for record in manifest["inputs"]]
        tensors = tuple(inputs)
        if "structure" in manifest:
            tensors = IOStructure.from_json(manifest["structure"]).flatten(tensors)
        check_inputs(specs, tensors)
        library = link_library(folder, manifest["library"], work / "model.so", tools)
        write_tensors(work / "params.fxt", [torch.from_numpy(params[name]) for name in names])
        write_tensors(work / "inputs.fxt", list(tensors))
        command = [tools.qemu, "-L", str(tools.sysroot), "-E", f"LD_LIBRARY_PATH={tools.runtime}",
                   "-E", f"TVM_NUM_THREADS={int(threads)}", str(runner), str(library), str(work / "params.fxt"),
                   str(work / "inputs.fxt"), str(work / "outputs.fxt"), str(int(repeat))]
        start = time.perf_counter()
        done = _run(command, f"running {folder.name} under qemu-aarch64", timeout)
        wall = time.perf_counter() - start
        outputs = read_tensors(work / "outputs.fxt")
    found = re.search(r"setup_ms=([0-9.]+) main_ms=([0-9.]+)", done.stderr)
    setup_ms, main_ms = (float(found.group(1)), float(found.group(2))) if found else (float("nan"),) * 2
    log.info("ran %s under qemu-aarch64: main %.1f ms (best of %d), set-up %.1f ms, %.1f s in all",
             manifest.get("name", folder.name), main_ms, repeat, setup_ms, wall)
    return EdgeRun(outputs, main_ms, setup_ms, wall)


def run_under_qemu(artifact: Any, inputs: tuple | list, **options: Any) -> list[torch.Tensor]:
    """The output tensors of an aarch64 artifact run under qemu-aarch64 (see :func:`run_edge`)."""
    return run_edge(artifact, inputs, **options).outputs
