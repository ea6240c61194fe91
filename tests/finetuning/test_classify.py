"""Classification fine-tuning's class weights."""

import pytest

from lmforge.errors import UserError
from lmforge.finetuning.classify import class_weight_tensor


def test_balanced_class_weights_up_weight_rare_classes():
    w = class_weight_tensor("balanced", [0, 0, 0, 1], 2)
    assert w.tolist() == pytest.approx([4 / 6, 2.0])
    assert class_weight_tensor(None, [0, 1], 2) is None
    with pytest.raises(UserError, match="3 numbers but there are 2 classes"):
        class_weight_tensor([1.0, 2.0, 3.0], [0, 1], 2)
