"""What the service checks around the schema: the headers that say how a body is sent
(415 before it is read) and, at start-up, that the category bound fits the model."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from services.app import check_body_headers
from services.schema import RequestError
from services.service import check_categories_fit

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("content_type", "content_encoding"),
    [
        (None, None),
        (b"application/json", None),
        (b"Application/JSON; charset=UTF-8", None),
        (b'application/json;charset="utf-8"', b"identity"),
        (b"application/vnd.api+json", b""),
        (b"application/json; boundary=ignored", None),
    ],
)
def test_json_in_utf8_uncompressed_passes(
    content_type: bytes | None, content_encoding: bytes | None
) -> None:
    check_body_headers(content_type, content_encoding)


@pytest.mark.parametrize(
    ("content_type", "content_encoding", "named"),
    [
        (b"text/plain", None, "'text/plain' is not JSON"),
        (b"application/x-www-form-urlencoded", None, "send the body as application/json"),
        (b"multipart/form-data; boundary=x", None, "'multipart/form-data'"),
        (b"", None, "'' is not JSON"),
        (b"application/json; charset=utf-16", None, "charset 'utf-16'"),
        (b"application/json; charset=latin-1", None, "JSON bodies are UTF-8"),
        (b"application/json", b"gzip", "Content-Encoding 'gzip'"),
        (b"application/json", b"br", "send the body uncompressed"),
        (None, b"gzip, deflate", "'gzip, deflate'"),
        (b"text/" + b"x" * 10_000, None, "'text/xxx"),
    ],
)
def test_other_bodies_are_a_415_naming_the_header(
    content_type: bytes | None, content_encoding: bytes | None, named: str
) -> None:
    with pytest.raises(RequestError) as info:
        check_body_headers(content_type, content_encoding)
    assert info.value.status == 415
    message = info.value.payload["error"]
    assert named in message
    assert len(message) < 200
    if content_encoding is not None:
        assert info.value.headers == ((b"accept-encoding", b"identity"),)


def one_hot_model(categories: list[str]) -> bytes:
    """The graph skl2onnx makes for one categorical column, cut to its one-hot node."""
    node = helper.make_node(
        "OneHotEncoder",
        ["contract"],
        ["onehot"],
        domain="ai.onnx.ml",
        cats_strings=categories,
        zeros=0,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("contract", TensorProto.STRING, [None, 1])],
        [helper.make_tensor_value_info("onehot", TensorProto.FLOAT, [None, 1, None])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    return model.SerializeToString()


def test_bound_below_a_known_category_refuses_to_start() -> None:
    content = one_hot_model(["Month-to-month", "One year"])
    check_categories_fit(content, len("Month-to-month"))
    with pytest.raises(ValueError, match=r"'contract' category of 14 characters") as info:
        check_categories_fit(content, 13)
    assert "serving.max_category_chars (13)" in str(info.value)
