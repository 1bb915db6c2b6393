"""Reconstruction: after the final masks are chosen, refit each pruned layer's kept down_proj weights.

Layer l's down_proj W (H, I) keeps the columns S (k = |S| neurons). Its refit W' (H, k), and with
`intercept` a bias b (H,), solve the ridge least-squares problem over the calibration tokens t

    min Σ_t w_t ‖T_t − W' u_t[S] − b‖² + λ‖W' − W[:, S]‖²,   λ = damping · mean(diag G[S, S]),

u_t the down_proj input (the neurons' outputs, (I,)), T_t the layer's target (H,) and w_t a token weight: 1,
or with `normalised` 1 / mean(h_t²), h_t the dense model's hidden state after the layer, so that each token's
error counts relative to the scale that the next layer's RMSNorm divides out (a few tokens with massive
activations otherwise dominate the fit). With G = Σ w u uᵀ and C = Σ w T u[S]ᵀ the solution is
W' = (C + λ W[:, S]) (G[S, S] + λI)⁻¹: the ridge pulls towards the kept weights as they are, so a large λ means
no refit (not zero weights). The intercept is fitted on centred sums (G and C less the weighted means' outer
products, λ from the centred diagonal, b = mean(T) − W' mean(u[S])), so b is not damped. FLAP's bias
compensation is the special case W' = W[:, S], b = W[:, removed] · mean(u[removed]).

With few calibration tokens per kept neuron the refit overfits them (Qwen2.5-Coder-1.5B at 20%: 6,205 kept
neurons, 8,192 tokens: WikiText-2 39.9 without a refit, 61.1 with it at λ = 1e-4). So by default (`refit_holdout`)
the last windows are held out: per layer, the refit is solved on the others for each damping of
damping × HOLDOUT_SCALES, and the one with the lowest error on the held-out tokens, or the plain masked weights
where none beats them there, is kept; a damping is then solved again on all the tokens. More tokens are the other
cure: the recipes refit on `refit_samples` windows, the scoring windows and more of the same source.

- `one-shot`: u from the dense model, T = W u, the layer's own output: C = W G[:, S], so
  W' = (W G[:, S] + λ W[:, S]) (G[S, S] + λI)⁻¹, the dense layer's best k-neuron approximation on dense inputs.
- `sequential` (SparseGPT-style): the calibration hidden states are carried layer by layer through the
  already pruned-and-refitted layers (a pruned stream) beside the dense model's (a dense stream); u comes from
  the pruned stream and T = (1 − β)·W u + β·(h_dense(l+1) − a_pruned(l)), β = `drift`: at 0 the dense layer's
  output on the pruned inputs, at 1 what makes the pruned residual stream after the layer the dense one (the
  dense stream less the pruned stream before the MLP), correcting all the drift accumulated below. Measured
  (bench/results/reconstruct_check.md): fitting all the drift (β = 1) is no better than one-shot, a quarter
  of it is best, and the dense layer's output on the dense inputs as the target (ignoring the drift of the
  inputs) is far worse than one-shot.

Both run the decoder layers one at a time on cached hidden states (every layer's inputs and call keyword
arguments captured once per micro-batch by a forward pass whose decoder layers are skipped): one pass over the
model for one-shot, two layer passes per layer for sequential (three where o_proj is refitted too), and the fp64
sums of one layer in memory at a time. Where the layer adds its MLP's output to the residual stream as it is
(Llama, Mistral, Qwen; checked on the first micro-batch), the pruned stream after a refitted layer is the stream
before its MLP plus the refitted down_proj on the kept inputs already captured, so the layer is not run a third
time (a fifth of the refit's time, measured); this keeps the layer's kept down_proj inputs, (tokens, k) in their
own dtype, until the layer is done. The refit goes into the masks (`NeuronMasks.weight`, `.bias`), never into
the model's weights: with the masks off the model stays exactly the dense one, and `export_pruned` writes it.

Attention groups removed by NutePrune (`heads`): o_proj's kept input channels (the kept groups' query heads) are
refitted the same way, before the layer's MLP, always towards the dense o_proj's output on the same inputs (drift
0) and without intercept; in `sequential` the layer's MLP then sees the refitted attention.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import (
    MicroBatch,
    all_reduce_sum,
    inference_context,
    is_main,
    is_sharded,
    shard_windows,
    world_size,
)
from .errors import SdmpruneError
from .masks import ChannelMasks, HeadMasks, NeuronMasks
from .options import described
from .runtime import autocast_context

MODES = ("none", "one-shot", "sequential")
DEFAULT_DRIFT = 0.25  # the best of 0 ... 1 in bench/results/reconstruct_check.md
JITTERS = (0.0, *(10.0**e for e in range(-12, -1)))  # added to λ, × mean diagonal, when Cholesky fails
HOLDOUT_SCALES = (1.0, 30.0, 1000.0, 30000.0)  # the dampings the held-out choice tries: --damping times the first few
DEFAULT_REFIT_SAMPLES = 128  # against 32: 8-13% lower perplexity on SmolLM2 for every selection (README)


@dataclass
class ReconstructConfig:
    """reconstruction of the kept weights after the final masks"""

    reconstruct: str = field(default="sequential", metadata=described(
        "refit each pruned layer's kept down_proj weights by ridge least squares after the final masks: "
        "none | one-shot (dense-model activations; target: the dense layer's output) | sequential (activations of "
        "the pruned-and-refitted layers below; target: see --drift)"))
    damping: float = field(default=1e-4, metadata=described(
        "ridge λ (towards the kept weights as they are) relative to the mean diagonal of the kept neurons' Gram "
        "matrix (0 = plain least squares); with --refit-holdout the smallest of the dampings tried"))
    intercept: bool = field(default=False, metadata=described(
        "also fit a down_proj bias (centred least squares; generalises FLAP's bias compensation); exported via "
        "the config's mlp_bias, so Llama only"))
    drift: float | None = field(default=None, metadata=described(
        "sequential: fraction of the drift from the dense model accumulated below that each layer's refit corrects "
        "(0: reproduce the dense layer on the pruned inputs; 1: make the pruned residual stream the dense one); "
        f"default {DEFAULT_DRIFT}, or 0 where the layer normalises its MLP output before adding it (Gemma)"))
    normalised: bool = field(default=True, metadata=described(
        "weight each token's squared error by 1/mean(h^2), h the dense hidden state after the layer: errors "
        "relative to the scale the next RMSNorm divides out"))
    refit_samples: int | None = field(default=DEFAULT_REFIT_SAMPLES, metadata=described(
        "calibration windows the refit runs on: the scoring windows (--calib-samples; the first of them where it "
        "asks for fewer), then further windows of the same --calib source; more tokens per kept neuron generalise "
        "better (README, Reconstruction). In the Python API the recipes draw them; None: the windows given"))
    refit_holdout: float = field(default=0.125, metadata=described(
        "fraction of the calibration windows (the last ones) held out to choose each layer's damping among "
        "--refit-candidates dampings or no refit at all, whichever has the lowest error on them (then solved "
        "again on every window); 0: --damping as given, no check"))
    refit_candidates: int = field(default=3, metadata=described(
        "with --refit-holdout: how many dampings to try, the first N of --damping x 1, 30, 1000, 30000 (4 measured "
        "on 32 windows: about 1 percent lower perplexity on Qwen2.5-Coder-0.5B, 3 percent higher on SmolLM2, where "
        "the layers' held-out errors chose the largest damping more often than the model's perplexity wanted; on "
        "128 windows never chosen on SmolLM2)"))

    def validate(self) -> None:
        if self.reconstruct not in MODES:
            raise SdmpruneError(f"unknown reconstruction '{self.reconstruct}': choose {', '.join(MODES)}")
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise SdmpruneError(f"--damping must be a finite number >= 0, got {self.damping}")
        if not 0 <= self.refit_holdout < 1:
            raise SdmpruneError(f"--refit-holdout must be in [0, 1), got {self.refit_holdout}")
        if self.refit_samples is not None and self.refit_samples < 1:
            raise SdmpruneError(f"--refit-samples must be at least 1, got {self.refit_samples}")
        if self.refit_samples is not None and self.refit_holdout > 0 and \
                held_out_windows(self.refit_holdout, self.refit_samples) >= self.refit_samples:
            raise SdmpruneError(f"--refit-holdout {self.refit_holdout} holds out all {self.refit_samples} refit "
                                "windows: raise --refit-samples or use --refit-holdout 0")
        if not 1 <= self.refit_candidates <= len(HOLDOUT_SCALES):
            raise SdmpruneError(f"--refit-candidates must be 1 ... {len(HOLDOUT_SCALES)}, got {self.refit_candidates}")
        if self.drift is not None and not 0 <= self.drift <= 1:
            raise SdmpruneError(f"--drift must be in [0, 1], got {self.drift}")


@dataclass
class RefitStatistics:
    """fp64 sums over the calibration tokens (weights w) for one layer: inputs u[S] (k,) and targets T (H,)."""

    gram: torch.Tensor  # (k, k) Σ w u uᵀ
    cross: torch.Tensor  # (H, k) Σ w T uᵀ
    inputs: torch.Tensor  # (k,) Σ w u
    targets: torch.Tensor  # (H,) Σ w T
    energy: torch.Tensor  # () Σ w ‖T‖²
    total: torch.Tensor  # () Σ w (the token count when unweighted)

    @classmethod
    def zeros(cls, k: int, hidden: int, device: torch.device) -> RefitStatistics:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(zeros(k, k), zeros(hidden, k), zeros(k), zeros(hidden), zeros(), zeros())

    def tensors(self) -> list[torch.Tensor]:
        return [self.gram, self.cross, self.inputs, self.targets, self.energy, self.total]

    def __add__(self, other: RefitStatistics) -> RefitStatistics:
        return RefitStatistics(*(a + b for a, b in zip(self.tensors(), other.tensors(), strict=True)))

    def add(self, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add tokens: `inputs` (n, k) and `targets` (n, H), weighted by `weights` (n,) (None: 1). The two matrix
        products run in the dtype of `inputs` (fp32 or fp64), every sum is kept in fp64."""
        dtype = inputs.dtype
        weights = torch.ones(inputs.shape[0], dtype=torch.float64, device=inputs.device) if weights is None \
            else weights.double()
        weighted = inputs * weights.to(dtype)[:, None]
        self.gram += (weighted.T @ inputs).double()
        self.cross += (targets.to(dtype).T @ weighted).double()
        self.inputs += weighted.sum(0, dtype=torch.float64)
        targets = targets.double()
        self.targets += weights @ targets
        self.energy += weights @ targets.pow(2).sum(1)
        self.total += weights.sum()

    def error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """Σ_t w_t ‖T_t − weight u_t − bias‖² for `weight` (H, k) and `bias` (H,) or None, fp64."""
        error = self.energy - 2 * (weight * self.cross).sum() + ((weight @ self.gram) * weight).sum()
        if bias is not None:
            error += self.total * bias.pow(2).sum() - 2 * bias @ (self.targets - weight @ self.inputs)
        return max(error.item(), 0.0)

    def relative_error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        return self.error(weight, bias) / max(self.energy.item(), torch.finfo(torch.float64).tiny)


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, damping: float,
                prior: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """((cross + λ prior) (gram + λI)⁻¹ (H, k), the jitter used) for a PSD `gram` (k, k), `cross` (H, k) and the
    weights the ridge pulls towards, `prior` (H, k) (None: zero), in fp64, with λ = damping · mean(diag gram).

    Cholesky; an ill-conditioned Gram that is not numerically positive definite (dead neurons, damping 0) gets
    the smallest jitter × mean diagonal of JITTERS that factorises, else the pseudo-inverse (jitter inf).
    """
    scale = gram.diagonal().mean().item() if gram.numel() else 0.0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for jitter in JITTERS:
        factor, info = torch.linalg.cholesky_ex(gram + (damping + jitter) * scale * eye)
        if info.item() == 0 and scale > 0:
            pulled = cross if prior is None else cross + (damping + jitter) * scale * prior
            return torch.cholesky_solve(pulled.T, factor).T, jitter
    pulled = cross if prior is None else cross + damping * scale * prior
    return pulled @ torch.linalg.pinv(gram + damping * scale * eye, hermitian=True), math.inf


def refit(stats: RefitStatistics, damping: float, intercept: bool,
          prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The ridge solution (weight (H, k), bias (H,) or None, jitter) of `stats`, pulled towards `prior` (H, k) (the
    kept weights; None: zero); see the module docstring."""
    if not intercept:
        weight, jitter = ridge_solve(stats.gram, stats.cross, damping, prior)
        return weight, None, jitter
    n = stats.total.clamp_min(torch.finfo(torch.float64).tiny)
    mean_u, mean_t = stats.inputs / n, stats.targets / n
    weight, jitter = ridge_solve(stats.gram - n * torch.outer(mean_u, mean_u),
                                 stats.cross - n * torch.outer(mean_t, mean_u), damping, prior)
    return weight, mean_t - weight @ mean_u, jitter


def held_out_windows(fraction: float, windows: int) -> int:
    """How many of `windows` calibration windows (the last ones) `--refit-holdout fraction` holds out."""
    return max(1, round(fraction * windows)) if fraction > 0 else 0


def holdout_dampings(damping: float, candidates: int) -> list[float]:
    """The dampings a layer's refit tries on the held-out tokens, ascending: `damping` times the first
    `candidates` HOLDOUT_SCALES."""
    return sorted({damping * scale for scale in HOLDOUT_SCALES[:candidates]})


def choose_damping(fit: RefitStatistics, held: RefitStatistics, dampings: list[float], intercept: bool,
                   weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[float | None, dict[str, float]]:
    """The damping among `dampings` whose refit of `fit` (towards the kept weights `weight` (H, k)) has the lowest
    relative error on the `held` tokens, or None where the plain masked layer (`weight`, `bias`) does at least as
    well there; and every candidate's held-out error ("none" for the plain layer)."""
    candidates = {"none": None, **{f"{damping:g}": damping for damping in dampings}}
    errors = {}
    for name, damping in candidates.items():
        fitted, fitted_bias = (weight, bias) if damping is None else refit(fit, damping, intercept, weight)[:2]
        errors[name] = held.relative_error(fitted, fitted_bias)
    best = min(errors, key=errors.__getitem__)  # ties: the first, the plain layer
    return candidates[best], errors


# ----------------------------------------------------------------------------- the layer-by-layer pass


class _Stop(Exception):
    """Raised once the last decoder layer's arguments are recorded: the rest of the model is skipped."""


def _skip(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[MicroBatch], device: torch.device,
                  bf16: bool) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Per micro-batch: the hidden states (b, S, H) entering decoder layer 0, and every layer's keyword arguments
    (attention mask and position embeddings, which differ between sliding-window and full layers, ...).

    From one forward pass per micro-batch in which every decoder layer is skipped (its forward temporarily
    returns its input) after a pre-hook records its arguments, stopped at the last layer.
    """
    hidden: list[torch.Tensor] = []
    arguments: list[list[dict]] = []

    def record(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            kwargs = dict(kwargs)
            state = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(state)
                arguments.append([])
            arguments[-1].append(kwargs)
            if index == len(layers) - 1:
                raise _Stop

        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance forward (accelerate's hooks) is kept
    try:
        for layer in layers:
            layer.forward = _skip
        for batch in batches:
            with inference_context(model), autocast_context(device, bf16), suppress(_Stop):
                model(input_ids=batch.ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return hidden, arguments


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, model: nn.Module, bf16: bool) -> torch.Tensor:
    """Decoder `layer` on `hidden` (b, S, H): its output hidden states (b, S, H)."""
    with inference_context(model), autocast_context(hidden.device, bf16):
        output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _without(mlp: nn.Module) -> Iterator[None]:
    """`mlp` outputs zeros inside the block (a forward hook), so its decoder layer returns the residual stream
    before the MLP (a normalisation of the MLP output, as Gemma's, maps zero to zero)."""
    handle = mlp.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    try:
        yield
    finally:
        handle.remove()


class _Inputs:
    """The latest input of one linear, as it is before any mask multiplies it."""

    def __init__(self, linear: nn.Module):
        self.value: torch.Tensor | None = None
        self._handle = linear.register_forward_pre_hook(self._record, prepend=True)

    def _record(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def take(self) -> torch.Tensor:
        """The recorded input as (tokens, I), in its own dtype."""
        value, self.value = self.value, None
        return value.flatten(0, -2)

    def remove(self) -> None:
        self._handle.remove()


def _product_dtype(inputs: torch.Tensor) -> torch.Tensor:
    """`inputs` in the dtype the refit's products run in: fp32 where they are 16-bit (bf16 autocast, bf16 weights:
    the products of two such numbers are exact in fp32), else fp64."""
    return inputs.to(torch.float32 if inputs.element_size() == 2 else torch.float64)


def _adds_mlp_output(layer: nn.Module, mlp: nn.Module, hidden: torch.Tensor, kwargs: dict, model: nn.Module,
                     bf16: bool) -> bool:
    """Whether decoder `layer` adds its MLP's output to the residual stream as it is (Llama, Mistral, Qwen), not
    transformed first (Gemma normalises it), checked on `hidden` (b, S, H): the layer's output less its output with
    the MLP zeroed must be the MLP's output, up to the rounding of that addition."""
    outputs = []
    handle = mlp.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        full = _run_layer(layer, hidden, kwargs, model, bf16).double()
    finally:
        handle.remove()
    with _without(mlp):
        added = full - _run_layer(layer, hidden, kwargs, model, bf16).double()
    output = outputs[0].double()
    return bool((added - output).norm() <= 1e-3 * output.norm() + torch.finfo(hidden.dtype).eps * full.norm())


def _token_drift(pruned: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    """mean_t ‖p_t − d_t‖² / ‖d_t‖² over all processes' tokens of the hidden states (b, S, H) (fp64)."""
    sums = torch.zeros(2, dtype=torch.float64, device=dense[0].device)
    for p, d in zip(pruned, dense, strict=True):
        d = d.flatten(0, -2).double()
        ratio = (p.flatten(0, -2).double() - d).pow(2).sum(1) / d.pow(2).sum(1).clamp_min(torch.finfo(d.dtype).tiny)
        sums += torch.stack([ratio.sum(), torch.tensor(float(ratio.numel()), dtype=torch.float64, device=d.device)])
    all_reduce_sum([sums])
    return (sums[0] / sums[1]).item()


@dataclass
class _LinearRefit:
    """The refit of one pruned linear of one layer, down_proj (MLP neurons) or o_proj (attention groups), while
    the layer's passes run: records the linear's input and accumulates its statistics."""

    masks: ChannelMasks
    layer: int
    drift: float  # β of the target (0 for one-shot and for o_proj)
    intercept: bool
    holdout: bool  # whether some tokens are held out to choose the damping
    keep_inputs: bool = False  # whether to keep the kept inputs of each pass, for `outputs`

    def __post_init__(self) -> None:
        linear = self.masks.linears[self.layer]
        self.kept = torch.nonzero(self.masks.channel_mask(self.layer)).flatten()
        self.weight = linear.weight.detach().double()  # (out, in)
        self.product_weight = self.weight  # the weight in the inputs' dtype (fp32 for 16-bit inputs), cast once
        shape = (self.kept.numel(), self.weight.shape[0], self.weight.device)
        self.stats = RefitStatistics.zeros(*shape)  # the tokens the refit is fitted on (all without a holdout)
        self.held = RefitStatistics.zeros(*shape) if self.holdout else None
        self.inputs = _Inputs(linear)
        self.kept_inputs: list[torch.Tensor] = []  # per pass (tokens, k), in the inputs' own dtype

    def add(self, weights: torch.Tensor | None, following: torch.Tensor, before_mlp: torch.Tensor | None,
            held: torch.Tensor | None) -> None:
        """Add the tokens of the pass just run: `weights` (tokens,) or None, `following` the dense stream after the
        layer and `before_mlp` the pruned stream before its MLP (tokens, H), fp64 (the latter only with drift);
        `held` (tokens,) bool: the held-out tokens (None: none)."""
        raw = self.inputs.take()
        if self.keep_inputs:
            self.kept_inputs.append(raw[:, self.kept])
        u = _product_dtype(raw)
        if self.product_weight.dtype != u.dtype:
            self.product_weight = self.weight.to(u.dtype)
        goal = (u @ self.product_weight.T).double()
        if self.drift > 0:
            goal = (1 - self.drift) * goal + self.drift * (following - before_mlp)
        u = u[:, self.kept]
        if held is None:
            self.stats.add(u, goal, weights)
            return
        if weights is None:
            weights = torch.ones(u.shape[0], dtype=torch.float64, device=u.device)
        self.stats.add(u[~held], goal[~held], weights[~held])
        self.held.add(u[held], goal[held], weights[held])

    def solve(self, damping: float, candidates: list[float]) -> dict:
        """All-reduce the sums, choose the damping among `candidates` on the held-out tokens if any (else use
        `damping`), solve on all of them, hold the refit in the masks; the layer's report row."""
        self.inputs.remove()
        all_reduce_sum(self.stats.tensors() + (self.held.tensors() if self.held is not None else []))
        old_bias = self.masks.bias[self.layer]
        kept_weight, old_bias = self.weight[:, self.kept], None if old_bias is None else old_bias.double()
        row = {}
        whole = self.stats
        if self.held is not None:
            damping, errors = choose_damping(self.stats, self.held, candidates, self.intercept, kept_weight, old_bias)
            row = {"damping": damping, "held_out_errors": errors}
            whole = self.stats + self.held
        before = whole.relative_error(kept_weight, old_bias)
        if damping is None:  # no refit generalises to the held-out tokens: the plain masked layer
            fitted, bias, jitter = kept_weight, old_bias, 0.0
        else:
            fitted, bias, jitter = refit(whole, damping, self.intercept, kept_weight)
        dtype = self.masks.linears[self.layer].weight.dtype
        self.masks.weight[self.layer] = torch.zeros_like(self.weight).index_copy_(1, self.kept, fitted).to(dtype)
        self.masks.bias[self.layer] = None if bias is None else bias.to(dtype)
        return {"error_before": before, "error_after": whole.relative_error(fitted, bias), "jitter": jitter, **row}

    def outputs(self, device: torch.device, bf16: bool) -> list[torch.Tensor]:
        """The solved linear's output on each kept pass's inputs, (tokens, out), as the masked model computes it:
        the refit (or plain masked) weight on the kept channels, the linear's own bias and the refit's bias."""
        linear = self.masks.linears[self.layer]
        with torch.inference_mode(), autocast_context(device, bf16):
            return [self.masks.refitted_output(self.layer, linear, inputs, self.kept) for inputs in self.kept_inputs]


@contextmanager
def _masks_off(*masks: ChannelMasks | None) -> Iterator[None]:
    with ExitStack() as stack:
        for each in masks:
            if each is not None:
                stack.enter_context(each.disabled())
        yield


def reconstruct(
    model: nn.Module,
    masks: NeuronMasks,
    calibration: torch.Tensor,
    config: ReconstructConfig | None = None,
    *,
    heads: HeadMasks | None = None,
    micro_batch: int = 1,
    bf16: bool = False,
) -> dict:
    """Refit the kept down_proj weights of every layer that lost neurons, and with `heads` the kept o_proj weights
    of every layer that lost attention groups, into the masks (see the module docstring).

    `calibration`: (N, S) token ids, shared out over processes by micro-batches of `micro_batch` windows (the
    sums are added with one all-reduce per layer and linear); `bf16`: bf16 autocast for the layer passes (the sums
    and solves stay fp64). Sets `masks.weight[l]` ((H, I_l), removed columns zero, the weight's dtype and device)
    and `masks.bias[l]` (the intercept, or None: a compensation bias is replaced) for each layer with removed
    neurons, None for the others, and `heads.weight[l]` likewise (o_proj: no intercept, and the target is the dense
    layer's output on the same inputs, drift 0); the model's weights are not touched.

    Returns a report: the mode (alone for `none`), the other settings, tokens, seconds, and per layer the kept width,
    the Cholesky jitter and the relative squared error Σ w‖T − W u − b‖² / Σ w‖T‖² on the calibration tokens
    before (the plain masked layer, with its compensation bias if any) and after the refit (under `attention` the
    same for o_proj); `sequential` adds `hidden_error`, the mean over tokens of ‖h_pruned − h_dense‖² / ‖h_dense‖²
    of the hidden states after the layer; with `refit_holdout`, `damping` (the one chosen; None: the plain masked
    weights kept) and `held_out_errors` (each candidate's relative error on the held-out tokens, "none" the plain
    layer's), and `dampings_tried` at the top.
    """
    config = config or ReconstructConfig()
    config.validate()
    report = {"mode": config.reconstruct}
    if config.reconstruct == "none":
        return report
    report.update(damping=config.damping, refit_holdout=config.refit_holdout, intercept=config.intercept,
                  normalised=config.normalised)
    candidates = holdout_dampings(config.damping, config.refit_candidates)
    if config.refit_holdout > 0:
        report["dampings_tried"] = candidates
    if is_sharded(model):
        raise SdmpruneError("reconstruction of an FSDP-sharded model is not supported yet: run it without --fsdp")
    architecture = masks.architecture
    if config.intercept and architecture.bias_key is None:
        raise SdmpruneError(f"'{model.config.model_type}' has no MLP-bias option to store the intercept in: "
                            "reconstruct without --intercept")
    if micro_batch < 1:
        raise SdmpruneError(f"--micro-batch must be at least 1, got {micro_batch}")
    if -(-calibration.shape[0] // micro_batch) < world_size():
        raise SdmpruneError(f"{calibration.shape[0]} calibration windows in micro-batches of {micro_batch} for "
                            f"{world_size()} processes: each process needs at least one")
    windows = calibration.shape[0]
    held_windows = held_out_windows(config.refit_holdout, windows)
    if held_windows >= windows:
        raise SdmpruneError(f"--refit-holdout {config.refit_holdout} holds out all {windows} calibration windows: "
                            "give more windows or --refit-holdout 0")
    sequential = config.reconstruct == "sequential"
    start = time.perf_counter()
    layers = architecture.decoder_layers(model)
    mlps = architecture.mlps(model)
    device = masks.linears[0].weight.device
    batches = shard_windows(calibration, micro_batch)
    held = [None if not held_windows else  # per micro-batch (tokens,): from the windows held out
            (torch.arange(batch.start, batch.start + batch.ids.shape[0], device=device) >= windows - held_windows)
            .repeat_interleave(batch.ids.shape[1]) for batch in batches]
    dense, arguments = _layer_inputs(model, layers, batches, device, bf16)
    beta, adds = 0.0, False
    if sequential:
        with _masks_off(masks, heads):
            adds = _adds_mlp_output(layers[0], mlps[0], dense[0], arguments[0][0], model, bf16)
        if not adds and config.drift not in (None, 0):
            raise SdmpruneError(f"'{model.config.model_type}' transforms the MLP output before adding it to the "
                                "residual stream, so the drift cannot be fitted: use --drift 0 or one-shot")
        beta = (DEFAULT_DRIFT if config.drift is None else config.drift) if adds else 0.0
    if sequential:
        report["drift"] = beta
    pruned = list(dense)  # the same tensors until the first pruned layer
    rows = []
    for index in tqdm(range(len(layers)), desc="reconstruct", unit="layer", disable=not is_main()):
        layer, kwargs = layers[index], [a[index] for a in arguments]
        refits = []  # in the order the layer runs them: o_proj, then down_proj
        if heads is not None and not heads.keep[index].all():
            refits.append(_LinearRefit(heads, index, 0.0, False, held_windows > 0))
        if not masks.keep[index].all():
            refits.append(_LinearRefit(masks, index, beta, config.intercept, held_windows > 0, sequential and adds))
        before_mlps = []  # per micro-batch, the pruned stream before the layer's MLP (with the attention refitted)
        try:
            following, weights = [], []  # per micro-batch: the dense stream after the layer, the token weights
            for i in range(len(dense)):
                with _masks_off(masks, heads):
                    following.append(_run_layer(layer, dense[i], kwargs[i], model, bf16))
                flat = following[-1].flatten(0, -2).double()  # (tokens, H)
                weights.append(1 / flat.pow(2).mean(1) if config.normalised else None)
                if not sequential:
                    for each in refits:
                        each.add(weights[i], flat, None, held[i])
            row = {"layer": index, "kept": int(masks.keep[index].sum())}
            for each in refits:
                if sequential:  # the pruned stream through the layer, its MLP zeroed: a_pruned
                    for i in range(len(dense)):
                        with masks.disabled(), _without(mlps[index]):
                            before_mlp = _run_layer(layer, pruned[i], kwargs[i], model, bf16)
                        each.add(weights[i], following[i].flatten(0, -2).double(), before_mlp.flatten(0, -2).double(),
                                 held[i])
                        if each.keep_inputs:
                            before_mlps.append(before_mlp)
                solved = each.solve(config.damping, candidates)
                if each.masks is heads:
                    row["attention"] = {"kept_groups": int(heads.keep[index].sum()), **solved}
                else:
                    row.update(solved)
        finally:
            for each in refits:
                each.inputs.remove()
        for each in (masks, heads):  # a layer that lost nothing keeps its own weight (and no compensation bias)
            if each is not None and each.keep[index].all():
                each.weight[index] = each.bias[index] = None
        dense = following
        if before_mlps:  # the layer adds its refitted MLP output to the stream: no third pass
            pruned = [residual + output.view_as(residual) for residual, output
                      in zip(before_mlps, refits[-1].outputs(device, bf16), strict=True)]
        elif sequential:
            pruned = [_run_layer(layer, hidden, kw, model, bf16) for hidden, kw in zip(pruned, kwargs, strict=True)]
        if sequential:
            row["hidden_error"] = _token_drift(pruned, dense)
        rows.append(row)
    report.update(tokens=calibration.numel(), seconds=time.perf_counter() - start, layers=rows)
    return report
