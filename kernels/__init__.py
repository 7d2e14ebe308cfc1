import os

if __name__ != "pdserve.kernels":
    # Python run from the repository root (`python -c`, `python -m`) puts the root first on sys.path, where
    # this folder would shadow Hugging Face's `kernels` package, which transformers imports.
    raise ImportError(f"{os.path.dirname(__file__)} is pdserve.kernels, not {__name__!r}: run Python from another "
                      "folder, with -P, or through the installed `pdserve` command")
