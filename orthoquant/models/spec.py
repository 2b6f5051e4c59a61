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


@dataclass(frozen=True)
class NormGroup:
    """An RMSNorm and the linears that read its output (they share one input, hence one Hessian)."""

    norm: str
    roles: tuple[str, ...]
    readers: tuple[str, ...] = ()  # modules that read the norm's output too but are not quantized (a MoE router)


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP: a router reading the MLP norm's output (kept in full precision) and
    experts held as per-expert nn.Linear (:mod:`.experts`), each a gate/up/down MLP on its routed tokens.

    :param path: the experts' ``ExpertList``, relative to a decoder layer.
    :param router: the router (its weight (experts, hidden) reads the residual stream through the norm).
    :param count: the config attribute that holds the number of experts.
    """

    path: str = "mlp.experts"
    router: str = "mlp.gate"
    count: str = "num_experts"


# The MLP's linear roles; an expert's are ``gate.3``, ``up.3``, ``down.3`` (kind, then expert index).
MLP_KINDS = ("gate", "up", "down")


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
    :param experts: the MLP is a mixture of experts; :meth:`for_config` lists each expert's linears as
        the roles ``gate.N``/``up.N``/``down.N`` and adds the router to the MLP norm's readers.
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
    experts: Experts | None = None

    @property
    def stock_layout(self) -> bool:
        """Whether the linears orthoquant holds are the stock model class's own modules (stock loaders
        of quantized checkpoints find them by name)."""
        return not (self.transposed or self.fused or self.norm_offset)

    def path(self, role: str) -> str:
        """Path of a linear role relative to its decoder layer."""
        return dict(self.linears)[role]

    def roles(self, kind: str) -> tuple[str, ...]:
        """The roles of one kind: ``("down",)`` for a dense MLP, ``("down.0", "down.1", …)`` for experts."""
        return tuple(r for r, _ in self.linears if r.partition(".")[0] == kind)

    def residual_readers(self) -> tuple[str, ...]:
        """The quantized linears that read the residual stream (through a norm)."""
        return tuple(r for g in self.norm_groups for r in g.roles)

    def residual_writers(self) -> tuple[str, ...]:
        """The linears that write into the residual stream: o_proj and every down_proj."""
        return self.roles("o") + self.roles("down")

    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Roles grouped by shared input: (q,k,v), (o,), then per MLP (one, or each expert's: the tokens
        routed to it) (gate,up), (down,); () for a generic spec, whose groups are found by hooks
        (:func:`.generic.discover_input_groups`)."""
        if self.generic:
            return ()
        qkv = next(g.roles for g in self.norm_groups if "q" in g.roles)
        mlps = zip(*(self.roles(kind) for kind in MLP_KINDS))
        return (qkv, ("o",)) + tuple(group for gate, up, down in mlps for group in ((gate, up), (down,)))

    def for_config(self, config) -> "ArchSpec":
        """The spec of one model: a mixture of experts gets a role per expert linear (their number is
        the config's); any other spec is itself."""
        if self.experts is None or "gate" not in dict(self.linears):  # dense, or expanded already
            return self
        n = int(getattr(config, self.experts.count))

        def expand(role: str) -> tuple[str, ...]:
            return tuple(f"{role}.{e}" for e in range(n)) if role in MLP_KINDS else (role,)
        mlp = tuple((f"{kind}.{e}", f"{self.experts.path}.{e}.{kind}_proj") for e in range(n) for kind in MLP_KINDS)
        groups = tuple(dataclasses.replace(g, roles=tuple(x for r in g.roles for x in expand(r)),
                                           readers=g.readers + ((self.experts.router,) if "gate" in g.roles else ()))
                       for g in self.norm_groups)
        return dataclasses.replace(self, linears=tuple(lr for lr in self.linears if lr[0] not in MLP_KINDS) + mlp,
                                   norm_groups=groups)


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

# Mixture of experts (transformers 5 stacks the experts; :mod:`.experts` holds them per expert). The
# router reads the post-attention norm's output, so R1 and S_ffn fold into it as into every expert's
# gate/up; every expert's down_proj writes the residual; R4 and S_up_down act on each expert's down input.
QWEN3_MOE = dataclasses.replace(LLAMA, qk_norms=("self_attn.q_norm", "self_attn.k_norm"), experts=Experts())
ARCHITECTURES.add("Qwen3MoeForCausalLM", QWEN3_MOE)
ARCHITECTURES.add("MixtralForCausalLM", dataclasses.replace(LLAMA, experts=Experts(count="num_local_experts")))


def dense_mlp_layers(config) -> bool:
    """Whether some decoder layers of a MoE config keep a dense MLP (Qwen3-MoE's ``mlp_only_layers`` and
    ``decoder_sparse_step``): one spec cannot name both layouts, so such a model takes the generic path."""
    return bool(getattr(config, "mlp_only_layers", None)) or (getattr(config, "decoder_sparse_step", None) or 1) != 1


DENSE_MLP_LAYERS = ("its arch spec covers models whose every decoder layer is a mixture of experts, and this config "
                    "keeps dense MLP layers among them (mlp_only_layers / decoder_sparse_step)")


def full_support() -> list[str]:
    """The architectures with an ArchSpec (transforms, KV cache, fitting)."""
    return list(ARCHITECTURES.names())

