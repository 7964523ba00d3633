"""Shared helpers of the llama.cpp comparison scripts (llama-cpp-python)."""

import ctypes
import sys

try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit(
        "llama-cpp-python is not installed: run scripts/llamacpp/install.sh "
        "(builds llama.cpp from source, slow on 2 cores)"
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
    return llama_cpp.__version__
