"""The distillation teacher of SFT, holding the student's own arrays wherever the two models agree.

The student is the original with its targets' MLPs replaced by borrowed ones and recovery
factors; every other weight (embedding, attention, norms, the references' MLPs, the head) is the
same tensor in both. Loading the teacher as a second full model doubles the memory of SFT
(1.95x the model on the 1B shape). ``load_teacher`` reads the teacher lazily, one tensor at a
time: a tensor equal to the student's (same name, shape, dtype and values) is replaced by the
student's array and dropped; only the others (the targets' own MLPs, in practice) are kept. The
peak is the student plus the teacher's own tensors plus one tensor being compared.

A quantized student (SFT on a 4-bit base, as mlx-lm's QLoRA: the frozen weights in 4-bit, the
recovery factors trained in float) gets a 4-bit teacher: every module the student quantizes is
quantized in the teacher with the same parameters, the student's codes stand in for the
teacher's wherever the student has that module (the student's frozen weights are the original's,
so its codes are what the 4-bit original holds), and the teacher's own target MLPs are rounded to
the same bits. Distillation is then from the 4-bit original, the base the student trains on.
"""

from pathlib import Path
from typing import Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import SharpError
from ..io.checkpoint import load_model
from ..models.llama import Model

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def load_teacher(path: Union[str, Path], student: Model) -> Tuple[Model, dict]:
    """(teacher, {"shared_bytes", "own_bytes"}): the model of ``path``, frozen, sharing the student's
    equal tensors."""
    teacher, _ = load_model(path, lazy=True)
    quantized = {p: m for p, m in student.named_modules() if isinstance(m, QUANTIZED)}
    if quantized:
        if student.args.sharp_args.reference_rank:
            raise SharpError(
                "SFT on a 4-bit base needs the references' MLPs as they were: it does not take a model "
                "with --reference-rank; train it on its float base"
            )
        default = next(iter(quantized.values()))
        params = {p: (m.group_size, m.bits) for p, m in quantized.items()}

        def predicate(path, module):  # the student's parameters; the teacher's own target MLPs like the rest
            if path in params:
                return {"group_size": params[path][0], "bits": params[path][1]}
            own_mlp = ".mlp." in path and isinstance(module, nn.Linear)
            return own_mlp and {"group_size": default.group_size, "bits": default.bits}

        nn.quantize(teacher, class_predicate=predicate)
    mine = dict(tree_flatten(student.parameters()))
    flat = tree_flatten(teacher.parameters())
    shared = own = 0
    while flat:
        name, theirs = flat.pop()
        ours = mine.get(name)
        module, leaf = name.rsplit(".", 1)
        if ours is not None and ours.shape == theirs.shape and (module in quantized or ours.dtype == theirs.dtype):
            if module in quantized or mx.array_equal(ours, theirs).item():
                teacher.load_weights([(name, ours)], strict=False)  # the teacher's copy is dropped here
                shared += ours.nbytes
                continue
        if quantized and leaf in ("scales", "biases"):  # an own 4-bit module: the student's scales dtype
            theirs = theirs.astype(default.scales.dtype)
            teacher.load_weights([(name, theirs)], strict=False)
        mx.eval(theirs)
        own += theirs.nbytes
        del theirs
    teacher.freeze()
    return teacher, {"shared_bytes": shared, "own_bytes": own}
