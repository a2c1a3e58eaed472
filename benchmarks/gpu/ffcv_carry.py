"""Pack FFCV for a machine that lacks it (the lent GPU machine: Python 3.12, no compiler use, no registry).

``make ffcv-carry`` → ``.ffcv_carry/`` (git-ignored), which ``benchmarks/gpu/gpu_check.sh`` puts on ``PYTHONPATH`` and
``LD_LIBRARY_PATH``:

- ``site/ffcv/``: the installed ffcv package (pure Python; its optional imports are not needed by this project).
- ``site/ffcv/_libffcv.cpython-312-x86_64-linux-gnu.so``: ffcv's C helpers (JPEG decode, memcpy, resize) compiled
  for CPython 3.12 from ffcv's sdist when a 3.12 interpreter with headers is found here (pyenv, Debian); always
  also the installed build as ``_libffcv.so``, a suffix every CPython 3 imports. The module needs one Python symbol
  (``PyModule_Create2``, stable across 3.x): ffcv imports it only to find its file, then loads it with ctypes.
- ``lib/``: the shared libraries the extension links (``ldd``: libturbojpeg, libopencv_core/imgproc and what
  they pull in), except the C/C++ runtime every Linux has (glibc, libstdc++, libgcc_s).

The pack is checked before it is kept: the extension is loaded (import + ctypes) and called under every
interpreter found (this one, and 3.12 when present) with only ``lib/`` added to the library path.
Run: ``python -m benchmarks.gpu.ffcv_carry [--out .ffcv_carry]``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SYSTEM_LIBS = ("linux-vdso", "ld-linux", "libc.so", "libm.so", "libpthread", "libdl.so", "librt.so",
               "libstdc++", "libgcc_s")
CHECK = r"""
import ctypes, importlib.util, sys
path = sys.argv[1]
spec = importlib.util.spec_from_file_location("ffcv._libffcv", path)
importlib.util.module_from_spec(spec)  # what `import ffcv._libffcv` does first
spec.loader.exec_module(importlib.util.module_from_spec(spec))
lib = ctypes.CDLL(path)
src, dst = ctypes.create_string_buffer(b"ffcv-carry", 10), ctypes.create_string_buffer(10)
lib.my_memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
lib.my_memcpy(ctypes.addressof(src), ctypes.addressof(dst), 10)
assert dst.raw == b"ffcv-carry", dst.raw
print(f"ok: Python {sys.version.split()[0]} loads and calls {path.rsplit('/', 1)[-1]}")
"""


def linked_libraries(so: Path) -> list[Path]:
    """The shared libraries ``so`` resolves to (ldd), without the C/C++ runtime."""
    out = subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split("=>")
        if len(parts) != 2 or any(s in parts[0] for s in SYSTEM_LIBS):
            continue
        target = parts[1].split("(")[0].strip()
        if target == "not found" or not target:
            raise SystemExit(f"error: {so.name} links {parts[0].strip()}, which is not installed: make setup")
        libs.append(Path(target))
    return libs


def python312() -> str | None:
    """A CPython 3.12 with its C headers, if this machine has one."""
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    candidates = [shutil.which("python3.12"), *pyenv]
    for exe in filter(None, candidates):
        probe = subprocess.run([exe, "-c", "import sysconfig, os; p = sysconfig.get_paths()['include']; "
                                "print(p if os.path.exists(os.path.join(p, 'Python.h')) else '')"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip():
            return exe
    return None


def build_for(exe: str, version: str, dst_dir: Path) -> Path | None:
    """Compile ffcv's ``libffcv.cpp`` (from its sdist, as its setup.py does) for the interpreter ``exe``."""
    include = subprocess.run([exe, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    suffix = subprocess.run([exe, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              f"ffcv=={version}", "-d", tmp], capture_output=True, text=True)
        if got.returncode != 0:
            print(f"note: no ffcv {version} sdist ({got.stderr.strip().splitlines()[-1:]}); not building for {exe}")
            return None
        with tarfile.open(next(Path(tmp).glob("ffcv-*.tar.gz"))) as tar:
            tar.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("ffcv-*/libffcv/libffcv.cpp"))
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "opencv4", "libturbojpeg"], capture_output=True,
                               text=True, check=True).stdout.split()
        out = dst_dir / f"_libffcv{suffix}"
        subprocess.run(["g++", "-O3", "-fPIC", "-shared", f"-I{include}", str(source), "-o", str(out), *flags,
                        "-lpthread"], check=True)
    return out


def check(exe: str, so: Path, lib_dir: Path) -> None:
    """``so`` finds every library it needs in ``lib_dir`` (not in this machine's system folders), then loads and
    runs under ``exe``."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib_dir)}
    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True, env=env, check=True).stdout
    outside = [line.strip() for line in ldd.splitlines() if "=>" in line and not any(s in line for s in SYSTEM_LIBS)
               and str(lib_dir.resolve()) not in line and str(lib_dir) not in line]
    if outside:
        raise SystemExit(f"error: {so.name} resolves libraries outside {lib_dir}: {outside}")
    res = subprocess.run([exe, "-c", CHECK, str(so)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"error: {so.name} does not load under {exe}:\n{res.stderr[-2000:]}")
    print(res.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".ffcv_carry")
    args = p.parse_args(argv)
    import importlib.metadata

    import ffcv

    version = importlib.metadata.version("ffcv")
    pkg = Path(ffcv.__file__).parent
    built = next(pkg.glob("_libffcv*.so"))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    site, lib_dir = out / "site", out / "lib"
    shutil.copytree(pkg, site / "ffcv", ignore=shutil.ignore_patterns("__pycache__", "benchmarks", "_libffcv*.so"))
    lib_dir.mkdir(parents=True)
    generic = site / "ffcv" / "_libffcv.so"
    shutil.copy2(built, generic)
    for lib in linked_libraries(built):
        shutil.copy2(lib.resolve(), lib_dir / lib.name)  # under the soname the extension asks for
    check(sys.executable, generic, lib_dir)
    exe = python312()
    if exe is None:
        print("note: no Python 3.12 with headers here; the GPU machine's 3.12 imports the generic _libffcv.so")
    else:
        so312 = build_for(exe, version, site / "ffcv")
        for so in filter(None, [so312, generic]):
            check(exe, so, lib_dir)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}/ ({size / 2**20:.1f} MiB): site/ffcv (ffcv {version}), lib/ ({len(list(lib_dir.iterdir()))} "
          "shared libraries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
