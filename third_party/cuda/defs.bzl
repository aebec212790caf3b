"""cuda_library: compiles .cu files with nvcc (from /usr/local/cuda) and wraps them in a cc_library."""

# Architectures we ship: Hopper machine code (sm_90a, for wgmma/TMA) plus compute_90 PTX that the
# driver can JIT for newer GPUs. Keep this list short: every entry multiplies CI's compile time.
CUDA_GENCODE = [
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]

NVCC = "/usr/local/cuda/bin/nvcc"

def cuda_library(name, srcs, hdrs = [], deps = [], cuda_hdrs = [], copts = [], **kwargs):
    """A cc_library whose .cu sources are compiled by nvcc.

    Args:
      name: target name.
      srcs: .cu files (compiled by nvcc) and any .cc/.h files (compiled by the C++ toolchain).
      hdrs: public headers.
      deps: cc_library deps of the wrapping library (link and C++ headers).
      cuda_hdrs: headers the .cu files include (labels or filegroups); they must be listed so that
        nvcc sees them in Bazel's sandbox and edits to them trigger a rebuild.
      copts: extra nvcc flags.
    """
    cu_srcs = [s for s in srcs if s.endswith(".cu")]
    other_srcs = [s for s in srcs if not s.endswith(".cu")]
    objs = []
    for src in cu_srcs:
        obj = name + "_" + src.replace("/", "_")[:-3] + ".o"
        native.genrule(
            name = obj.replace(".", "_") + "_nvcc",
            srcs = [src] + hdrs + cuda_hdrs,
            outs = [obj],
            cmd = " ".join([
                NVCC,
                "-c $(location " + src + ")",
                "-o $@",
                "-I. -I$(GENDIR) -I$(BINDIR)",
                "-std=c++17 -O3 -lineinfo",
                "--expt-relaxed-constexpr",
                "-Xcompiler -fPIC -Xcompiler -Wall",
                "-DNDEBUG",
            ] + CUDA_GENCODE + copts),
            message = "nvcc " + src,
        )
        objs.append(obj)
    native.cc_library(
        name = name,
        srcs = objs + other_srcs,
        hdrs = hdrs,
        deps = deps + ["@cuda//:cudart"],
        alwayslink = True,
        **kwargs
    )
