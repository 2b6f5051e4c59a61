"""Architecture specs: where each part of a decoder lives, keyed by the Hugging Face class name.

A spec is data. Every method (norm folding, rotations, calibration, the layer-wise runner) finds
modules through it, so supporting a new family means registering one spec, usually a
``dataclasses.replace`` of Llama's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..registry import Registry
from .fused import FusedSpec

# Linear roles inside one decoder layer. Their paths are relative to the layer.
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class NormGroup:
    """An RMSNorm and the linears that read its output (they share one input, hence one Hessian)."""

    norm: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Module layout of a decoder-only causal LM.

    :param layers: path of the ModuleList of decoder layers.
    :param embed: token embedding; ``final_norm`` and ``lm_head`` as named.
    :param linears: (role, path relative to a layer) for the seven projections.
    :param norm_groups: norms inside a layer and the roles they feed.
    :param qk_norms: per-head q/k RMSNorms applied before RoPE (Qwen3), never folded.
    :param rotary: path of the rotary embedding module (model-level); "" if the model has none.
    :param generic: found from the module tree (:mod:`.generic`): linears are named by their paths,
        input groups are found by hooks, and only weight/activation quantization is supported.
    :param rest: the model-level modules to load besides embed, final norm, lm_head and rotary.
    :param transposed: modules stored as GPT-2 ``Conv1D`` (weight (in, out)), linearized on load.
    :param fused: linears stored stacked (Phi-3's ``qkv_proj``), held as their parts (:mod:`.fused`).
    :param norm_offset: RMSNorms scale by ``offset + γ`` (Gemma: 1); held as plain norms (:mod:`.norms`).
    :param no_residual: why a residual rotation (R1 / R_res) cannot fold exactly ("" where it can).
    """

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attention: str = "self_attn"
    linears: tuple[tuple[str, str], ...] = (
        ("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
        ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
        ("down", "mlp.down_proj"),
    )
    norm_groups: tuple[NormGroup, ...] = (
        NormGroup("input_layernorm", ("q", "k", "v")),
        NormGroup("post_attention_layernorm", ("gate", "up")),
    )
    qk_norms: tuple[str, str] | None = None
    generic: bool = False
    rest: tuple[str, ...] = ()
    transposed: tuple[str, ...] = ()
    fused: tuple[FusedSpec, ...] = ()
    norm_offset: float = 0.0
    no_residual: str = ""

    @property
    def stock_layout(self) -> bool:
        """Whether the linears orthoquant holds are the stock model class's own modules (stock loaders
        of quantized checkpoints find them by name)."""
        return not (self.transposed or self.fused or self.norm_offset)

    def path(self, role: str) -> str:
        """Path of a linear role relative to its decoder layer."""
        return dict(self.linears)[role]

    def role_of(self, path: str) -> str:
        return {p: r for r, p in self.linears}[path]

    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Roles grouped by shared input: (q,k,v), (o,), (gate,up), (down,); () for a generic spec,
        whose groups are found by hooks (:func:`.generic.discover_input_groups`)."""
        if self.generic:
            return ()
        groups = {g.roles[0]: g.roles for g in self.norm_groups}
        return (groups["q"], ("o",), groups["gate"], ("down",))


LLAMA = ArchSpec()
ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")
ARCHITECTURES.add("LlamaForCausalLM", LLAMA)
ARCHITECTURES.add("MistralForCausalLM", LLAMA)
ARCHITECTURES.add("Qwen2ForCausalLM", LLAMA)  # q/k/v biases are handled generically
ARCHITECTURES.add("Qwen3ForCausalLM", dataclasses.replace(LLAMA, qk_norms=("self_attn.q_norm", "self_attn.k_norm")))


def _qkv_rows(config) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    return config.num_attention_heads * head_dim, kv, kv


# Phi-3 / Phi-4-mini: Llama with q/k/v and gate/up fused by rows (held as parts, see .fused); partial
# rotary (Phi-4-mini) changes nothing here: R3 acts after RoPE, the other sites before q/k exist.
PHI3 = dataclasses.replace(
    LLAMA,
    linears=(("q", "self_attn.qkv_proj.q_proj"), ("k", "self_attn.qkv_proj.k_proj"),
             ("v", "self_attn.qkv_proj.v_proj"), ("o", "self_attn.o_proj"), ("gate", "mlp.gate_up_proj.gate_proj"),
             ("up", "mlp.gate_up_proj.up_proj"), ("down", "mlp.down_proj")),
    fused=(FusedSpec("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"), _qkv_rows),
           FusedSpec("mlp.gate_up_proj", ("gate_proj", "up_proj"), lambda c: (c.intermediate_size,) * 2)),
)
ARCHITECTURES.add("Phi3ForCausalLM", PHI3)

# Gemma 2 / Gemma 3 (text): (1 + γ) norms, √hidden-scaled and tied embeddings, sandwich norms. The
# post-attention / post-feed-forward norms normalize o_proj's and down_proj's outputs and scale them by
# γ before they join the residual: a residual rotation Q would need diag(γ)·Q = Q·diag(γ') for every
# output, which holds only for a constant γ (RMS is rotation-invariant, the per-channel γ is not).
_SANDWICH = ("Gemma's post-attention and post-feed-forward RMSNorms scale o_proj's and down_proj's normalized "
             "outputs by a per-channel γ before the residual add, and diag(γ)·Q ≠ Q·diag(γ) for a rotation Q, so a "
             "residual rotation (site residual, R1 / R_res) cannot fold exactly; attn_value (R2), o_input, "
             "down_input (R4), qk (R3) and the per-linear solvers' transforms stay exact")
GEMMA2 = dataclasses.replace(
    LLAMA,
    norm_groups=(NormGroup("input_layernorm", ("q", "k", "v")), NormGroup("pre_feedforward_layernorm", ("gate", "up"))),
    norm_offset=1.0, no_residual=_SANDWICH,
)
ARCHITECTURES.add("Gemma2ForCausalLM", GEMMA2)
ARCHITECTURES.add("Gemma3ForCausalLM", dataclasses.replace(GEMMA2, qk_norms=("self_attn.q_norm", "self_attn.k_norm")))


def full_support() -> list[str]:
    """The architectures with an ArchSpec (transforms, KV cache, fitting)."""
    return list(ARCHITECTURES.names())

