"""Sites: where activations of a given width flow, who writes and reads them, and how a transform
placed there is fused into weights and/or run online. The table, not code paths, says what R1–R4
and OSTQuant's scales are. In fusing order:

| site        | width          | fused into: writers (``Mᵀ W``) / readers (``W M⁻ᵀ``)           | online (at inference)     |
|-------------|----------------|-----------------------------------------------------------------|---------------------------|
| residual    | hidden         | embed, o/down rows / q/k/v/gate/up (+router), lm_head           | –                         |
| attn_norm   | hidden         | input_layernorm γ / q, k, v            (S_attn, diagonal only)  | –                         |
| mlp_norm    | hidden         | post_attention_layernorm γ / gate, up (+router) (S_ffn, diag.)  | –                         |
| qk_scale    | head_dim (×kv) | k rows / q rows by M⁻ᵀ; Qwen3: k_norm γ / q_norm γ  (S_qk)      | –                         |
| attn_value  | head_dim (×kv) | v rows per KV head / o columns per query head  (R2, R_ov·S_ov)  | –                         |
| o_input     | heads          | – / o columns, across heads                                     | o_proj input, across heads|
| up_down     | intermediate   | up rows / down columns  (S_up_down, diagonal only)              | –                         |
| down_input  | intermediate   | – / down columns                                                | down_proj input (R4)      |
| qk          | head_dim       | –                                                               | Q and K after RoPE (R3)   |

``up_down`` folds before ``down_input``: the activation is ``(m ⊙ s) H``, so down_proj must take
``W diag(1/s) H`` — the scale first (OSTQuant folds it after the Hadamard, which is not exact).
``qk_scale`` acts before RoPE, so it must be diagonal with equal scales on each RoPE pair
(:mod:`~orthoquant.transforms.learnable` ties them); a width of kv_heads·head_dim gives every KV head
its own scales, a width of head_dim shares them (Qwen3 must share: its q/k norms are per head_dim).

Mixture of experts: every expert is an MLP of its own (roles ``gate.N``, ``up.N``, ``down.N``, see
:meth:`~orthoquant.models.spec.ArchSpec.roles`), so the MLP sites act on each expert — its gate/up read
the residual, its down writes it, ``up_down``/``down_input`` sit between its up and down — and the
router, a full-precision reader of the MLP norm's output, takes the residual and ``mlp_norm`` folds too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..fakequant.attention import set_qk_transforms
from ..fakequant.inputs import input_pipeline
from ..models.spec import ArchSpec
from ..models.surgery import get_module, linears_of, map_rows_, readers_of
from ..registry import Registry
from .base import PerBlock, Transform, fold_consumer
from .folding import IN_PLACE, Dual, Folding, consume, produce, to_query_heads

__all__ = ["Dims", "Site", "SITES", "DIAGONAL_SITES", "SITE_ORDER", "site_of", "consume", "produce",
           "fuse_residual_rest"]


@dataclass(frozen=True)
class Dims:
    """The widths a model's sites have."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "Dims":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # an expert's width where the model has one (Qwen3-MoE; Mixtral's intermediate_size is its experts');
        # a generic model (no ArchSpec) may lack intermediate_size; it takes no transform, so no site is sized
        inter = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", None) or 0
        return cls(config.hidden_size, inter, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim)

    def per_kv_head(self, t: Transform) -> Transform:
        """A head_dim-wide transform repeated on every KV head; a kv_heads·head_dim one as it is."""
        return PerBlock(t, self.kv_heads) if t.dim == self.head_dim else t

    def to_query_heads(self, t: Transform) -> Transform:
        return to_query_heads(self.per_kv_head(t), self.heads, self.kv_heads, self.head_dim)


LayerFn = Callable[..., None]  # (layer, arch, dims, transform, folding=IN_PLACE) -> None


@dataclass(frozen=True)
class Site:
    """A place for a transform. ``fuse`` edits a decoder layer's weights; ``attach`` installs the
    online part (None for fully fused sites); ``width`` is the size a recipe's Hadamard takes."""

    name: str
    width: Callable[[Dims], int]
    fuse: LayerFn | None
    attach: LayerFn | None = None
    per_layer: bool = True

    @property
    def online(self) -> bool:
        return self.attach is not None


def _fuse_residual(layer, arch, dims, t, folding: Folding = IN_PLACE):
    for group in arch.norm_groups:
        for module in readers_of(layer, arch, group):
            consume(module, t, folding)
    lin = linears_of(layer, arch)
    for role in arch.residual_writers():
        produce(lin[role], t, folding)


def fuse_residual_rest(model: nn.Module, arch: ArchSpec, t: Transform, folding: Folding = IN_PLACE) -> None:
    """The model-level part of the residual site: embeddings write it (``E ← E M``), lm_head reads it
    (``W ← W M⁻ᵀ``). Both map each row on its own, so deployment folds them in row blocks
    (:func:`~orthoquant.models.surgery.map_rows_`, the same arithmetic as :func:`produce` /
    :func:`consume`): the float64 transient of a vocabulary-sized matrix is one block, not a copy."""
    embed, head = get_module(model, arch.embed), get_module(model, arch.lm_head)
    if folding is not IN_PLACE:
        produce(embed, t, folding)
        consume(head, t, folding)
        return
    map_rows_(embed.weight.data, t.forward)  # what produce does to an embedding's rows
    map_rows_(head.weight.data, lambda rows: fold_consumer(rows, t))


def _fuse_attn_value(layer, arch, dims, t, folding: Folding = IN_PLACE):
    lin = linears_of(layer, arch)
    produce(lin["v"], dims.per_kv_head(t), folding)
    consume(lin["o"], dims.to_query_heads(t), folding)  # each query head reads its KV head's values


def _fuse_qk_scale(layer, arch, dims, t, folding: Folding = IN_PLACE):
    if arch.qk_norms is not None:  # Qwen3: per-head RMSNorms sit between the projections and RoPE
        q_norm, k_norm = (get_module(layer, p) for p in arch.qk_norms)
        produce(k_norm, t, folding)
        produce(q_norm, Dual(t), folding)
        return
    lin = linears_of(layer, arch)
    produce(lin["k"], dims.per_kv_head(t), folding)
    produce(lin["q"], Dual(dims.to_query_heads(t)), folding)  # q M⁻ᵀ · (k M)ᵀ = q kᵀ


def _fuse_norm_group(index: int) -> LayerFn:
    """The norm of ``arch.norm_groups[index]`` writes the site (through γ), its linears read it."""
    def fuse(layer, arch, dims, t, folding: Folding = IN_PLACE):
        group = arch.norm_groups[index]
        produce(get_module(layer, group.norm), t, folding)
        for module in readers_of(layer, arch, group):
            consume(module, t, folding)
    return fuse


def _fuse_up_down(layer, arch, dims, t, folding: Folding = IN_PLACE):
    lin = linears_of(layer, arch)
    for up, down in zip(arch.roles("up"), arch.roles("down")):  # each MLP (expert) its own pair
        produce(lin[up], t, folding)  # (act(gate) ⊙ up) M = act(gate) ⊙ (up M) for a diagonal M
        consume(lin[down], t, folding)


def _consume_role(kind: str) -> LayerFn:
    def fuse(layer, arch, dims, t, folding: Folding = IN_PLACE):
        lin = linears_of(layer, arch)
        for role in arch.roles(kind):
            consume(lin[role], t, folding)
    return fuse


def _online_input(kind: str) -> LayerFn:
    def attach(layer, arch, dims, t):
        lin = linears_of(layer, arch)
        for role in arch.roles(kind):
            input_pipeline(lin[role]).set("plan", [t.forward])
    return attach


def _attach_qk(layer, arch, dims, t):
    set_qk_transforms(get_module(layer, arch.attention), [lambda q, k: (t.forward(q), t.forward(k))])


# Sites a recipe's Hadamard may take.
SITES: Registry[Site] = Registry("transform site")
for _site in (
    Site("residual", lambda d: d.hidden, _fuse_residual, per_layer=False),
    Site("attn_value", lambda d: d.head_dim, _fuse_attn_value),
    Site("o_input", lambda d: d.heads, _consume_role("o"), _online_input("o")),
    Site("down_input", lambda d: d.intermediate, _consume_role("down"), _online_input("down")),
    Site("qk", lambda d: d.head_dim, None, _attach_qk),
):
    SITES.add(_site.name, _site)

# Sites that only a diagonal (a scale) preserves the function at: fitted or imported, never a Hadamard.
DIAGONAL_SITES: Registry[Site] = Registry("scale site")
for _site in (
    Site("attn_norm", lambda d: d.hidden, _fuse_norm_group(0)),
    Site("mlp_norm", lambda d: d.hidden, _fuse_norm_group(1)),
    Site("qk_scale", lambda d: d.head_dim, _fuse_qk_scale),
    Site("up_down", lambda d: d.intermediate, _fuse_up_down),
):
    DIAGONAL_SITES.add(_site.name, _site)

# Fusing order within a layer (see the module docstring for why it matters).
SITE_ORDER = ("residual", "attn_norm", "mlp_norm", "qk_scale", "attn_value", "o_input", "up_down",
              "down_input", "qk")


def site_of(name: str) -> Site:
    """The site called ``name`` in either table."""
    return DIAGONAL_SITES.get(name) if name in DIAGONAL_SITES else SITES.get(name)
