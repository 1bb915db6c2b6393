"""Where each supported architecture keeps its decoder layers and their MLP projections.

Adding an architecture is one `register(...)` call: the rest of the package reaches the MLP only
through an `Architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import SdmpruneError


@dataclass(frozen=True)
class Architecture:
    """Attribute names of a gated-MLP decoder (SwiGLU, GeGLU): `y = down(act(gate(x)) * up(x))`, and of its
    attention."""

    layers: str = "model.layers"  # dotted path from the CausalLM to its list of decoder layers
    mlp: str = "mlp"  # attribute of a decoder layer
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    width_key: str = "intermediate_size"  # config field holding the MLP width
    bias_key: str | None = None  # boolean config field giving gate/up/down biases, if the architecture has one
    attention: str = "self_attn"  # attribute of a decoder layer
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for name in self.layers.split("."):
            module = getattr(module, name)
        return module

    def mlps(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(layer, self.mlp) for layer in self.decoder_layers(model)]

    def projections(self, mlp: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """(gate, up, down) linears of one MLP; gate/up weights are (I, H), down is (H, I)."""
        return getattr(mlp, self.gate), getattr(mlp, self.up), getattr(mlp, self.down)

    def attentions(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(layer, self.attention) for layer in self.decoder_layers(model)]

    def attention_projections(self, attention: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """(q, k, v, o) linears of one attention block; q is (heads·d, H), k/v (kv_heads·d, H), o (H, heads·d)."""
        return tuple(getattr(attention, name) for name in (self.q, self.k, self.v, self.o))


ARCHITECTURES: dict[str, Architecture] = {}


def register(model_type: str, architecture: Architecture) -> None:
    ARCHITECTURES[model_type] = architecture


# SmolLM and SmolLM2 are LlamaForCausalLM checkpoints.
register("llama", Architecture(bias_key="mlp_bias"))
for _model_type in ("mistral", "qwen2", "qwen3"):
    register(_model_type, Architecture())
# Gemma 3 text (Gemma3ForCausalLM): a GELU-tanh gated MLP under the same names, so neurons prune as above.
# Its attention also slices by whole groups: head_dim is explicit in the config, q/k norms act per head
# (one weight of size head_dim shared by all heads), the softmax scale is query_pre_attn_scalar**-0.5
# whatever the head count, and sliding-window layers differ only in their mask. The 270M and 1B sizes
# have a single key/value head, which every pruning path keeps. No MLP-bias option (no FLAP bias).
register("gemma3_text", Architecture())


def get_architecture(model_or_type: nn.Module | str) -> Architecture:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type not in ARCHITECTURES:
        raise SdmpruneError(
            f"unsupported architecture '{model_type}': supported are {', '.join(sorted(ARCHITECTURES))} "
            "(add one with sdmprune.models.architectures.register)"
        )
    return ARCHITECTURES[model_type]


def attention_group_shape(model: nn.Module) -> tuple[int, int]:
    """(G, d): query heads per key/value head and the head dimension, from the model's config."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads // (config.num_key_value_heads or config.num_attention_heads), head_dim
