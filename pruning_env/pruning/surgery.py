"""Physical channel removal: per-layer-type handlers in one table, and a fast builder of the pruned copy.

The builder shallow-copies the module tree (same classes, so pickling and scripting keep working) and gives every
copy fresh tensors: sliced with ``index_select`` where channels go, cloned elsewhere; the source is never touched.
"""
from __future__ import annotations

import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torchvision.models.vision_transformer import VisionTransformer
from pruning_env.costs.counting import CONV_TYPES, CONVT_TYPES, LINEAR_TYPES, NORM_TYPES

__all__ = ["LayerHandler", "ConvHandler", "LinearHandler", "BatchNormHandler", "LayerNormHandler", "GroupNormHandler", "ConvTransposeHandler", "HANDLERS",
           "WIDTH_ATTRIBUTES", "CONV_OUT_EXTRAS", "handler_for", "unhandled_channel_tensors",
           "build_pruned_model"]

Index = Optional[torch.Tensor]  # kept indices along a dimension; None keeps everything


class LayerHandler:
    """How one layer type is sliced. ``out_idx`` indexes its output channels, ``in_idx`` its input features."""

    def out_tensors(self, module: nn.Module) -> List[Tuple[str, int]]:
        """(tensor name, dim) pairs that follow the output channels (parameters first, then buffers)."""
        raise NotImplementedError

    def in_tensors(self, module: nn.Module) -> List[Tuple[str, int]]:
        """(tensor name, dim) pairs that follow the input channels."""
        return []

    def set_shape(self, module: nn.Module, n_out: Optional[int], n_in: Optional[int]) -> None:
        """Update the shape attributes (``out_channels`` ...) of the already sliced copy (plain attributes,
        written to ``__dict__`` to skip ``nn.Module.__setattr__``)."""
        raise NotImplementedError

    def slice(self, module: nn.Module, out_idx: Index, in_idx: Index) -> Dict[str, torch.Tensor]:
        """New data for every tensor of ``module`` that changes (the others are cloned by the builder)."""
        result: Dict[str, torch.Tensor] = {}
        dims: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
        if out_idx is not None:
            for name, dim in self.out_tensors(module):
                dims.setdefault(name, []).append((dim, out_idx))
        if in_idx is not None:
            for name, dim in self.in_tensors(module):
                dims.setdefault(name, []).append((dim, in_idx))
        for name, cuts in dims.items():
            t = getattr(module, name)
            if t is None:
                continue
            t = t.detach()
            if len(cuts) == 2 and t.dim() == 2 and [d for d, _ in cuts] == [0, 1]:
                # one gather of the final block beats two copies for large linear weights
                rows, cols = cuts[0][1].to(t.device), cuts[1][1].to(t.device)
                result[name] = t[rows[:, None], cols]
                continue
            for dim, idx in cuts:
                t = t.index_select(dim, idx.to(t.device))
            result[name] = t
        return result


def _set_widths(module: nn.Module, n_out: Optional[int], n_in: Optional[int], out_attr: str = "out_channels",
                in_attr: str = "in_channels") -> None:
    """Write the new output / input widths (None: unchanged) as plain attributes of a sliced copy."""
    if n_out is not None:
        module.__dict__[out_attr] = n_out
    if n_in is not None:
        module.__dict__[in_attr] = n_in


class ConvHandler(LayerHandler):
    """Conv1d/2d/3d with ``groups == 1``, or depthwise / grouped with ``in == out`` (channels follow the input;
    whole conv groups are removed, so the channels per conv group stay the same)."""

    def out_tensors(self, module: nn.Conv2d) -> List[Tuple[str, int]]:
        # known per-output-channel tensors of conv subclasses (the gain of a weight-standardised conv) go along
        extra = [(n, 0) for n in CONV_OUT_EXTRAS if _own_tensor(module, n) is not None]
        return [("weight", 0), ("bias", 0)] + extra

    def in_tensors(self, module: nn.Conv2d) -> List[Tuple[str, int]]:
        # a grouped weight is (C, C / groups, k, k): its channels are already cut through dim 0
        return [] if module.groups > 1 else [("weight", 1)]

    def set_shape(self, module: nn.Conv2d, n_out: Optional[int], n_in: Optional[int]) -> None:
        if module.groups > 1:
            n = n_out if n_out is not None else module.out_channels
            per_group = module.out_channels // module.groups  # still the source's shape attributes here
            module.__dict__.update(in_channels=n, out_channels=n, groups=n // per_group)
            return
        _set_widths(module, n_out, n_in)


class LinearHandler(LayerHandler):
    """Linear: rows follow output neurons, columns follow input features (incl. flattened conv blocks)."""

    def out_tensors(self, module: nn.Linear) -> List[Tuple[str, int]]:
        return [("weight", 0), ("bias", 0)]

    def in_tensors(self, module: nn.Linear) -> List[Tuple[str, int]]:
        return [("weight", 1)]

    def set_shape(self, module: nn.Linear, n_out: Optional[int], n_in: Optional[int]) -> None:
        _set_widths(module, n_out, n_in, "out_features", "in_features")


class BatchNormHandler(LayerHandler):
    """BatchNorm1d/2d/3d: affine parameters and running statistics follow the channels."""

    def out_tensors(self, module: nn.BatchNorm2d) -> List[Tuple[str, int]]:
        return [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]

    def set_shape(self, module: nn.BatchNorm2d, n_out: Optional[int], n_in: Optional[int]) -> None:
        if n_out is not None:
            module.__dict__["num_features"] = n_out


class LayerNormHandler(LayerHandler):
    """LayerNorm over the channel dim alone (incl. torchvision's ``LayerNorm2d``): weight and bias follow the
    channels, ``normalized_shape`` shrinks (its statistics are then over the kept channels)."""

    def out_tensors(self, module: nn.LayerNorm) -> List[Tuple[str, int]]:
        return [("weight", 0), ("bias", 0)]

    def set_shape(self, module: nn.LayerNorm, n_out: Optional[int], n_in: Optional[int]) -> None:
        if n_out is not None:
            module.__dict__["normalized_shape"] = (n_out,)


class ConvTransposeHandler(LayerHandler):
    """ConvTranspose1d/2d/3d with ``groups == 1``: weight ``(in, out, *kernel)``, bias per output channel."""

    def out_tensors(self, module: nn.ConvTranspose2d) -> List[Tuple[str, int]]:
        return [("weight", 1), ("bias", 0)]

    def in_tensors(self, module: nn.ConvTranspose2d) -> List[Tuple[str, int]]:
        return [("weight", 0)]

    def set_shape(self, module: nn.ConvTranspose2d, n_out: Optional[int], n_in: Optional[int]) -> None:
        _set_widths(module, n_out, n_in)


class GroupNormHandler(LayerHandler):
    """GroupNorm: weight and bias follow the channels; the channels per group stay, so ``num_groups`` shrinks with
    the whole groups removed (one group stays one group: a normalised width, statistics over the kept channels)."""

    def out_tensors(self, module: nn.GroupNorm) -> List[Tuple[str, int]]:
        return [("weight", 0), ("bias", 0)]

    def set_shape(self, module: nn.GroupNorm, n_out: Optional[int], n_in: Optional[int]) -> None:
        if n_out is not None:
            per_group = module.num_channels // module.num_groups
            module.__dict__["num_groups"] = 1 if module.num_groups == 1 else n_out // per_group
            module.__dict__["num_channels"] = n_out


#: Per-output-channel tensors (dim 0) that conv subclasses add, pruned with the output channels: timm's
#: ``ScaledStdConv2d`` multiplies its standardised weight by ``gain`` of shape ``(out, 1, 1, 1)``. Extension point.
CONV_OUT_EXTRAS: Tuple[str, ...] = ("gain",)


def _own_tensor(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    t = module._parameters.get(name)
    return t if t is not None else module._buffers.get(name)


def unhandled_channel_tensors(module: nn.Module, widths: Tuple[int, ...]) -> List[Tuple[str, Tuple[int, ...]]]:
    """Own parameters / buffers of a layer that its handler does not slice but that have a dim of one of the
    layer's prunable ``widths`` (so they presumably follow the channels): surgery would leave them at the old
    width and the pruned model would crash or be wrong. ``[(name, shape), ...]``."""
    handler = handler_for(module)
    handled = {n for n, _ in handler.out_tensors(module)} | {n for n, _ in handler.in_tensors(module)}
    sizes = {int(w) for w in widths if int(w) > 1}
    found = []
    for registry in (module._parameters, module._buffers):
        for name, t in registry.items():
            if t is None or name in handled or t.dim() == 0:
                continue
            if sizes.intersection(int(d) for d in t.shape):
                found.append((name, tuple(int(d) for d in t.shape)))
    return found


_CONV = ConvHandler()
_LINEAR = LinearHandler()
_NORM = BatchNormHandler()
#: The handler table, keyed by layer type (subclasses are found through the MRO). Extend it to add a layer.
HANDLERS: Dict[type, LayerHandler] = {  # keyed by the cost model's layer-type tables (the one list of kinds)
    **{t: _CONV for t in CONV_TYPES},
    **{t: ConvTransposeHandler() for t in CONVT_TYPES},
    **{t: _LINEAR for t in LINEAR_TYPES},
    **{t: _NORM for t in NORM_TYPES},
    nn.LayerNorm: LayerNormHandler(),
    nn.GroupNorm: GroupNormHandler(),
}

#: Plain int attributes that a module's forward pass reads as a width, set from the pruned copy (extension point):
#: torchvision's ViT reshapes its patch embeddings to ``hidden_dim`` channels.
WIDTH_ATTRIBUTES: Dict[type, Callable[[nn.Module], Dict[str, int]]] = {
    VisionTransformer: lambda vit: {"hidden_dim": vit.class_token.shape[-1]},
}


def handler_for(module: nn.Module) -> LayerHandler:
    """The handler registered for ``type(module)`` or its nearest registered base class."""
    for cls in type(module).__mro__:
        h = HANDLERS.get(cls)
        if h is not None:
            return h
    raise KeyError(f"no pruning handler for layer type {type(module).__name__}; registered: "
                   f"{sorted(c.__name__ for c in HANDLERS)}")


def _registry_keys(module: nn.Module) -> Tuple[str, ...]:
    # registries (parameters, buffers, children, hooks) must not be shared between source and copy
    return tuple(k for k, v in module.__dict__.items() if k[0] == "_" and isinstance(v, (dict, set)))


def _shallow_copy(module: nn.Module, keys: Tuple[str, ...]) -> nn.Module:
    new = module.__class__.__new__(module.__class__)
    state = module.__dict__.copy()
    for key in keys:
        state[key] = state[key].copy()  # keeps the subclass (OrderedDict), much faster than copy.copy
    for key, value in state.items():
        # a method bound in __init__ (timm FasterNet's ``self.forward = self.forward_split_cat``) must call the
        # copy, not the source (whose unpruned layers it would run)
        if isinstance(value, types.MethodType) and value.__self__ is module:
            state[key] = types.MethodType(value.__func__, new)
    object.__setattr__(new, "__dict__", state)  # nn.Module.__setattr__ would inspect the dict first
    return new


@torch.no_grad()
def build_pruned_model(model: nn.Module, slices: Dict[str, Tuple[Index, Index]],
                       key_cache: Optional[Dict[int, Tuple[str, ...]]] = None,
                       params: Optional[Dict[str, Tuple[int, torch.Tensor]]] = None,
                       attributes: Optional[Dict[str, Dict[str, object]]] = None) -> nn.Module:
    """A new model with the same module classes where layer ``name`` is cut to ``slices[name] = (out, in)``.

    :param model: the source model; it is not modified and shares no tensor with the result.
    :param slices: kept output / input indices (or None = all) per layer name; layers not listed are cloned.
    :param key_cache: a dict kept between calls on the same model (speeds up repeated builds).
    :param params: ``(dim, kept indices)`` per qualified name of a parameter used outside any layer (ViT's class
        token, ConvNeXt's layer scale), cut along that dim.
    :param attributes: new values of plain attributes per module name (the split sizes and slice bounds the
        forward reads from its module, e.g. timm's ``MixedConv2d.splits``), set on the copy.
    :return: the pruned model (root attribute ``zoo_config`` becomes ``pruned_from``: it no longer rebuilds it).
    """
    keys_of = {} if key_cache is None else key_cache
    memo: Dict[int, nn.Module] = {}
    tensor_memo: Dict[int, torch.Tensor] = {}

    def fresh(t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in tensor_memo:
            tensor_memo[key] = t.detach().clone()
        return tensor_memo[key]

    def rec(module: nn.Module, name: str) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        keys = keys_of.get(id(module))
        if keys is None:
            keys = keys_of[id(module)] = _registry_keys(module)
        new = _shallow_copy(module, keys)
        memo[id(module)] = new
        cut = slices.get(name)
        sliced: Dict[str, torch.Tensor] = {}
        if cut is not None:  # before the children are replaced: set_shape may read the source's children
            handler = handler_for(module)
            sliced = handler.slice(module, cut[0], cut[1])
            handler.set_shape(new, None if cut[0] is None else int(cut[0].numel()),
                              None if cut[1] is None else int(cut[1].numel()))
        for child_name, child in module._modules.items():
            if child is not None:
                new._modules[child_name] = rec(child, f"{name}.{child_name}" if name else child_name)
        for pname, p in module._parameters.items():
            if p is None:
                continue
            cut_param = params.get(f"{name}.{pname}" if name else pname) if params else None
            if cut_param is not None:
                sliced[pname] = p.detach().index_select(cut_param[0], cut_param[1].to(p.device))
            if pname in sliced:
                new._parameters[pname] = nn.Parameter(sliced[pname], requires_grad=p.requires_grad)
            else:
                key = id(p)
                if key not in tensor_memo:  # tied parameters stay tied in the copy
                    tensor_memo[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                new._parameters[pname] = tensor_memo[key]
        for bname, b in module._buffers.items():
            if b is not None:
                new._buffers[bname] = sliced[bname] if bname in sliced else fresh(b)
        widths = WIDTH_ATTRIBUTES.get(type(module))
        if widths is not None:
            new.__dict__.update(widths(new))
        if attributes and name in attributes:
            new.__dict__.update(attributes[name])
        return new

    root = rec(model, "")
    config = root.__dict__.pop("zoo_config", None)
    if config is not None:
        root.pruned_from = dict(config)
    return root
