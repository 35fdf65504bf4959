"""Write manifest.json: the public names of the installed CuPy, for the stand-in.

    pip install cupy-cuda12x          # `import cupy` works without a GPU
    python tests/fake_cupy/make_manifest.py

The stand-in (tests/fake_cupy/cupy) offers a name only if real CuPy has it, so code that
works on the stand-in cannot call something CuPy lacks (numpy.errstate, Generator.permutation,
ndarray.tobytes(order=...), ...).  Run this with the real CuPy importable, that is
*without* MINIVIT_FAKE_CUPY=1 and without tests/fake_cupy on sys.path.
"""
import inspect
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def public(obj):
    return sorted(n for n in dir(obj) if not n.startswith("_"))


def main():
    sys.path = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
    import cupy
    import cupyx
    import cupyx.scipy.special
    if getattr(cupy, "_IS_STANDIN", False):
        sys.exit("make_manifest: this is the stand-in, not CuPy; unset MINIVIT_FAKE_CUPY")
    generator = cupy.random.Generator
    manifest = {
        "cupy_version": cupy.__version__,
        "cupy": public(cupy),
        "cupy.ndarray": public(cupy.ndarray),
        "cupy.random": public(cupy.random),
        "cupy.random.Generator": public(generator),
        "cupy.linalg": public(cupy.linalg),
        "cupy.cuda": public(cupy.cuda),
        "cupy.cuda.runtime": public(cupy.cuda.runtime),
        "cupyx": public(cupyx),
        "cupyx.scipy.special": public(cupyx.scipy.special),
        # which top-level names are ufuncs (they have .reduce, .outer, ... in CuPy too)
        "ufuncs": sorted(n for n in public(cupy) if type(getattr(cupy, n)).__name__ == "ufunc"),
    }
    signatures = {}
    for name in manifest["cupy.random.Generator"]:
        try:
            signatures[f"Generator.{name}"] = str(inspect.signature(getattr(generator, name)))
        except (TypeError, ValueError):
            pass
    manifest["signatures"] = signatures
    path = HERE / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}: CuPy {cupy.__version__}, {len(manifest['cupy'])} top-level names")


if __name__ == "__main__":
    main()
