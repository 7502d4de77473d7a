"""Language-model training stages: `pretrain` (causal LM on a task corpus) and `sft`
(chat-formatted, loss on the last assistant turn only). Both are thin: they turn their data into
a deterministic `micro_step(step, micro)` and hand it to the one training loop (factory/loop.py).

Batches are a pure function of (seed, step, micro), so a resumed run draws exactly the batches
the killed one would have drawn, without data-loader state. That draw is the step's global
micro-batch: in a multi-process run every rank draws it and trains on its rows ``rank::world``,
normalising by the global step's token count times the world size (factory/loop.py), so N
processes with batch b give the update of one process with batch b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from factory.loop import StepOutput, current_device, current_rank
from factory.processes import check_shardable, shard

IGNORE = -100


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """A generator seeded by (seed, step, micro): the batch a step draws never depends on history."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


def pack_blocks(docs_ids: list[list[int]], eos_id: int, block_len: int) -> torch.Tensor:
    """Concatenate documents (each followed by eos) and cut into blocks `[n_blocks, block_len]`."""
    flat = [t for ids in docs_ids for t in (*ids, eos_id)]
    n_blocks = len(flat) // block_len
    if n_blocks == 0:
        raise ValueError(f"corpus of {len(flat)} tokens is shorter than one block of {block_len}")
    return torch.tensor(flat[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)


def causal_lm_loss(model, input_ids_bt: torch.Tensor, labels_bt: torch.Tensor,
                   attention_mask_bt: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    The caller divides by the step's token count, so every token weighs the same across
    micro-batches of different lengths.
    """
    logits_btv = model(input_ids=input_ids_bt, attention_mask=attention_mask_bt).logits
    targets_bt = labels_bt[:, 1:]
    # fp32 log-softmax: bf16 logits lose the tail mass
    loss = F.cross_entropy(logits_btv[:, :-1].float().reshape(-1, logits_btv.size(-1)),
                           targets_bt.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets_bt != IGNORE).sum())


@dataclass
class PretrainData:
    blocks_nt: torch.Tensor  # [n_blocks, block_len] token ids
    batch_size: int  # rows of the global micro-batch (all ranks together)
    seed: int
    grad_accum: int = 1

    def __post_init__(self) -> None:
        check_shardable("the pretraining batch_size", self.batch_size)

    def rows(self, step: int, micro: int) -> torch.Tensor:
        """The blocks of the global micro-batch (every rank draws the same)."""
        g = step_generator(self.seed, step, micro)
        return torch.randint(0, self.blocks_nt.size(0), (self.batch_size,), generator=g)

    def micro_step(self, model, step: int, micro: int) -> StepOutput:
        rank = current_rank()
        ids_bt = self.blocks_nt[shard(self.rows(step, micro), rank)].to(current_device())
        loss_sum, _ = causal_lm_loss(model, ids_bt, ids_bt)
        # every block has block_len - 1 targets: the global step's count is known up front
        step_tokens = self.grad_accum * self.batch_size * (self.blocks_nt.size(1) - 1)
        return StepOutput(loss=loss_sum * rank.world / step_tokens, tokens=ids_bt.numel(),
                          metrics={"ce": loss_sum.item() * self.grad_accum * rank.world
                                   / step_tokens})


@dataclass
class SFTData:
    examples: list[dict]  # each {"input_ids": [...], "labels": [...]}, labels IGNORE on context
    batch_size: int  # rows of the global micro-batch (all ranks together)
    seed: int
    pad_id: int
    grad_accum: int = 1

    def __post_init__(self) -> None:
        check_shardable("the SFT batch_size", self.batch_size)
        # the next-token targets each example contributes to the loss (labels[1:] not IGNORE)
        self.targets = [sum(t != IGNORE for t in e["labels"][1:]) for e in self.examples]

    def rows(self, step: int, micro: int) -> list[int]:
        """The examples of the global micro-batch (every rank draws the same)."""
        g = step_generator(self.seed, step, micro)
        return torch.randint(0, len(self.examples), (self.batch_size,), generator=g).tolist()

    def step_tokens(self, step: int) -> int:
        """Labelled targets of the whole global step: every micro-batch, every rank's shard."""
        return sum(self.targets[i] for m in range(self.grad_accum) for i in self.rows(step, m))

    def batch(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded input ids, labels and attention mask of the examples `rows`."""
        chosen = [self.examples[i] for i in rows]
        width = max(len(e["input_ids"]) for e in chosen)
        ids = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for i, e in enumerate(chosen):  # right padding: positions stay 0..len-1
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        return ids, labels, mask

    def micro_step(self, model, step: int, micro: int) -> StepOutput:
        rank = current_rank()
        rows = shard(self.rows(step, micro), rank)
        ids, labels, mask = (t.to(current_device()) for t in self.batch(rows))
        loss_sum, _ = causal_lm_loss(model, ids, labels, mask)
        # the loop's convention: normalise by the labelled tokens of the whole global step
        step_tokens = max(self.step_tokens(step), 1)
        return StepOutput(loss=loss_sum * rank.world / step_tokens, tokens=int(mask.sum()),
                          metrics={"ce": loss_sum.item() * self.grad_accum * rank.world
                                   / step_tokens})
