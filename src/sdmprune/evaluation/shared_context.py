"""Log-likelihood scoring for lm-evaluation-harness that runs each distinct context once.

The harness's `HFLM` scores every (context, continuation) request as a sequence of its own and applies the
output head (and a log-softmax over the vocabulary) at every position. A multiple-choice item repeats one
context for each of its 2–10 answers, and only the answers' tokens are scored. `SharedContextLM` keeps
HFLM's tokenisation, truncation and model handling and replaces its scoring: the requests are grouped by
context tokens, each context runs once with its keys/values cached, every continuation of it runs on that
cache, and the output head runs only where a continuation token is predicted. The log-likelihoods equal
HFLM's up to floating-point rounding (tested); the time saved is the repeated contexts' forward passes and
the head over context positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..runtime import cache_keyword

# ((context text, continuation text), context tokens, continuation tokens), as the harness passes them.
Request = tuple[tuple[str, str], list[int], list[int]]
# (context tokens, [(request index, continuation tokens), ...]): one context and the requests that share it.
Group = tuple[list[int], list[tuple[int, list[int]]]]
LOGITS_BYTES = 2**30  # memory for one continuation pass's logits (sets how many answer tokens run at once)


def group_by_context(requests: Sequence[Request], max_length: int) -> list[Group]:
    """`[(context tokens, [(request index, continuation tokens), ...]), ...]`, longest context first.

    A request longer than `max_length + 1` tokens loses tokens from the left of its context, as in HFLM.
    """
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for index, (_, context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError(f"request {index} has an empty continuation")
        tokens = (context + continuation)[-(max_length + 1):]
        groups.setdefault(tuple(tokens[: len(tokens) - len(continuation)]), []).append((index, continuation))
    return sorted(((list(context), members) for context, members in groups.items()), key=lambda g: -len(g[0]))


def batches(groups: Sequence[Group], contexts: int, positions: int) -> list[list[Group]]:
    """Consecutive groups packed into forward passes of at most `contexts` contexts, whose continuation pass
    (rows × longest continuation) holds at most `positions` positions; a group too large for one pass is
    split into pieces that share its context (which then runs once per piece)."""
    pieces = []
    for context, members in groups:
        piece: list[tuple[int, list[int]]] = []
        longest = 0
        for member in members:
            if piece and (len(piece) + 1) * max(longest, len(member[1])) > positions:
                pieces.append((context, piece))
                piece, longest = [], 0
            piece.append(member)
            longest = max(longest, len(member[1]))
        pieces.append((context, piece))
    packed: list[list[Group]] = []
    rows, longest = 0, 0
    for piece in pieces:
        piece_rows, piece_longest = len(piece[1]), max(len(c) for _, c in piece[1])
        if packed and len(packed[-1]) < contexts and (rows + piece_rows) * max(longest, piece_longest) <= positions:
            packed[-1].append(piece)
            rows, longest = rows + piece_rows, max(longest, piece_longest)
        else:
            packed.append([piece])
            rows, longest = piece_rows, piece_longest
    return packed


class SharedContextLM(HFLM):
    """HFLM whose `loglikelihood` runs each distinct context once (see the module docstring).

    `batch_size` is the number of distinct contexts per forward pass (their continuations run together in
    a second pass, whose logits are kept under `LOGITS_BYTES`). Models with sliding-window layers run one
    context per pass: padding between a context and its continuations would shift the window.
    """

    def _contexts_per_forward(self, override: int | None) -> int:
        config = self.model.config
        layer_types = getattr(config, "layer_types", None)
        windowed = (any(kind != "full_attention" for kind in layer_types) if layer_types is not None
                    else getattr(config, "sliding_window", None) is not None)  # Mistral: every layer
        if windowed:
            return 1
        size = override if override is not None else self.batch_size
        return size if isinstance(size, int) and size > 0 else 1  # "auto" is HFLM's; here one at a time

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        # per answer position: the logits (bf16 or fp32), their fp32 copy, the log-sum-exp's temporary
        answer_positions = max(1, LOGITS_BYTES // (12 * self.model.config.vocab_size))
        chunks = batches(group_by_context(requests, self.max_length), self._contexts_per_forward(override_bs),
                         answer_positions)
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Scoring continuations (shared contexts)") as bar:
            keyword = cache_keyword(self.model)
            for chunk in chunks:
                for index, answer in self._score(chunk, keyword):
                    answers[index] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
                bar.update(sum(len(members) for _, members in chunk))
        return answers

    @torch.inference_mode()
    def _score(self, chunk: list[Group], keyword: str) -> list[tuple[int, tuple[float, bool]]]:
        """Score one pass's context groups (see `batches`): `[(request index, (log-prob, greedy))]`.

        `keyword` is the model's cache argument (`runtime.cache_keyword`). Pass 1 runs the B contexts
        (right-padded to P tokens) and keeps the logits at each context's last
        position, which predict every continuation's first token. Pass 2 runs the N continuations minus
        their last token (right-padded to R) on the contexts' cached keys/values, each row attending to its
        own context only, at positions that continue it.
        """
        device, pad = self.device, 0  # any token: padding is masked and never scored
        lengths = torch.tensor([len(context) for context, _ in chunk], device=device)  # (B,)
        width = int(lengths.max())
        context_ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
        context_mask = torch.zeros_like(context_ids)
        for row, (context, _) in enumerate(chunk):
            context_ids[row, : len(context)] = torch.tensor(context, device=device)
            context_mask[row, : len(context)] = 1
        last = lengths - 1
        keep = torch.unique(last)  # the head runs at these positions only
        with self._autocast():
            out = self.model(input_ids=context_ids, attention_mask=context_mask, use_cache=True,
                             position_ids=torch.arange(width, device=device).expand(len(chunk), -1),
                             logits_to_keep=keep)
        first = out.logits[torch.arange(len(chunk), device=device), torch.searchsorted(keep, last)].float()  # (B, V)

        members = [(owner, index, continuation) for owner, (_, group) in enumerate(chunk)
                   for index, continuation in group]
        owners = torch.tensor([owner for owner, _, _ in members], device=device)  # (N,)
        steps = max(len(continuation) for _, _, continuation in members)
        targets = torch.zeros((len(members), steps), dtype=torch.long, device=device)  # padded with 0
        for row, (_, _, continuation) in enumerate(members):
            targets[row, : len(continuation)] = torch.tensor(continuation, device=device)
        continuation_lengths = torch.tensor([len(continuation) for _, _, continuation in members], device=device)
        valid = torch.arange(steps, device=device) < continuation_lengths[:, None]  # (N, steps)
        token_logprobs, greedy = _score_tokens(first[owners], targets[:, 0])  # (N,) each
        token_logprobs, greedy = token_logprobs[:, None], greedy[:, None]
        if steps > 1:
            cache = out[keyword]
            cache.batch_select_indices(owners)
            inputs = torch.where(valid[:, 1:], targets[:, :-1], pad)  # (N, R), R = steps - 1
            mask = torch.cat([context_mask[owners], valid[:, 1:].long()], dim=1)
            positions = lengths[owners, None] + torch.arange(steps - 1, device=device)
            with self._autocast():
                rest = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                                  use_cache=True, **{keyword: cache}).logits  # (N, R, V)
            rest_logprobs, rest_greedy = _score_tokens(rest.float(), targets[:, 1:])
            token_logprobs = torch.cat([token_logprobs, rest_logprobs], dim=1)  # (N, steps)
            greedy = torch.cat([greedy, rest_greedy], dim=1)
        greedy |= ~valid
        totals = torch.where(valid, token_logprobs, 0.0).sum(dim=1)
        exact = greedy.all(dim=1).tolist()
        return [(index, (total, match))
                for (_, index, _), total, match in zip(members, totals.tolist(), exact, strict=True)]

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)


def _score_tokens(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `targets` (shape S) under fp32 `logits` (S + (V,)), and whether each is the argmax."""
    logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logprobs, logits.argmax(dim=-1) == targets
