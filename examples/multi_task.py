"""Several task adapters in one model that share A across layers *and* tasks (runs in seconds on CPU).

    python examples/multi_task.py

A tiny random BERT stands in for a real encoder so the example needs no download; with a real
model (``AutoModelForSequenceClassification.from_pretrained(...)``) the code is the same.
"""

import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification

from sharelora import ShareLoraConfig, ShareLoraModel, get_sharelora_model

torch.manual_seed(0)
base = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, vocab_size=100, num_labels=2))

# ShareA across layers + task_share="A": one A per module type for every layer and every task;
# each task owns only its B's and its classifier head.
cfg = ShareLoraConfig(rank=8, share="A", task_share="A", target_modules=["query", "value"],
                      modules_to_save=["classifier"])
model = get_sharelora_model(base, cfg, adapter_name="sentiment")
model.add_adapter("topic", cfg)

ids = torch.randint(0, 100, (4, 12))
labels = torch.tensor([0, 1, 1, 0])

# Joint multi-task training: both adapters active, each row routed to its task.
model.set_adapter(["sentiment", "topic"])
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
rows = ["sentiment", "topic", "sentiment", "topic"]
for _ in range(3):
    loss = model(input_ids=ids, labels=labels, adapter_names=rows).loss
    loss.backward()
    opt.step()
    opt.zero_grad()

# Continual: a third task trains only its own tensors; the shared A stays as it is.
model.add_adapter("spam", cfg)
model.set_adapter("spam", train_shared=False)
model.print_trainable_parameters()

# One mixed batch at inference, "__base__" = no adapter.
model.eval()
with torch.no_grad():
    logits = model(input_ids=ids, adapter_names=["sentiment", "topic", "spam", "__base__"]).logits
print("mixed-batch logits", tuple(logits.shape))

report = model.parameter_report()
print(f"{len(report['adapters'])} tasks: {report['adapter_parameters']:,} adapter parameters in all "
      f"(separate LoRAs: {report['separate_lora_parameters']:,})")

with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)                                # every adapter, the shared A once
    again = ShareLoraModel.from_pretrained(BertForSequenceClassification(base.config), d, adapter_name="topic")
    model.export_peft(f"{d}/topic-peft", adapter_name="topic")  # a standard PEFT LoRA of one task
    print("loaded", again.adapter_names, "and exported topic to PEFT")
