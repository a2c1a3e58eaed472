"""A guard that fails on every point where the host would wait for the device, usable on CPU.

On a GPU the host waits for the device whenever it reads a device value (``.item()``, ``float(t)``, ``if t:``, an op
whose output shape depends on the data such as ``nonzero``) and at every ``synchronize``. Inside a CUDA graph capture
each of these raises; outside one it serialises the host behind the device. On CPU none of them costs anything, so
nothing would show them: :func:`no_host_sync` makes each one raise :class:`HostSyncError` there too, naming the op and
the frame of the project or DeepSpeed that caused it.

Caught: every aten op tagged ``data_dependent_output`` or ``dynamic_output_shape`` (``_local_scalar_dense`` behind
``item``/``float``/``int``, ``equal``, ``allclose``, ``nonzero``, ``masked_select``, ``unique``, ...) plus
``is_nonzero`` (``bool(t)``) and ``repeat_interleave`` with a tensor of repeats (indexing only with a boolean mask:
integer indices gather on the device); ``Tensor.tolist``, ``.cpu``, ``.numpy`` and ``.to`` a CPU device, which pass
no dispatcher op on CPU tensors; ``torch.cuda.synchronize``, ``torch.accelerator.synchronize``, CUDA event and stream
``synchronize`` and DeepSpeed's ``get_accelerator().synchronize``.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
_NAMED = {"aten::is_nonzero", "aten::repeat_interleave.self_Tensor"}
# tagged dynamic_output_shape for their boolean-mask form only: judged by their indices
_INDEXING = {"aten::index.Tensor", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
_MISSING = object()
_OURS = ("dino_fast/", "deepspeed/", "pipelines/", "benchmarks/")


class HostSyncError(AssertionError):
    """The host read a device value or waited for the device inside a guarded region."""


def _where() -> str:
    """The innermost frame of the project or DeepSpeed (where a reader would fix it), else the innermost frame."""
    frames = [f for f in traceback.extract_stack()[:-3] if "tests/host_sync.py" not in f.filename]
    ours = [f for f in frames if any(p in f.filename for p in _OURS)]
    f = (ours or frames)[-1]
    return f"{f.filename.split('site-packages/')[-1]}:{f.lineno} ({f.name}: {f.line})"


def _mask_index(args) -> bool:
    """Whether an indexing op's indices hold a boolean mask (data-dependent: ``t[t > 0]``); integer indices are not
    (``t[idx]`` gathers on the device)."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _forbidden(func, args) -> bool:
    name = str(func._schema.name) + ("." + func._overloadname if func._overloadname != "default" else "")
    if name in _INDEXING:
        return _mask_index(args)
    return name in _NAMED or any(tag in func.tags for tag in _TAGS)


class _Guard(TorchDispatchMode):
    def __init__(self, report):
        super().__init__()
        self.report = report

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _forbidden(func, args):
            self.report(f"{func} reads a device value on the host")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(collect: list[str] | None = None) -> Iterator[None]:
    """Within the block, every host read of a device value and every device synchronisation raises HostSyncError
    (or, with ``collect``, is appended to it as "what, at where" and the block goes on: a survey of a code path)."""
    from deepspeed.accelerator import get_accelerator

    def report(what: str) -> None:
        message = f"{what}, at {_where()}"
        if collect is None:
            raise HostSyncError(message)
        collect.append(message)

    def waits(what: str, original):
        def guarded(*args, **kwargs):
            report(f"{what} waits for the device")
            return original(*args, **kwargs)

        return guarded

    acc = get_accelerator()
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        # On CPU every device is the host: a blocking copy to it stands for a device→host read or a blocking
        # host→device copy on a GPU (torch waits for the stream after a copy that is not non_blocking).
        if device is not None and device.type == "cpu" and not non_blocking:
            report(f"Tensor.to({device}) is a blocking copy between host and device")
        return original_to(self, *args, **kwargs)

    patches = [
        (torch.Tensor, "tolist", waits("Tensor.tolist", torch.Tensor.tolist)),
        (torch.Tensor, "cpu", waits("Tensor.cpu", torch.Tensor.cpu)),
        (torch.Tensor, "numpy", waits("Tensor.numpy", torch.Tensor.numpy)),
        (torch.Tensor, "to", to),
        (torch.cuda, "synchronize", waits("torch.cuda.synchronize", torch.cuda.synchronize)),
        (torch.cuda.Event, "synchronize", waits("torch.cuda.Event.synchronize", torch.cuda.Event.synchronize)),
        (torch.cuda.Stream, "synchronize", waits("torch.cuda.Stream.synchronize", torch.cuda.Stream.synchronize)),
        (type(acc), "synchronize", waits("DeepSpeed's accelerator.synchronize", type(acc).synchronize)),
    ]
    if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "synchronize"):
        patches.append((torch.accelerator, "synchronize",
                        waits("torch.accelerator.synchronize", torch.accelerator.synchronize)))
    saved = [(owner, name, vars(owner).get(name, _MISSING)) for owner, name, _ in patches]
    try:
        for owner, name, fn in patches:
            setattr(owner, name, fn)
        with _Guard(report):
            yield
    finally:
        for owner, name, fn in saved:
            if fn is _MISSING:  # inherited (e.g. from torch._C.TensorBase): drop the patch, the base shows again
                delattr(owner, name)
            else:
                setattr(owner, name, fn)
