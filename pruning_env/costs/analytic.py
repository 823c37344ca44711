"""Analytic costs of pruning plans: MACs and params of a model as functions of its group widths.

Built once from a dependency graph's traced layer calls, then evaluated per plan with a few dot products (no
model is built); it equals :func:`pruning_env.costs.counting.count_costs` on the pruned model. The MACs of each
call are the counter's formula for its layer kind (:class:`~pruning_env.costs.counting.MacsTerm`
``weight * a * b``), with ``a`` and ``b`` replaced by the group widths that carry them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from pruning_env.costs.counting import (attention_product_macs, conv_term, conv_transpose_term, layer_term, linear_term,
                                        matmul_term, norm_term, count_params)

if TYPE_CHECKING:  # the graph imports the counter; importing it back at run time would be a cycle
    from pruning_env.pruning.graph import DependencyGraph, Group, LayerCall, Layout

__all__ = ["BilinearTerms", "CostTerms"]

_Expr = Tuple[int, np.ndarray]  # c + v . k: a constant plus a multiple of each group's width


def _conv_extras(m, e_out, li, param_rows, one) -> int:
    """Param rows of a conv subclass's extra per-output-channel tensors (the gain of a weight-standardised conv,
    see :data:`pruning_env.pruning.surgery.CONV_OUT_EXTRAS`); returns their numel."""
    from pruning_env.pruning.surgery import CONV_OUT_EXTRAS
    n = 0
    for name in CONV_OUT_EXTRAS:
        p = m._parameters.get(name)
        if p is not None:
            param_rows.append((p.numel() // p.shape[0], one, e_out, li))
            n += p.numel()
    return n


def fixed_call_macs(module: nn.Module, call: "LayerCall") -> int:
    """MACs of a call whose widths never change (``"fixed"`` / ``"other"``): the counter's formula at the
    layer's own widths (an opaque attention module's products from the call's geometry)."""
    if call.geometry is not None:
        return attention_product_macs(module, call.geometry)
    term = layer_term(module, call.positions)
    return 0 if term is None else term.macs


def _attention_inner(module: nn.Module) -> int:
    """The q (= k = v) width of an attention module traced by heads, read from its weights."""
    from pruning_env.pruning.attention import attention_handler  # the engine imports this module
    heads, head_dim = attention_handler(module).heads(module)
    return heads * head_dim


@dataclass(frozen=True)
class BilinearTerms:
    """Rows ``weight * (c1 + v1 . k) * (c2 + v2 . k)`` over group widths ``k``, each owned by one layer.

    :ivar layer: index (into :attr:`CostTerms.layers`) of the layer each row belongs to.
    """

    weight: np.ndarray
    c1: np.ndarray
    v1: np.ndarray
    c2: np.ndarray
    v2: np.ndarray
    layer: np.ndarray

    @classmethod
    def stack(cls, rows: List[Tuple[int, _Expr, _Expr, int]], n_groups: int) -> "BilinearTerms":
        """Terms from ``(weight, (c1, v1), (c2, v2), layer)`` rows."""
        if not rows:
            z = np.zeros((0,), dtype=np.int64)
            zz = np.zeros((0, n_groups), dtype=np.int64)
            return cls(z, z, zz, z, zz, z)
        return cls(weight=np.array([r[0] for r in rows], dtype=np.int64),
                   c1=np.array([r[1][0] for r in rows], dtype=np.int64), v1=np.stack([r[1][1] for r in rows]),
                   c2=np.array([r[2][0] for r in rows], dtype=np.int64), v2=np.stack([r[2][1] for r in rows]),
                   layer=np.array([r[3] for r in rows], dtype=np.int64))

    def rows(self, counts: np.ndarray) -> np.ndarray:
        """Value of every row at group widths ``counts``."""
        return self.weight * (self.c1 + self.v1 @ counts) * (self.c2 + self.v2 @ counts)


@dataclass(frozen=True)
class CostTerms:
    """MACs per image and params of a graph's model at any group widths.

    :ivar layers: names of the layers whose cost depends on the widths (conv, linear, norm, depthwise, attention),
        then of the parameters used outside any layer whose channels follow a group.
    :ivar macs_const: MACs of layers whose channels never change (grouped convs, token-wise linears, ...).
    :ivar params_const: params outside :attr:`layers` (embeddings, fixed layers, ...).
    """

    layers: Tuple[str, ...]
    macs_const: int
    params_const: int
    macs: BilinearTerms
    params: BilinearTerms

    @classmethod
    def from_graph(cls, graph: "DependencyGraph") -> "CostTerms":
        """The cost terms of ``graph``'s model, from its traced layer calls, the layers' layouts and their current
        shapes.

        :param graph: a traced (or derived) dependency graph.
        """
        n_groups = len(graph.groups)
        one: _Expr = (1, np.zeros(n_groups, dtype=np.int64))

        def expr(layout: Optional["Layout"], full: int) -> _Expr:
            v = np.zeros(n_groups, dtype=np.int64)
            if layout is None:
                return full, v
            c = 0
            for s in layout:
                if s.source is None:
                    c += s.features
                else:
                    v[s.source] += s.block
            return c, v

        layer_index: Dict[str, int] = {}
        macs_rows: List[Tuple[int, _Expr, _Expr, int]] = []
        param_rows: List[Tuple[int, _Expr, _Expr, int]] = []
        macs_const = 0
        handled_params = 0
        modules = dict(graph.model.named_modules())
        for call in graph.calls:
            if call.role in ("fixed", "other"):
                macs_const += fixed_call_macs(modules[call.name], call)
                continue
            spec = graph.specs[call.name]
            m = spec.module
            first = call.name not in layer_index
            li = layer_index.setdefault(call.name, len(layer_index))
            if call.role in ("conv", "linear"):  # groups == 1: a = the input width, b = the output width
                k_area = int(np.prod(m.kernel_size)) if call.role == "conv" else 1
                n_out = m.out_channels if call.role == "conv" else m.out_features
                n_in = m.in_channels if call.role == "conv" else m.in_features
                e_in, e_out = expr(spec.in_layout, n_in), expr(spec.out_layout, n_out)
                term = conv_term(m, call.positions) if call.role == "conv" else linear_term(call.positions, n_in,
                                                                                          n_out)
                macs_rows.append((term.weight, e_in, e_out, li))
                if first:
                    param_rows.append((k_area, e_in, e_out, li))
                    if m.bias is not None:
                        param_rows.append((1, one, e_out, li))
                    handled_params += _conv_extras(m, e_out, li, param_rows, one) if call.role == "conv" else 0
            elif call.role == "convt":  # transposed, groups == 1: weight (in, out, *kernel), counted on the input
                e_in, e_out = expr(spec.in_layout, m.in_channels), expr(spec.out_layout, m.out_channels)
                macs_rows.append((conv_transpose_term(m, call.positions).weight, e_in, e_out, li))
                if first:
                    param_rows.append((int(np.prod(m.kernel_size)), e_in, e_out, li))
                    if m.bias is not None:
                        param_rows.append((1, one, e_out, li))
            elif call.role == "depthwise":  # or grouped with equal widths: each output reads its group's inputs
                k_area = int(np.prod(m.kernel_size)) * (m.in_channels // m.groups)
                e = expr(spec.out_layout, m.out_channels)
                term = conv_term(m, call.positions)  # a = in / groups stays: whole conv groups are removed
                macs_rows.append((term.weight * term.a, one, e, li))
                if first:
                    param_rows.append((k_area, one, e, li))
                    if m.bias is not None:
                        param_rows.append((1, one, e, li))
                    handled_params += _conv_extras(m, e, li, param_rows, one)
            elif call.role == "norm":
                e = expr(spec.out_layout, m.num_features)
                term = norm_term(call.positions, m.num_features)
                macs_rows.append((term.weight * term.a, one, e, li))
                if first:
                    for p in (m.weight, m.bias):
                        if p is not None:
                            param_rows.append((1, one, e, li))
            elif call.role == "layernorm":  # parameters only: LayerNorm / GroupNorm count no MACs (counting's convention)
                e = expr(spec.out_layout, m.num_channels if isinstance(m, nn.GroupNorm) else m.normalized_shape[0])
                if first:
                    for p in (m.weight, m.bias):
                        if p is not None:
                            param_rows.append((1, one, e, li))
            elif call.role == "attention":  # out_layout: the q features of its heads, (head, num_heads, head_dim)
                head_dim = spec.out_layout[0].block
                e_q = expr(spec.out_layout, 0)
                e_head = (e_q[0] // head_dim, e_q[1] // head_dim)
                inner = _attention_inner(m)
                term = matmul_term(call.positions, call.context, inner)  # b = the q width: e_q
                macs_rows.append((term.weight * term.a, one, e_q, li))
                own = dict(m.named_parameters(recurse=False))
                if isinstance(m, nn.MultiheadAttention):  # its own packed q/k/v projection (self-attention)
                    e_in = expr(spec.in_layout, m.embed_dim)
                    term = linear_term(call.positions, m.embed_dim, 3 * inner)  # b = q, k and v: 3 * e_q
                    macs_rows.append((3 * term.weight, e_in, e_q, li))
                if first:
                    heads = sum(s.channels for s in spec.out_layout)
                    for pname, p in own.items():
                        if pname == "in_proj_weight":
                            param_rows.append((3, e_in, e_q, li))
                        else:  # one run of equal length per head (q/k/v biases, a bias-table column, a scale)
                            param_rows.append((p.numel() // heads, one, e_head, li))
                    handled_params += sum(p.numel() for p in own.values())
                continue
            else:
                raise ValueError(f"layer call {call.name!r} has unknown role {call.role!r}")
            if first:
                handled_params += sum(p.numel() for p in (getattr(m, "weight", None), getattr(m, "bias", None))
                                      if isinstance(p, torch.Tensor))
        for name, pspec in graph.params.items():
            p = graph.model.get_parameter(name)
            li = layer_index.setdefault(name, len(layer_index))
            param_rows.append((p.numel() // p.shape[pspec.dim], one, expr(pspec.layout, p.shape[pspec.dim]), li))
            handled_params += p.numel()
        return cls(layers=tuple(layer_index), macs_const=macs_const,
                   params_const=count_params(graph.model) - handled_params,
                   macs=BilinearTerms.stack(macs_rows, n_groups), params=BilinearTerms.stack(param_rows, n_groups))

    @staticmethod
    def layer_by_layer_macs(graph: "DependencyGraph") -> int:
        """MACs per image of ``graph``'s model from each traced call's formula at its layer's own widths, read
        from the modules rather than the group widths: what :meth:`evaluate` at ``graph.num_channels`` must give
        (the ``Pruner``'s consistency check of the layouts against the layers).

        :param graph: a traced (or derived) dependency graph.
        """
        modules = dict(graph.model.named_modules())
        total = 0
        for call in graph.calls:
            m = modules[call.name]
            if call.role in ("fixed", "other"):
                total += fixed_call_macs(m, call)
            elif call.role == "attention":
                inner = _attention_inner(m)
                total += matmul_term(call.positions, call.context, inner).macs
                if isinstance(m, nn.MultiheadAttention):
                    total += linear_term(call.positions, m.embed_dim, 3 * inner).macs
            elif call.role != "layernorm":
                total += layer_term(m, call.positions).macs
        return total

    def evaluate(self, counts: Sequence[int]) -> Tuple[int, int]:
        """(MACs per image, params) of the model at group widths ``counts``.

        :param counts: width of every group, shape ``(n_groups,)``.
        """
        k = np.asarray(counts, dtype=np.int64)
        return (self.macs_const + int(np.sum(self.macs.rows(k))),
                self.params_const + int(np.sum(self.params.rows(k))))

    def layer_costs(self, counts: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """(MACs, params) of every layer of :attr:`layers` at group widths ``counts`` (float64 arrays, exact
        below 2**53).

        :param counts: width of every group, shape ``(n_groups,)``.
        """
        k = np.asarray(counts, dtype=np.int64)
        n = len(self.layers)
        return (np.bincount(self.macs.layer, weights=self.macs.rows(k), minlength=n),
                np.bincount(self.params.layer, weights=self.params.rows(k), minlength=n))

    def membership(self, groups: Sequence["Group"]) -> np.ndarray:
        """0/1 matrix ``(n_groups, n_layers)``: which layers of :attr:`layers` carry each group's channels
        (its members and followers; a BatchNorm after a concatenation belongs to every group it follows).

        :param groups: the graph's groups.
        """
        index = {name: i for i, name in enumerate(self.layers)}
        matrix = np.zeros((len(groups), len(self.layers)), dtype=np.float64)
        for gi, g in enumerate(groups):
            matrix[gi, [index[n] for n in (*g.members, *g.followers) if n in index]] = 1.0
        return matrix

    def group_costs(self, membership: np.ndarray, counts: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """(MACs, params) per group of the layers that carry its channels, at group widths ``counts``.

        :param membership: :meth:`membership` of the graph's groups.
        :param counts: width of every group, shape ``(n_groups,)``.
        """
        layer_macs, layer_params = self.layer_costs(counts)
        return membership @ layer_macs, membership @ layer_params
