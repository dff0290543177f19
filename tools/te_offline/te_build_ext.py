"""Build transformer_engine_torch (TE's torch extension: C++ only, no .cu, ~30 files) with setuptools and torch's
BuildExtension, bypassing TE's setup.py (which tries to download a prebuilt wheel). CUDA headers come from the
nvidia-* wheels torch depends on.
usage: python te_build_ext.py SRC_DIR OUT_DIR [PY_INC_FALLBACK]"""
import glob, os, pathlib, sys, sysconfig
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
import nvidia  # namespace pkg from the nvidia-* wheels torch depends on

src, out = sys.argv[1], sys.argv[2]
incs = []
for root in map(pathlib.Path, nvidia.__path__):            # nvidia/cu13/include, nvidia/cudnn/include, nvidia/nccl/include ...
    for d in sorted(root.iterdir()):
        if (d / "include").is_dir():
            incs.append(str(d / "include"))
incs += [f"{src}/common_headers", f"{src}/common_headers/common",
         f"{src}/common_headers/common/include", f"{src}/csrc"]
if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
    assert len(sys.argv) > 3, "Python.h missing and no fallback include dir given"
    incs.append(sys.argv[3])
sources = sorted(glob.glob(f"{src}/csrc/**/*.cpp", recursive=True))
print(len(sources), "sources;", "include dirs:", *incs, sep="\n  ")
sys.argv = [sys.argv[0], "build_ext", "--build-lib", out, "--build-temp", out + "/tmp"]
setup(name="transformer_engine_torch",
      ext_modules=[CppExtension("transformer_engine_torch", sources, include_dirs=incs,
                                extra_compile_args={"cxx": ["-O3", "-fvisibility=hidden", "-g0"]})],
      cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
