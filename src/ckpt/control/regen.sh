#!/usr/bin/env bash
# Regenerate ckpt_pb2.py / ckpt_pb2_grpc.py from ckpt.proto (needs grpcio-tools).
# The generated grpc module imports its sibling as a top-level module; rewrite that
# import to a relative one so it works inside the ckpt.control package.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. ckpt.proto
sed -i 's/^import ckpt_pb2 as ckpt__pb2$/from . import ckpt_pb2 as ckpt__pb2/' ckpt_pb2_grpc.py
grep -q '^from . import ckpt_pb2 as ckpt__pb2$' ckpt_pb2_grpc.py
