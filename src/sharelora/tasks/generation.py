"""E2E NLG data-to-text: a meaning representation (MR) in, a restaurant description out.

    prompt  = "Meaning representation: name: Blue Spice, eatType: pub, area: riverside\\nDescription:"
    target  = " Blue Spice is a pub by the riverside." + <eos>

Training is the causal-LM loss on the target tokens only (``CausalLMTask``: prompt tokens carry
label -100). Evaluation decodes one description per distinct MR of the split (greedy or beam
search through ``model.generate``) and scores it against ALL references of that MR, as the E2E
challenge does:

- BLEU and chrF: ``sacrebleu.corpus_bleu`` / ``corpus_chrf`` with one reference stream per
  reference slot (MRs with fewer references pad their slots with None, which sacrebleu skips);
- ROUGE-L: ``rouge_score``'s ``rougeL`` F-measure against each reference, the best reference
  kept, averaged over MRs (the E2E scripts' ROUGE-L uses a recall-weighted F, beta = 1.2, so its
  numbers differ slightly);
- METEOR is not reported: its implementations need WordNet data that cannot be fetched here.

Scores are on sacrebleu's 0-100 scale. The decoded outputs are written beside the scores
(``samples-<split>.jsonl``: MR, prediction, references), so a reader can check what a BLEU means.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .lm import CausalLMTask, LMSplit, left_padded, pad_id

PROMPT_TEMPLATE = "Meaning representation: {mr}\nDescription:"


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU, chrF and mean best-reference ROUGE-L F1 (all 0-100) of ``hypotheses``.

    Args:
        hypotheses: one output per MR.
        references: for each MR, the list of all its reference texts (at least one).
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists; they must be equally many")
    if not hypotheses:
        raise ValueError("cannot score an empty set of outputs")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"MR {i} has no reference text; every MR needs at least one")
    slots = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(slots)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), streams)
    chrf = sacrebleu.corpus_chrf(list(hypotheses), streams)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)]
    return {
        "bleu": float(bleu.score),
        "chrf": float(chrf.score),
        "rougeL": 100.0 * sum(rouge) / len(rouge),
        "bleu_brevity_penalty": float(bleu.bp),
        "mean_output_words": sum(len(h.split()) for h in hypotheses) / len(hypotheses),
    }


def group_by_mr(examples: Sequence[dict]) -> list[dict[str, Any]]:
    """Distinct MRs in first-seen order, each with all its references.

    An example's ``references`` field (all references of its MR) is used when present; otherwise
    the targets of the split's examples with the same MR are collected.
    """
    groups: dict[str, dict[str, Any]] = {}
    for ex in examples:
        g = groups.setdefault(ex["mr"], {"mr": ex["mr"], "references": []})
        refs = ex.get("references") or [ex["target"]]
        for r in refs:
            if r not in g["references"]:
                g["references"].append(r)
    return list(groups.values())


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    stop_at_newline: bool = True,
) -> list[str]:
    """Decode a continuation of every prompt (token ids) with greedy (``num_beams=1``) or beam search.

    Prompts are batched with LEFT padding (a decoder continues from the last real token), the
    model's own generation config is ignored (only the values given here count), and the text
    is cut at the first newline when ``stop_at_newline`` (the prompts are line-based).
    """
    from transformers import GenerationConfig

    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}")
    if not hasattr(model, "generate"):
        raise ValueError(f"{type(model).__name__} has no generate(); decoding needs a transformers causal LM")
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    beam_options = {"length_penalty": length_penalty, "early_stopping": True} if num_beams > 1 else {}
    config = GenerationConfig(
        do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens, pad_token_id=pad,
        eos_token_id=eos, no_repeat_ngram_size=no_repeat_ngram_size, **beam_options,
    )
    was_training = model.training
    model.eval()
    # Longest prompts first so the padding inside a batch stays small; results are put back in order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        input_ids, attention_mask = left_padded([prompts[i] for i in indices], pad)
        width = input_ids.shape[1]
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config)
        for j, i in enumerate(indices):
            text = tokenizer.decode(out[j, width:].tolist(), skip_special_tokens=True)
            if stop_at_newline:
                text = text.split("\n", 1)[0]
            texts[i] = text.strip()
    model.train(was_training)
    return texts


class E2ETask(CausalLMTask):
    """E2E NLG on a ``TaskData`` of ``{"mr", "target", "references"}`` examples (split by MR).

    Args:
        data, tokenizer, max_length: as ``CausalLMTask``.
        num_beams: beam width for the test split (the paper's LoRA recipe uses beam search).
        dev_num_beams: beam width for the dev evaluations during training (1 = greedy, cheap).
        max_new_tokens: longest description decoded.
        max_dev_mrs: decode at most this many dev MRs per evaluation (None: all).
        length_penalty, no_repeat_ngram_size: beam-search settings (LoRA's E2E recipe: 0.9, 4).
        samples_dir: where the decoded outputs are written (None: not written).
        samples_name: their file name in ``samples_dir``; ``{split}`` is replaced by the split's name.
        generation_batch_size: prompts decoded together.
    """

    name = "e2e"
    task_type = "generation"
    primary_metric = "bleu"
    greater_is_better = True

    def __init__(self, data: Any, tokenizer: Any, max_length: int = 96, *, num_beams: int = 4,
                 dev_num_beams: int = 1, max_new_tokens: int = 64, max_dev_mrs: int | None = None,
                 length_penalty: float = 0.9, no_repeat_ngram_size: int = 4,
                 samples_dir: str | Path | None = None, samples_name: str = "samples-{split}.jsonl",
                 generation_batch_size: int = 16):
        super().__init__(data, tokenizer, max_length)
        self.num_beams = num_beams
        self.dev_num_beams = dev_num_beams
        self.max_new_tokens = max_new_tokens
        self.max_dev_mrs = max_dev_mrs
        self.length_penalty = length_penalty
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.samples_dir = Path(samples_dir) if samples_dir is not None else None
        self.samples_name = samples_name
        self.generation_batch_size = generation_batch_size

    @property
    def options(self) -> dict[str, Any]:
        """The constructor options that decide decoding: ``E2ETask(data, tok, **task.options)`` decodes alike."""
        return {"num_beams": self.num_beams, "dev_num_beams": self.dev_num_beams,
                "max_new_tokens": self.max_new_tokens, "max_dev_mrs": self.max_dev_mrs,
                "length_penalty": self.length_penalty, "no_repeat_ngram_size": self.no_repeat_ngram_size,
                "generation_batch_size": self.generation_batch_size}

    def prompt_ids(self, mr: str) -> list[int]:
        return list(self.tokenizer(PROMPT_TEMPLATE.format(mr=mr))["input_ids"])

    def format(self, example: dict) -> tuple[list[int], list[int]]:
        target = list(self.tokenizer(" " + example["target"].strip(), add_special_tokens=False)["input_ids"])
        return self.prompt_ids(example["mr"]), target + self.eos_ids()

    def run_info(self) -> dict[str, Any]:
        return {"task": self.name, "max_length": self.max_length, "num_beams": self.num_beams,
                "max_new_tokens": self.max_new_tokens, "prompt_template": PROMPT_TEMPLATE,
                "task_options": self.options}

    def samples_path(self, split: str) -> Path | None:
        """Where the decoded outputs of ``split`` are written (None: nowhere)."""
        return None if self.samples_dir is None else self.samples_dir / self.samples_name.format(split=split)

    def decode(self, model: torch.nn.Module, mrs: Sequence[str], num_beams: int | None = None,
               device: str | torch.device = "cpu") -> list[str]:
        """One description per MR."""
        return generate_texts(
            model, self.tokenizer, [self.prompt_ids(mr) for mr in mrs],
            num_beams=self.num_beams if num_beams is None else num_beams, max_new_tokens=self.max_new_tokens,
            batch_size=self.generation_batch_size, device=device, length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )

    def split_metrics(self, model: torch.nn.Module, split: LMSplit, batch_size: int = 16,
                      device: str | torch.device = "cpu") -> dict[str, float]:
        """Teacher-forced loss metrics plus BLEU / chrF / ROUGE-L of decoded outputs for the split's MRs.

        The dev split is decoded with ``dev_num_beams`` over at most ``max_dev_mrs`` MRs, any
        other split with ``num_beams`` over all its MRs.
        """
        metrics = self.loss_metrics(model, split, batch_size, device)
        groups = group_by_mr(split.examples)
        beams = self.num_beams
        if split.name == "dev":
            beams = self.dev_num_beams
            if self.max_dev_mrs is not None:
                groups = groups[: self.max_dev_mrs]
        predictions = self.decode(model, [g["mr"] for g in groups], beams, device)
        metrics.update(generation_metrics(predictions, [g["references"] for g in groups]))
        metrics.update({"mrs": len(groups), "num_beams": beams})
        path = self.samples_path(split.name)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for g, p in zip(groups, predictions):
                    f.write(json.dumps({"mr": g["mr"], "prediction": p, "references": g["references"]},
                                       ensure_ascii=False) + "\n")
        return metrics
