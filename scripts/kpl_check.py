#!/usr/bin/env python3
"""Deaggregates records with the reference Python library (aws-kinesis-agg) and prints the
user records as JSON, for tests/kpl_interop.rs.

Input: a JSON file holding a list of {"sequence_number", "partition_key", "data" (base64)}.
Output (stdout): a list of {"sequence_number", "sub_sequence_number", "partition_key",
"explicit_hash_key", "data" (base64), "aggregated"}, in order.

    "$KT_PYTHON" scripts/kpl_check.py records.json
"""

import base64
import json
import sys

from aws_kinesis_agg.deaggregator import deaggregate_records


def main(path):
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    events = [{
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "sequenceNumber": r["sequence_number"],
            "partitionKey": r["partition_key"],
            "approximateArrivalTimestamp": 0,
            "data": r["data"],
        }
    } for r in records]
    out = []
    for user in deaggregate_records(events):
        k = user["kinesis"]
        data = k["data"]
        out.append({
            "sequence_number": k["sequenceNumber"],
            "sub_sequence_number": k.get("subSequenceNumber"),
            "partition_key": k["partitionKey"],
            "explicit_hash_key": k.get("explicitHashKey"),
            "data": data.decode("ascii") if isinstance(data, bytes) else data,
            "aggregated": bool(k.get("aggregated")),
        })
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1])
