"""Builds the C++ core (and the CUDA module when allowed) through CMake, cmake_example style."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def cmake_command() -> str:
    """The cmake of the build requirements (pip's `cmake` package, >= 3.26) where it is installed,
    else the one on PATH: without build isolation and with the environment not activated, PATH
    can hold an older system cmake that refuses the project."""
    try:
        import cmake

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    return "cmake"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if os.environ.get("EMBGEOM_DEBUG") else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DEMBGEOM_CUDA={os.environ.get('EMBGEOM_CUDA', 'auto')}",
        ]
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        args += os.environ.get("CMAKE_ARGS", "").split()  # e.g. -DCMAKE_CUDA_ARCHITECTURES=80
        # MAX_JOBS, else CMake's own CMAKE_BUILD_PARALLEL_LEVEL (an explicit -j overrides it), else 2
        jobs = os.environ.get("MAX_JOBS") or os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or "2"
        cmake = cmake_command()
        subprocess.run([cmake, str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "-j", jobs], cwd=build_temp, check=True)

    def copy_extensions_to_source(self) -> None:
        # editable installs copy only declared extensions; _cuda comes from the same CMake run
        super().copy_extensions_to_source()
        import shutil

        built = Path(self.build_lib) / "embgeom"
        for module in built.glob("_cuda*.so"):
            shutil.copy2(module, ROOT / "python" / "embgeom" / module.name)


setup(
    ext_modules=[CMakeExtension("embgeom._C")],
    cmdclass={"build_ext": CMakeBuild},
    # every subpackage of python/embgeom (engine, backends, analysis, report, ...) and the kernels
    packages=find_packages("python") + ["embgeom.kernels", "embgeom.kernels.triton", "embgeom.kernels.cuda"],
    package_dir={"": "python", "embgeom.kernels": "kernels"},
    package_data={"embgeom": ["py.typed"], "embgeom.kernels.cuda": ["*.cu", "*.cuh"],
                  "embgeom.data": ["*.txt", "*.jsonl", "*.conllu"]},
    zip_safe=False,
)
