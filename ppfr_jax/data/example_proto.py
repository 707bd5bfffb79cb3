"""``tf.train.Example`` without TensorFlow: the same protobuf messages, built by the ``protobuf`` package.

TensorFlow's ``tensorflow/core/example/example.proto`` and ``feature.proto``
declare ``Example { Features features = 1; }``, ``Features { map<string,
Feature> feature = 1; }`` and ``Feature { oneof kind { BytesList bytes_list =
1; FloatList float_list = 2; Int64List int64_list = 3; } }`` (packed
``float`` / ``int64`` lists). This module declares the same messages (same
field numbers and types, so the same wire format) in a private descriptor
pool, so the training sources and the numpy loader read TFRecord payloads on
machines without TensorFlow, e.g. a GPU host whose image has only jax. Parsing
and serialising are protobuf's (the C++ ``upb`` runtime where installed).

    ex = parse(payload)           # Example message: ex.features.feature["image"].bytes_list.value[0]
    features(payload) -> {"image": [b"..."], "landmarks": [0.1, ...]}

Errors: ``google.protobuf.message.DecodeError`` for bytes that are not an
Example (callers name the record).
"""
from __future__ import annotations

import functools

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["Example", "parse", "features", "serialize"]

_PACKAGE = "ppfr_jax.tf_example"  # not "tensorflow": TensorFlow's own pool may hold that name


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="ppfr_jax/tf_example.proto", package=_PACKAGE, syntax="proto3")

    def message(name, *fields, nested=()):
        m = fd.message_type.add(name=name)
        for n in nested:
            m.nested_type.add().CopyFrom(n)
        for fname, number, ftype, label, type_name, packed, oneof in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if packed:
                f.options.packed = True
            if oneof is not None:
                f.oneof_index = oneof
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", ("value", 1, F.TYPE_BYTES, rep, None, False, None))
    message("FloatList", ("value", 1, F.TYPE_FLOAT, rep, None, True, None))
    message("Int64List", ("value", 1, F.TYPE_INT64, rep, None, True, None))
    feat = message("Feature",
                   ("bytes_list", 1, F.TYPE_MESSAGE, opt, f".{_PACKAGE}.BytesList", False, 0),
                   ("float_list", 2, F.TYPE_MESSAGE, opt, f".{_PACKAGE}.FloatList", False, 0),
                   ("int64_list", 3, F.TYPE_MESSAGE, opt, f".{_PACKAGE}.Int64List", False, 0))
    feat.oneof_decl.add(name="kind")
    entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=f".{_PACKAGE}.Feature")
    message("Features", ("feature", 1, F.TYPE_MESSAGE, rep, f".{_PACKAGE}.Features.FeatureEntry", False, None),
            nested=(entry,))
    message("Example", ("features", 1, F.TYPE_MESSAGE, opt, f".{_PACKAGE}.Features", False, None))
    return fd


@functools.cache
def _classes() -> dict:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{n}"))
            for n in ("Example", "Features", "Feature", "BytesList", "FloatList", "Int64List")}


def __getattr__(name: str):
    if name in ("Example", "Features", "Feature", "BytesList", "FloatList", "Int64List"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse(payload: bytes):
    """Serialised ``tf.train.Example`` -> the Example message. Raises protobuf's DecodeError."""
    return _classes()["Example"].FromString(bytes(payload))


def features(payload: bytes) -> dict[str, list]:
    """Serialised Example -> ``{name: list of values}`` (bytes, float or int, whichever the feature holds)."""
    out = {}
    for name, f in parse(payload).features.feature.items():
        kind = f.WhichOneof("kind")
        out[name] = list(getattr(f, kind).value) if kind else []
    return out


def serialize(feats: dict) -> bytes:
    """``{name: bytes | list of bytes / floats / ints}`` -> a serialised Example (keys sorted; TensorFlow
    parses it to the same features).

    Raises:
      TypeError: a value that is neither bytes nor a list of one kind.
    """
    c = _classes()
    ex = c["Example"]()
    for name, value in feats.items():
        f = ex.features.feature[name]
        vals = [value] if isinstance(value, (bytes, bytearray)) else list(value)
        vals = [v.item() if hasattr(v, "item") and not isinstance(v, (bytes, bytearray)) else v for v in vals]
        if all(isinstance(v, (bytes, bytearray)) for v in vals):
            f.bytes_list.value.extend(bytes(v) for v in vals)
        elif all(isinstance(v, int) for v in vals):
            f.int64_list.value.extend(vals)
        elif all(isinstance(v, (int, float)) for v in vals):
            f.float_list.value.extend(float(v) for v in vals)
        else:
            raise TypeError(f"feature {name!r}: values must be bytes, ints or floats, got {value!r:.80}")
    return ex.SerializeToString(deterministic=True)
