"""Shared helpers of the llama.cpp comparison scripts (llama-cpp-python)."""

import ctypes
import os
import sys

SDIST_VERSION = "0.3.36"
CACHE = os.environ.get("LLAMACPP_CACHE", "/var/tmp/llamacpp")
SDIST = os.path.join(CACHE, f"llama_cpp_python-{SDIST_VERSION}")
LIB_DIR = os.environ.get(
    "LLAMA_CPP_LIB_PATH",
    os.path.join(CACHE, f"build-{os.environ.get('VARIANT', 'native')}", "bin"),
)


def _use_local_build():
    """Imports the sdist's pure-Python package against libllama.so from scripts/llamacpp/build.sh."""
    if os.path.exists(os.path.join(LIB_DIR, "libllama.so")) and os.path.isdir(SDIST):
        os.environ["LLAMA_CPP_LIB_PATH"] = LIB_DIR
        sys.path.insert(0, SDIST)


_use_local_build()
try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError as error:  # pragma: no cover - depends on the machine
    sys.exit(
        f"llama-cpp-python is not usable ({error}): run scripts/llamacpp/install.sh "
        "(builds llama.cpp from source into /var/tmp/llamacpp, ~10 min on 2 cores)"
    )

import numpy as np

GGML_TYPE_F32 = 0


def open_model(path, n_ctx, threads, logits_all=False, kv_f32=False, mmap=True):
    """Loads a GGUF with llama.cpp's CPU backend, quietly."""
    kwargs = dict(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        logits_all=logits_all,
        use_mmap=mmap,
        verbose=False,
    )
    if kv_f32:
        kwargs.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    return Llama(**kwargs)


def last_logits(llm):
    """The logits after the last evaluated token, as a float32 numpy array (a copy)."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    if not ptr:
        raise RuntimeError("llama.cpp returned no logits")
    array = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(array, shape=(llm.n_vocab(),)).copy()


def perf(llm):
    """llama.cpp's own timings: prompt and generation milliseconds and token counts."""
    data = llama_cpp.llama_perf_context(llm.ctx)
    return {
        "prompt_ms": data.t_p_eval_ms,
        "prompt_tokens": data.n_p_eval,
        "eval_ms": data.t_eval_ms,
        "eval_tokens": data.n_eval,
    }


def version():
    """The llama-cpp-python version and where its libllama comes from."""
    return f"{llama_cpp.__version__} ({os.environ.get('LLAMA_CPP_LIB_PATH', 'bundled lib')})"
