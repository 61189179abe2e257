"""The on-disk checkpoint format: write one rank's payload, commit a step, read it back.

See docs/INTERNALS.md §4. ``write_rank``/``finish_if_complete``/``persist_payloads``
write; ``StepReader`` reads; ``verify`` checks every chunk.
"""

from ckpt.format.reader import StepReader, TensorPiece  # noqa: F401
from ckpt.format.replicas import ReplicaIndex  # noqa: F401
from ckpt.format.verify import VerifyReport, verify  # noqa: F401
from ckpt.format.writer import finish_if_complete, persist_payloads, write_rank  # noqa: F401
