"""The classification head."""

import torch

from lmforge.model.classifier import SequenceClassifier, text_batch
from tests.fixtures import tiny_model


def test_the_head_reads_the_last_real_token_so_padding_changes_nothing():
    model = SequenceClassifier(tiny_model(), 3).eval()
    short, long = [5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]
    x, lengths = text_batch([short, long], pad_id=0)
    batched = model(x, lengths)
    for i, ids in enumerate((short, long)):
        alone = model(torch.tensor([ids]), torch.tensor([len(ids)]))
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)
    # ... and the last token matters: a different final token gives other logits.
    other = model(torch.tensor([[5, 6, 8]]), torch.tensor([3]))
    assert not torch.allclose(other[0], batched[0])
