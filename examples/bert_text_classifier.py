"""A text classifier: featurefail on a tiny Hugging Face BERT (built from a config, no download).

Batches are dicts of the model's keyword arguments (``input_ids``, ``attention_mask``) with a ``labels`` entry,
as a Hugging Face data collator yields them; featurefail passes the rest to ``model(**batch)`` and reads the
labels. The head (``classifier``) is found from the forward pass, ``layer="auto"`` adds the mean token of two
evenly spaced encoder layers, and ``as_module()`` deploys the model with its detector (hooks inside the module,
since torch.fx cannot trace BERT) so that ``torch.export`` works.

The task is synthetic: a sequence is labelled 1 when token 7 occurs more often than token 9; its distribution
shift is sequences of tokens the training data never used. Run: ``python examples/bert_text_classifier.py``
(needs ``pip install transformers``; a minute or two on a CPU).
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

from featurefail import FailureDetector
from featurefail.hooks import describe

VOCAB, LENGTH = 60, 16


def make_batches(n: int, seed: int, vocab: tuple[int, int] = (1, 40), batch_size: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab[0], vocab[1], (n, LENGTH), generator=g)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # 0 = padding
    labels = ((ids == 7).sum(1) > (ids == 9).sum(1)).long()
    rows = [slice(i, i + batch_size) for i in range(0, n, batch_size)]
    return [{"input_ids": ids[r], "attention_mask": mask[r], "labels": labels[r]} for r in rows]


def train(model: torch.nn.Module, batches: list[dict], epochs: int = 4) -> torch.nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in batches:
            opt.zero_grad()
            model(**batch).loss.backward()  # the labels entry gives Hugging Face's own loss
            opt.step()
    return model.eval()


def main() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=LENGTH, num_labels=2,
    )  # fmt: skip
    model = train(BertForSequenceClassification(config), make_batches(1024, seed=0))
    example = {k: v[:2] for k, v in make_batches(2, seed=9)[0].items() if k != "labels"}
    print(describe(model, example), "\n")

    detector = FailureDetector(n_components=4, progress=False).fit(model, make_batches(1024, seed=1))
    detector.calibrate(make_batches(512, seed=2), strategy="f1", folds=3)
    test, shifted = make_batches(512, seed=3), make_batches(512, seed=4, vocab=(40, VOCAB))
    s_test, s_shift = detector.score(test), detector.score(shifted)
    accuracy = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(1) == b["labels"]
                          for b in test]).float().mean()  # fmt: skip
    print(f"test accuracy {accuracy:.3f}; median score: test {s_test.median():.1f}, shifted {s_shift.median():.1f}")
    flagged = [detector.detect(batches).float().mean() for batches in (test, shifted)]
    print(f"flagged: test {flagged[0]:.1%}, shifted {flagged[1]:.1%}")

    module = detector.as_module()
    batch = {k: v for k, v in test[0].items() if k != "labels"}
    _, score, flag = module(**batch)
    torch.testing.assert_close(score, s_test[: len(score)], rtol=1e-4, atol=1e-3)
    exported = torch.export.export(module, (), batch)
    print(f"as_module() equals score(); torch.export: {type(exported).__name__}, flags {int(flag.sum())}/{len(flag)}")


if __name__ == "__main__":
    main()
