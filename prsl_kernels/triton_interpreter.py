"""Fixes to Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``: tests, debugging).

Tooling for one environment, kept out of the kernel file: ``triton_kernels``
applies :func:`patch` on import only when the interpreter is on. Compiled
kernels are unaffected.
"""

import numpy as np
import torch
import triton.language as tl


def patch():
    """Four fixes to triton 3.6's CPU interpreter (TRITON_INTERPRET=1: tests, debugging).

    * It holds scalar arguments as 1-element numpy arrays and converts them with
      ``int()`` for ``range(0, V, BLOCK_V)``, which numpy >= 2.4 refuses.
    * It reduces ``xor_sum`` (the swap step of ``tl.sort`` / ``tl.topk`` /
      ``tl.bitonic_merge``) one element at a time in Python; numpy does it at once.
    * It re-patches triton.language on every nested ``@triton.jit`` call.
    * It truncates float32 -> bfloat16 where the GPU rounds to nearest even.
    Compiled kernels are unaffected.
    """
    import inspect

    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang_tensor
    if getattr(original_patch, "prsl_patched", False):
        return

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.prsl_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor

    # Every nested @triton.jit call (each step of a bitonic sort) re-patches all
    # of triton.language; skip it while this launch's patches are still in place.
    # The marker goes through the scope, so the launch's restore clears it with
    # the patches it belongs to.
    original_patch_lang = interpreter._patch_lang

    def patch_lang(fn):
        langs = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
        if langs and all(getattr(lang, "_prsl_interpreter_patched", False) for lang in langs):
            return interpreter._LangPatchScope()
        scope = original_patch_lang(fn)
        for lang in langs:
            scope.set_attr(lang, "_prsl_interpreter_patched", True)
        return scope

    interpreter._patch_lang = patch_lang

    reduce_ops = interpreter.ReduceOps
    original_apply = reduce_ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn == tl.standard._xor_combine and self.axis is not None:
            data = np.bitwise_xor.reduce(input[0].handle.data, axis=self.axis, keepdims=self.keep_dims)
            return self.to_tensor(data, input[0].dtype)
        return original_apply(self, input)

    reduce_ops.apply_impl = apply_impl

    builder = interpreter.InterpreterBuilder
    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.cast_impl = cast_impl
