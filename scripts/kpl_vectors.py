#!/usr/bin/env python3
"""Writes KPL aggregates made by the reference Python aggregator (aws-kinesis-agg) as test
vectors: tests/data/kpl/vectors.json.

Each vector has the aggregate as put to Kinesis (partition key, explicit hash key, base64
data) and the user records that went into it, in order, each as [partition key, explicit hash
key or null, base64 data]. tests/kpl_vectors.rs decodes every aggregate and compares.

    source scripts/env.sh && ensure_kpl_python
    "$KT_PYTHON" scripts/kpl_vectors.py
"""

import base64
import json
import os
import sys

from aws_kinesis_agg.aggregator import RecordAggregator

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "kpl", "vectors.json")


def cases():
    yield "one record", [("only", None, b"hello")]
    yield "100 records, one partition key", [("shared", None, b"r%03d" % i) for i in range(100)]
    yield "100 records, distinct partition keys", [("k%d" % i, None, b"%d" % i) for i in range(100)]
    yield "explicit hash keys, shared and distinct, mixed with none", [
        ("a", "0", b"first"),
        ("b", "340282366920938463463374607431768211455", b"max hash key"),
        ("a", "0", b"same hash key again"),
        ("c", None, b"no hash key"),
        ("d", "170141183460469231731687303715884105728", b"middle"),
    ]
    yield "empty data", [("e", None, b""), ("e", None, b"x"), ("f", None, b"")]
    yield "binary data", [("bin", None, bytes(range(256))), ("bin", None, b"\x00\xff\x00"), ("bin2", None, b"\xf3\x89\x9a\xc2")]
    yield "unicode keys", [("clé-ü", None, b"1"), ("日本語キー", None, b"2"), ("🎉" * 3, "42", b"3"), ("clé-ü", None, b"4")]


def b64(data):
    return base64.b64encode(data).decode("ascii")


def main():
    vectors = []
    for name, records in cases():
        aggregator = RecordAggregator()
        for pk, ehk, data in records:
            full = aggregator.add_user_record(pk, data, ehk)
            if full is not None:
                sys.exit("case %r does not fit one aggregate" % name)
        pk, ehk, data = aggregator.clear_and_get().get_contents()
        vectors.append({
            "name": name,
            "partition_key": pk,
            "explicit_hash_key": ehk or None,
            "data": b64(data),
            "records": [[p, e, b64(d)] for p, e, d in records],
        })
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("[\n")
        f.write(",\n".join(json.dumps(v, ensure_ascii=False) for v in vectors))
        f.write("\n]\n")
    print("wrote %d vectors to %s" % (len(vectors), os.path.normpath(OUT)))


if __name__ == "__main__":
    main()
