# ruff: noqa: F401 - this module re-exports the public API under TensorFlow 1's names
"""A TensorFlow-1-compatible define-then-run graph engine, on workshop_lib.kernels.

Mirrors ``tf.compat.v1``: code written for TensorFlow 1 runs with
``import workshop_lib.tf as tf``. The one idea: a graph is *defined* first
(nothing is computed), then *run* in a Session, which is what lets the engine
rewrite it before running (fusing operators, choosing kernels, spreading
independent ops over threads).
"""

from . import layers, logging, losses, nn, train
from .core import (
    DType,
    FailedPreconditionError,
    Graph,
    InvalidArgumentError,
    OpError,
    Operation,
    Tensor,
    TensorShape,
    Variable,
    as_dtype,
    bool_ as bool,  # noqa: A001 - TensorFlow's name
    control_dependencies,
    convert_to_tensor,
    float16,
    float32,
    float64,
    get_default_graph,
    get_default_session,
    get_variable_scope,
    int8,
    int32,
    int64,
    name_scope,
    reset_default_graph,
    uint8,
    variable_scope,
)
from .gradients import gradients
from .layers import (
    constant_initializer,
    get_variable,
    glorot_uniform_initializer,
    ones_initializer,
    random_normal_initializer,
    truncated_normal_initializer,
    zeros_initializer,
)
from .ops import (
    add,
    add_n,
    argmax,
    assign,
    assign_add,
    assign_sub,
    cast,
    constant,
    divide,
    equal,
    exp,
    group,
    identity,
    log,
    matmul,
    multiply,
    negative,
    no_op,
    ones,
    one_hot,
    ones_like,
    placeholder,
    py_func,
    random_normal,
    random_uniform,
    reduce_max,
    reduce_mean,
    reduce_sum,
    reshape,
    sqrt,
    square,
    subtract,
    transpose,
    truncated_normal,
    zeros,
    zeros_like,
)
from .session import ConfigProto, GPUOptions, GraphOptions, InteractiveSession, RewriterConfig, Session

GraphKeys = type("GraphKeys", (), {"GLOBAL_VARIABLES": "variables", "TRAINABLE_VARIABLES": "trainable_variables",
                                   "GLOBAL_STEP": "global_step", "LOSSES": "losses"})
errors = type("errors", (), {"OpError": OpError, "InvalidArgumentError": InvalidArgumentError,
                             "FailedPreconditionError": FailedPreconditionError})


class app:  # noqa: N801 - TensorFlow's namespace
    """``tf.app.run(main)``: calls ``main(sys.argv)`` and exits with its return value, as TF1 scripts expect."""

    @staticmethod
    def run(main=None, argv=None):
        import __main__
        import sys

        main = main or __main__.main
        sys.exit(main(list(sys.argv if argv is None else argv)))


class estimator:  # noqa: N801 - TensorFlow's namespace; only the mode keys TF1-era model functions test
    class ModeKeys:
        TRAIN, EVAL, PREDICT = "train", "eval", "infer"


def global_variables():
    return get_default_graph().get_collection("variables")


def trainable_variables():
    return get_default_graph().get_collection("trainable_variables")


def variables_initializer(var_list, name="init"):
    return group(*[v.initializer for v in var_list], name=name)


def global_variables_initializer():
    """An op that runs every global variable's initializer."""
    return variables_initializer(global_variables())


def set_random_seed(seed):
    """The graph-level seed: with it, random ops (initializers, dropout) repeat from run to run."""
    get_default_graph().seed = int(seed)


def get_collection(key, scope=None):
    return get_default_graph().get_collection(key, scope)


def add_to_collection(name, value):
    get_default_graph().add_to_collection(name, value)


sub = subtract
mul = multiply
div = divide


class mixed_precision:  # noqa: N801 - TensorFlow 1's ``tf.compat.v1.mixed_precision``
    """``enable_mixed_precision_graph_rewrite(opt)``: bf16 mixed precision (see :mod:`.options`)."""

    enable_mixed_precision_graph_rewrite = staticmethod(train.experimental.enable_mixed_precision_graph_rewrite)
    disable_mixed_precision_graph_rewrite = staticmethod(train.experimental.disable_mixed_precision_graph_rewrite)


class compat:  # noqa: N801 - ``tf.compat.v1`` is this module, as ``import tensorflow.compat.v1 as tf`` expects
    import sys as _sys

    v1 = _sys.modules[__name__]
