"""The names on the wire: message types (the envelope's ``type``) and transfer purposes.

``StrEnum`` members are the strings themselves, so they encode as before and compare equal to
what a decoder reads; dispatch tables key on them instead of string literals.
"""

from __future__ import annotations

from enum import StrEnum


class MessageType(StrEnum):
    """An envelope's ``type``. Commands are imperative, reports are facts."""

    # commands
    ASSIGN = "assign"
    ARTIFACT_REQUEST = "artifact_request"
    MODEL_REQUEST = "model_request"
    HAND_OFF = "hand_off"  # coordinator -> agent: send the model you hold for a hop to this agent (recovery)
    ABORT = "abort"
    SHUTDOWN = "shutdown"
    # reports
    STATUS = "status"
    HELLO = "hello"
    HOP_STARTED = "hop_started"
    HOP_PROGRESS = "hop_progress"
    HOP_DONE = "hop_done"
    HEARTBEAT = "heartbeat"  # an agent in a trial is alive (also while a long hop trains)
    TRANSFER_ACK = "transfer_ack"
    TRANSFER_NACK = "transfer_nack"
    BYE = "bye"
    # transport
    CHUNK = "chunk"  # the body of a binary SNK1 frame
    ERROR = "error"  # a failed request's reply (``error`` instead of ``body``)


class Purpose(StrEnum):
    """What a chunked transfer carries."""

    MODEL = "model"  # a model (or delta) handed to the next hop
    ARTIFACT = "artifact"  # a segment's artifact bundle
    CHECKPOINT = "checkpoint"  # a copy of a round's model for the coordinator's evaluation
    ACTIVATIONS = "activations"  # split learning: one batch's activations and labels
    GRADIENTS = "gradients"  # split learning: dL/dA for one batch
