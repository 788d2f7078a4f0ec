"""Counters that predict GPU speed, measured on any device: host synchronisations and op launches.

    with OpCounter() as counter:
        loss = model(x, t, y).square().mean(); loss.backward()
    counter.host_syncs, counter.launches

Every aten op that reaches the dispatcher is one launch (on a GPU, about one kernel); Triton kernels launched
by promoe's kernels count too (`TritonLaunchCounter`).

A host synchronisation is seen at two levels. The dispatcher sees the ops whose output shape is data (nonzero,
boolean-mask indexing, ...) and the scalar reads that C++ makes (`_local_scalar_dense`). The reads that Python
makes of a whole tensor (`.tolist()`, `.cpu()`, `.numpy()`) reach no aten op on the CPU, where the data is
already on the host, so they are seen as the Tensor methods they are: while a counter is active, those methods of
`torch.Tensor` are wrapped (a `TorchFunctionMode` would miss every read made in backward: the autograd engine runs
custom functions' backwards and a checkpoint's recomputation with no function mode active). On the CPU every
tensor stands for the accelerator's: a read of it counts as the sync it would be there. Given another device,
only reads of tensors on that device count. Reads made by other threads while a counter is active count too.
"""

import functools

import torch
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


# Tensor methods that read a tensor's data on the host, by name, with what the sync is called.
_HOST_READS = {"tolist": ".tolist()", "item": ".item()", "cpu": ".cpu()", "numpy": ".numpy()",
               "__bool__": "bool(tensor)", "__int__": "int(tensor)", "__float__": "float(tensor)",
               "__index__": "tensor as an index", "to": ".to('cpu')"}


def host_read_reason(method: str, args, kwargs) -> str | None:
    """What a call of the Tensor method `method` is called as a host read, or None where it reads nothing (a `.to`
    that does not go to the CPU)."""
    if method == "to" and not _to_host(args[1:], kwargs):
        return None
    return _HOST_READS.get(method)


def _to_host(args, kwargs) -> bool:
    """Whether the arguments of `Tensor.to` name the CPU as the target device."""
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, torch.Tensor):  # .to(other): other's device
        target = target.device
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


class _HostReads:
    """The Python-level half of `OpCounter`: the host-read methods of `torch.Tensor` wrapped while it is active, so
    that each call on a tensor of the counted device is counted, in forward and backward alike."""

    def __init__(self, counter: "OpCounter"):
        self.counter = counter
        self._own: dict[str, object] = {}  # what torch.Tensor itself held before (not its C base), to put back

    def __enter__(self):
        for method in _HOST_READS:
            self._own[method] = vars(torch.Tensor).get(method)
            setattr(torch.Tensor, method, self._counted(method, getattr(torch.Tensor, method)))
        return self

    def __exit__(self, *exc):
        for method, own in self._own.items():
            if own is None:
                delattr(torch.Tensor, method)  # the C base's method again
            else:
                setattr(torch.Tensor, method, own)
        self._own.clear()

    def _counted(self, method: str, original):
        counter = self.counter

        @functools.wraps(original)
        def read(*args, **kwargs):
            reason = None if counter.paused or counter.reading else host_read_reason(method, args, kwargs)
            if reason is None or args[0].device.type != counter.device.type:
                return original(*args, **kwargs)
            counter.syncs.append(reason)
            counter.reading = True  # the read's own aten ops (a device-to-host copy, a scalar read) are this sync
            try:
                return original(*args, **kwargs)
            finally:
                counter.reading = False

        return read


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
