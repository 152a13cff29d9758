"""The distillation teacher of SFT, holding the student's own arrays wherever the two models agree.

The student is the original with its targets' MLPs replaced by borrowed ones and recovery
factors; every other weight (embedding, attention, norms, the references' MLPs, the head) is the
same tensor in both. Loading the teacher as a second full model doubles the memory of SFT
(1.95x the model on the 1B shape). ``load_teacher`` reads the teacher lazily, one tensor at a
time: a tensor equal to the student's (same name, shape, dtype and values) is replaced by the
student's array and dropped; only the others (the targets' own MLPs, in practice) are kept. The
peak is the student plus the teacher's own tensors plus one tensor being compared.
"""

from pathlib import Path
from typing import Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import load_model
from .model import Model


def load_teacher(path: Union[str, Path], student: Model) -> Tuple[Model, dict]:
    """(teacher, {"shared_bytes", "own_bytes"}): the model of ``path``, frozen, sharing the student's
    equal tensors."""
    teacher, _ = load_model(path, lazy=True)
    mine = dict(tree_flatten(student.parameters()))
    flat = tree_flatten(teacher.parameters())
    shared = own = 0
    while flat:
        name, theirs = flat.pop()
        ours = mine.get(name)
        if ours is not None and ours.shape == theirs.shape and ours.dtype == theirs.dtype:
            if mx.array_equal(ours, theirs).item():
                teacher.load_weights([(name, ours)], strict=False)  # the teacher's copy is dropped here
                shared += ours.nbytes
                continue
        mx.eval(theirs)
        own += theirs.nbytes
        del theirs
    teacher.freeze()
    return teacher, {"shared_bytes": shared, "own_bytes": own}
