"""Instruction tuning: (instruction, input) -> output, in the model's own chat format.

An example ``{"instruction", "input", "output", "task"}`` becomes one user turn and one
assistant turn. When the tokenizer has a chat template (SmolLM2-Instruct has one) it is applied:

    prompt = apply_chat_template([user], add_generation_prompt=True)
    full   = apply_chat_template([user, assistant])
    target = full[len(prompt):]        (the assistant's reply and its end-of-turn tokens)

and the loss is taken on the target only (``CausalLMTask``). Without a chat template (GPT-2) a
plain format is used: ``"### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n"`` then
the output and the end-of-sequence token.

Evaluation is the held-out loss per target token (and its perplexity, token accuracy and the loss
per natural-instructions subtask): SmolLM2-135M is near chance on MMLU, so this is what tells
methods apart. Lower is better; the best checkpoint is chosen on the dev loss.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from .lm import CausalLMTask, LMSplit

PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def user_message(example: dict) -> str:
    """The user turn: the instruction, then the input (if any) after a blank line."""
    instruction = example["instruction"].strip()
    inp = (example.get("input") or "").strip()
    return f"{instruction}\n\n{inp}" if inp else instruction


def _ids(value: Any) -> list[int]:
    """Token ids from what ``apply_chat_template(tokenize=True)`` returns (a list or an encoding)."""
    if hasattr(value, "keys") and "input_ids" in value:
        value = value["input_ids"]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if value and isinstance(value[0], list):
        value = value[0]
    return [int(t) for t in value]


class InstructionTask(CausalLMTask):
    """Instruction tuning on natural-instructions-style examples; held-out loss is the metric."""

    name = "instructions"
    task_type = "instruction"
    primary_metric = "loss"
    greater_is_better = False

    def __init__(self, data: Any, tokenizer: Any, max_length: int = 256, use_chat_template: bool | None = None):
        super().__init__(data, tokenizer, max_length)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template; "
                             "leave it unset to use the plain '### Instruction' format")
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template

    def format(self, example: dict) -> tuple[list[int], list[int]]:
        output = example["output"].strip()
        if self.use_chat_template:
            user = [{"role": "user", "content": user_message(example)}]
            prompt = _ids(self.tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
            full = _ids(self.tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": output}], tokenize=True))
            if full[: len(prompt)] != prompt:
                raise ValueError(
                    "the chat template renders the conversation with a prompt that is not a prefix of the full "
                    "conversation, so the reply cannot be separated from the prompt; pass use_chat_template=False"
                )
            return prompt, full[len(prompt):]
        inp = (example.get("input") or "").strip()
        template = PLAIN_PROMPT if inp else PLAIN_PROMPT_NO_INPUT
        prompt = list(self.tokenizer(template.format(instruction=example["instruction"].strip(), input=inp))["input_ids"])
        target = list(self.tokenizer(output, add_special_tokens=False)["input_ids"]) + self.eos_ids()
        return prompt, target

    def run_info(self) -> dict[str, Any]:
        return {"task": self.name, "max_length": self.max_length, "chat_template": self.use_chat_template,
                "task_options": {"use_chat_template": self.use_chat_template}}

    def split_metrics(self, model: torch.nn.Module, split: LMSplit, batch_size: int = 16,
                      device: str | torch.device = "cpu") -> dict[str, Any]:
        """Held-out loss metrics, and (outside dev) the loss per natural-instructions subtask."""
        losses = self.example_losses(model, split, batch_size, device)
        metrics: dict[str, Any] = self.summarize_losses(losses)
        if split.name != "dev":
            sums: dict[str, float] = defaultdict(float)
            counts: dict[str, int] = defaultdict(int)
            for ex, nll, tokens in zip(split.examples, losses["nll"], losses["tokens"]):
                sums[str(ex.get("task", "all"))] += nll
                counts[str(ex.get("task", "all"))] += tokens
            metrics["loss_by_subtask"] = {t: sums[t] / max(1, counts[t]) for t in sorted(sums)}
        return metrics
