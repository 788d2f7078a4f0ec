"""Counters that predict GPU speed, measured on any device: host synchronisations and op launches.

    with OpCounter() as counter:
        loss = model(x, t, y).square().mean(); loss.backward()
    counter.host_syncs, counter.launches

Every aten op that reaches the dispatcher is one launch (on a GPU, about one kernel); Triton kernels launched
by promoe's kernels count too (`TritonLaunchCounter`).

A host synchronisation is seen at two levels. The dispatcher sees the ops whose output shape is data (nonzero,
boolean-mask indexing, ...) and the scalar reads that C++ makes (`_local_scalar_dense`). The reads that Python
makes of a whole tensor (`.tolist()`, `.cpu()`, `.numpy()`) reach no aten op on the CPU, where the data is
already on the host, so they are seen as the Tensor methods they are (a `TorchFunctionMode`). On the CPU every
tensor stands for the accelerator's: a read of it counts as the sync it would be there. Given another device,
only reads of tensors on that device count.
"""

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose output shape depends on the data, or that read a device scalar on the host.
_DATA_DEPENDENT = {"aten::nonzero", "aten::masked_select", "aten::_unique", "aten::_unique2", "aten::unique_dim",
                   "aten::unique_consecutive", "aten::_local_scalar_dense"}
# Ops that move no data and launch nothing.
_VIEWS = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::expand", "aten::as_strided", "aten::t",
          "aten::transpose", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select",
          "aten::detach", "aten::alias", "aten::unbind", "aten::split", "aten::chunk", "aten::split_with_sizes",
          "aten::diagonal", "aten::empty", "aten::empty_strided", "aten::_reshape_alias"}


def host_sync_reason(func, args, kwargs) -> str | None:
    """Why this aten call makes a GPU wait for the host, or None."""
    name = func._schema.name
    if name in _DATA_DEPENDENT:
        return name
    if name == "aten::index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
        return "boolean-mask indexing"
    if name == "aten::repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
            and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if name == "aten::_to_copy" and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" \
            and str(kwargs.get("device", "")) == "cpu":
        return "copy to the host"
    return None


# Tensor methods that read a tensor's data on the host, by what a sync is called.
_HOST_READS = {torch.Tensor.tolist: ".tolist()", torch.Tensor.item: ".item()", torch.Tensor.cpu: ".cpu()",
               torch.Tensor.numpy: ".numpy()", torch.Tensor.__bool__: "bool(tensor)",
               torch.Tensor.__int__: "int(tensor)", torch.Tensor.__float__: "float(tensor)",
               torch.Tensor.__index__: "tensor as an index"}


def host_read_reason(func, args, kwargs) -> str | None:
    """The name of a Tensor method call that reads the tensor's data on the host, or None."""
    if func in _HOST_READS:
        return _HOST_READS[func]
    if func is torch.Tensor.to and _to_host(args[1:], kwargs):
        return ".to('cpu')"
    return None


def _to_host(args, kwargs) -> bool:
    """Whether the arguments of `Tensor.to` name the CPU as the target device."""
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, torch.Tensor):  # .to(other): other's device
        target = target.device
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


class _HostReads(TorchFunctionMode):
    """The Python-level half of `OpCounter`: host reads of a tensor on the counted device."""

    def __init__(self, counter: "OpCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        reason = None if counter.paused or counter.reading else host_read_reason(func, args, kwargs)
        if reason is None or args[0].device.type != counter.device.type:
            return func(*args, **kwargs)
        counter.syncs.append(reason)
        counter.reading = True  # the read's own aten ops (a device-to-host copy, a scalar read) are this sync
        try:
            return func(*args, **kwargs)
        finally:
            counter.reading = False


class OpCounter(TorchDispatchMode):
    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)  # whose tensors' host reads are syncs
        self.syncs: list[str] = []
        self.launches = 0
        self.ops: dict[str, int] = {}
        self.paused = False  # inside a Triton launch: the interpreter's own tensor handling is not the model's
        self.reading = False  # inside a host read already counted
        self._host_reads = _HostReads(self)

    def __enter__(self):
        self._host_reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._host_reads.__exit__(*exc)

    @property
    def host_syncs(self) -> int:
        return len(self.syncs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        reason = None if self.reading else host_sync_reason(func, args, kwargs)
        if reason is not None:
            self.syncs.append(reason)
        name = func._schema.name
        if name not in _VIEWS:
            self.launches += 1
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **kwargs)


class TritonLaunchCounter:
    """Counts promoe's Triton kernel launches. Their bytes are counted with every other op's by `bench/traffic.py`
    (counting only the launches' arguments hid the eager traffic around them)."""

    def __init__(self, op_counter: OpCounter | None = None):
        self.launches = 0
        self._op_counter = op_counter  # paused during each launch

    def record(self, args) -> None:
        self.launches += 1

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self._patched = []
        for cls in (JITFunction, InterpretedFunction):
            original = cls.run

            def run(kernel, *args, _original=original, **kwargs):
                self.record(args)
                if self._op_counter is not None:
                    self._op_counter.paused = True
                try:
                    return _original(kernel, *args, **kwargs)
                finally:
                    if self._op_counter is not None:
                        self._op_counter.paused = False

            cls.run = run
            self._patched.append((cls, original))
        return self

    def __exit__(self, *exc):
        for cls, original in self._patched:
            cls.run = original
