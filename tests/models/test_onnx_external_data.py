"""The external-data check on ONNX graphs: a tensor that keeps its bytes outside the model
file, anywhere in the graph (initializers, Constant attributes, subgraphs, functions), is
found and named; a model holding all its data passes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

from models.onnx_export import ExternalDataError, check_no_external_data, find_external_data

pytestmark = pytest.mark.fast


def _external(tensor: TensorProto, location: str = "weights.bin") -> TensorProto:
    """`tensor` as a model saved with external data holds it: no bytes, a location."""
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _weights(name: str) -> TensorProto:
    return numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), name)


def _model(
    initializers: list[TensorProto], nodes: list[onnx.NodeProto] | None = None
) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])
    graph = helper.make_graph(
        nodes or [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        "main",
        [x],
        [y],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _if_with_constant(constant: TensorProto) -> onnx.NodeProto:
    """`y = x + (cond ? constant : w)`: the constant lives in the If node's then-branch."""
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 1])
    then_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], name="const", value=constant)],
        "then_branch",
        [],
        [out],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["c"], name="copy")], "else_branch", [], [out]
    )
    return helper.make_node(
        "If", ["cond"], ["c"], name="choose", then_branch=then_graph, else_branch=else_graph
    )


def test_a_model_holding_all_its_data_passes() -> None:
    content = _model([_weights("w")]).SerializeToString()
    assert find_external_data(content) == []
    check_no_external_data(content)


def test_an_external_initializer_is_named_with_its_location() -> None:
    content = _model([_external(_weights("w"))]).SerializeToString()
    with pytest.raises(ExternalDataError) as info:
        check_no_external_data(content)
    message = str(info.value)
    assert "tensor 'w'" in message
    assert "initializer of graph 'main'" in message
    assert "'weights.bin'" in message


def test_external_data_entries_alone_are_refused() -> None:
    tensor = _weights("w")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/weights"
    content = _model([tensor]).SerializeToString()
    assert find_external_data(content) == [
        "tensor 'w' (initializer of graph 'main', location '../../etc/weights')"
    ]


def test_a_constant_inside_a_subgraph_is_found() -> None:
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        _if_with_constant(_external(_weights("hidden"), "cwd-relative.bin")),
        helper.make_node("Add", ["x", "c"], ["y"], name="add"),
    ]
    content = _model([_weights("w"), cond], nodes).SerializeToString()
    (found,) = find_external_data(content)
    assert "tensor 'hidden'" in found
    assert "subgraph 'then_branch'" in found
    assert "node 'choose'" in found
    assert "'cwd-relative.bin'" in found


def test_a_sparse_initializer_and_a_function_body_are_searched() -> None:
    values = _external(numpy_helper.from_array(np.ones(1, dtype=np.float32), "sparse_values"))
    indices = numpy_helper.from_array(np.zeros(1, dtype=np.int64), "sparse_indices")
    model = _model([_weights("w")])
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [1, 1]))
    function = helper.make_function(
        "local",
        "scaled",
        ["a"],
        ["b"],
        [helper.make_node("Constant", [], ["b"], value=_external(_weights("in_function")))],
        [helper.make_opsetid("", 17)],
    )
    model.functions.append(function)
    found = find_external_data(model.SerializeToString())
    assert any("tensor 'sparse_values'" in f and "sparse initializer" in f for f in found)
    assert any("tensor 'in_function'" in f and "function 'scaled'" in f for f in found)


def test_a_model_converted_by_onnx_to_external_data_is_refused() -> None:
    model = _model([_weights("w")])
    convert_model_to_external_data(model, location="w.data", size_threshold=0)
    with pytest.raises(ExternalDataError, match=r"tensor 'w' .*'w.data'"):
        check_no_external_data(model.SerializeToString())


def test_many_external_tensors_name_three_and_count_the_rest() -> None:
    tensors = [_external(_weights(f"w{i}")) for i in range(5)]
    nodes = [helper.make_node("Add", ["x", "w0"], ["y"], name="add")]
    with pytest.raises(ExternalDataError, match=r"'w2' .* and 2 more: the model refers"):
        check_no_external_data(_model(tensors, nodes).SerializeToString())
