"""Compile every CUDA kernel of minivit/kernels with NVRTC, on a machine with or without a GPU.

    python -m minivit.kernels --compile-only            # sm_80, sm_90 and sm_100
    python -m minivit.kernels --compile-only --arch 90
    python -m minivit.kernels --compile-only --folder DIR   # the .cu sources of DIR

CuPy's own compile calls ask for a GPU first, so this goes to NVRTC itself (ctypes), found
in the nvidia-cuda-nvrtc-cu12 wheel (the "test" extra installs it), in CuPy's CUDA
toolkit, or on the library path.  One line per kernel and architecture; exit status 1 if
any source fails to compile (its compiler log follows), 2 if NVRTC cannot be found.
"""
import argparse
import ctypes
import ctypes.util
import glob
import os
import pathlib
import re
import sys

from minivit.kernels import FOLDER, OPTIONS, source as read_source

ARCHITECTURES = ("80", "90", "100")         # A100, H100/H200, B200
INSTALL = 'pip install "nvidia-cuda-nvrtc-cu12>=12.8"'


def kernel_names(source):
    """The extern "C" __global__ functions a source defines, in order."""
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', source)


def find_nvrtc():
    """The NVRTC shared library, loaded: from the NVIDIA wheel, CUDA_PATH, or the system."""
    candidates = []
    try:
        import nvidia.cuda_nvrtc
        for folder in nvidia.cuda_nvrtc.__path__:
            candidates += sorted(glob.glob(os.path.join(folder, "lib", "libnvrtc.so*")))
            candidates += sorted(glob.glob(os.path.join(folder, "bin", "nvrtc64_*.dll")))
    except ImportError:
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    system = ctypes.util.find_library("nvrtc")
    if system:
        candidates.append(system)
    errors = []
    for path in candidates:
        if ".alt." in path or "builtins" in path:
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as e:
            errors.append(f"{path}: {e}")
    detail = f" (tried: {'; '.join(errors)})" if errors else ""
    raise OSError(f"NVRTC, the CUDA runtime compiler, was not found{detail}; install it "
                  f"with: {INSTALL}")


def nvrtc_version(nvrtc):
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def compile_source(nvrtc, source, name, arch):
    """Compile `source` to a cubin for sm_<arch>; returns (cubin bytes or None, log)."""
    program = ctypes.c_void_p()
    status = nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(),
                                      0, None, None)
    if status != 0:
        return None, f"nvrtcCreateProgram failed with status {status}"
    options = [o.encode() for o in (*OPTIONS, f"--gpu-architecture=sm_{arch}")]
    try:
        status = nvrtc.nvrtcCompileProgram(program, len(options),
                                           (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        log = log.value.decode(errors="replace").strip()
        if status != 0:
            return None, log or f"nvrtcCompileProgram failed with status {status}"
        nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(program, cubin)
        return cubin.raw, log
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def compile_all(architectures=ARCHITECTURES, out=None, folder=None):
    """Compile every source in `folder` (default: minivit/kernels) for every architecture,
    printing a line per kernel to `out` (default: stdout); the number of failures."""
    out = out or sys.stdout
    nvrtc, path = find_nvrtc()
    print(f"NVRTC {nvrtc_version(nvrtc)} ({path}), options {' '.join(OPTIONS)}", file=out)
    failures = 0
    for file in sorted(pathlib.Path(folder or FOLDER).glob("*.cu")):
        source = read_source(file)
        for arch in architectures:
            cubin, log = compile_source(nvrtc, source, file.name, arch)
            for name in kernel_names(source):
                if cubin is not None and name.encode() not in cubin:
                    cubin_note = "missing from the cubin"
                    failures += 1
                elif cubin is None:
                    cubin_note = "FAILED"
                else:
                    cubin_note = f"ok ({len(cubin):,} bytes of cubin for the file)"
                print(f"{file.name:<16} {name:<28} sm_{arch:<4} {cubin_note}", file=out)
            if cubin is None:
                failures += 1
                print(log, file=out)
            elif log:
                print(f"{file.name} sm_{arch}: {log}", file=out)
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minivit.kernels",
                                     description="Compile minivit's CUDA kernels with NVRTC.")
    parser.add_argument("--compile-only", action="store_true", required=True,
                        help="compile every kernel source, run nothing (no GPU needed)")
    parser.add_argument("--arch", action="append", choices=ARCHITECTURES,
                        help="a compute capability to compile for (repeatable; default: all)")
    parser.add_argument("--folder", default=str(FOLDER),
                        help="the folder of .cu sources (default: minivit/kernels)")
    args = parser.parse_args(argv)
    try:
        failures = compile_all(args.arch or ARCHITECTURES, folder=args.folder)
    except BrokenPipeError:
        raise                      # a closed pipe (| head): cli.install ends quietly
    except OSError as e:
        print(f"python -m minivit.kernels: {e}", file=sys.stderr)
        return 2
    if failures:
        print(f"{failures} failure{'s' if failures != 1 else ''}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    from minivit import cli
    cli.install()
    sys.exit(main())
