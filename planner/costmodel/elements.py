"""Bytes per element of each kind of tensor a training step keeps or moves."""
from __future__ import annotations

import numpy as np

from ..layout import Precision
from ..frozen import frozen


@frozen(eq=True)
class ElementBytes:
    """The default is Megatron-Core mixed precision (Micikevicius et al. 2018; Rajbhandari et al.
    2020 sec. 3.1): bf16 weights and activations, fp32 softmax/norm statistics, fp32 main
    gradients (reduced in fp32), bf16 parameter gathers, fp32 master weights + Adam moments (12).
    A stack may keep and reduce gradients in 16 bits (DeepSpeed fp16: 2)."""
    act: float = 2.0
    stat: float = 4.0
    weight: float = 2.0
    grad: float = 4.0
    grad_reduce: float = 4.0
    param_gather: float = 2.0
    optimizer: float = 12.0
    # ZeRO-3 weights as FSDP2 keeps them: the sharded parameters are the fp32 master (4 B), and
    # the optimizer holds only the moments (stacks.Stack.fsdp_fp32_params)
    fsdp_master: float = 0.0

    @staticmethod
    def of_stack(stack) -> "ElementBytes":
        return ElementBytes(grad=stack.grad_bytes, grad_reduce=stack.grad_reduce_bytes,
                            fsdp_master=4.0 if stack.fsdp_fp32_params else 0.0)

    @staticmethod
    def uniform(e: int, zero: int) -> "ElementBytes":
        """A run in one dtype of e bytes (validate on CPU): the optimizer holds an e-byte master
        copy and two moments (ZeRO 0-2, as Megatron's distributed optimizer), or only the two
        moments when FSDP2's sharded parameters are the master copy (ZeRO 3). Statistics (norms,
        softmax log-sum-exp, the loss) are fp32 at least, as PyTorch and TE compute them in bf16."""
        return ElementBytes(act=e, stat=max(e, 4), weight=e, grad=e, grad_reduce=e, param_gather=e,
                            optimizer=(2 if zero == 3 else 3) * e)


def with_grads_of(eb: ElementBytes, stack, fp16) -> ElementBytes:
    """eb with 16-bit gradients, held and reduced, for the candidates in fp16 (`fp16`: a mask)
    where the stack keeps them so (Stack.fp16_grads: Megatron's arguments.py forces fp32 gradient
    accumulation and all-reduce only under --bf16; under --fp16 the DDP gradient buffer has the
    parameters' dtype)."""
    half = np.asarray(fp16, bool) & stack.fp16_grads
    if not np.any(half):
        return eb
    return ElementBytes(**{**vars(eb), "grad": np.where(half, 2.0, eb.grad),
                           "grad_reduce": np.where(half, 2.0, eb.grad_reduce)})


def fp8_params(stack, k) -> np.ndarray:
    """Candidates whose weights live in fp8, 1 byte each (Stack.fp8_param_gather):
    fp8 with a sharded optimizer, the only case Megatron accepts --fp8-param-gather in
    (megatron/training/arguments.py validate_args)."""
    return (k.precision == Precision.FP8) & (k.zero >= 1) & stack.fp8_param_gather
