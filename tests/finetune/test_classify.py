"""The classification head and its metrics."""

import pytest
import torch

from lmforge.errors import UserError
from lmforge.finetune import classify
from tests.conftest import tiny_model


def test_the_head_reads_the_last_real_token_so_padding_changes_nothing():
    model = classify.SequenceClassifier(tiny_model(), n_classes=3).eval()
    short, long = [5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]
    x, lengths = classify.text_batch([short, long], pad_id=0)
    batched = model(x, lengths)
    for i, ids in enumerate((short, long)):
        alone = model(torch.tensor([ids]), torch.tensor([len(ids)]))
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)
    # ... and the last token matters: a different final token gives other logits.
    other = model(torch.tensor([[5, 6, 8]]), torch.tensor([3]))
    assert not torch.allclose(other[0], batched[0])


def test_balanced_class_weights_up_weight_rare_classes():
    w = classify.class_weight_tensor("balanced", [0, 0, 0, 1], 2)
    assert w.tolist() == pytest.approx([4 / 6, 2.0])
    assert classify.class_weight_tensor(None, [0, 1], 2) is None
    with pytest.raises(UserError, match="3 numbers but there are 2 classes"):
        classify.class_weight_tensor([1.0, 2.0, 3.0], [0, 1], 2)


def test_metrics_are_macro_averaged_with_a_confusion_matrix():
    m = classify.classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert m["accuracy"] == pytest.approx(0.6)
    # per class precision 1/2, 2/3, 0; recall 1/2, 1, 0
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert m["macro_recall"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
