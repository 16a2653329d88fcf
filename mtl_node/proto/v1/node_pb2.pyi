from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelManifest(_message.Message):
    __slots__ = ("tensors", "data_bytes")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    data_bytes: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., data_bytes: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("agent_id", "task", "rule", "role", "manifest", "round", "rounds_total", "protocol", "device")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    task: str
    rule: str
    role: str
    manifest: ModelManifest
    round: int
    rounds_total: int
    protocol: str
    device: str
    def __init__(self, agent_id: _Optional[str] = ..., task: _Optional[str] = ..., rule: _Optional[str] = ..., role: _Optional[str] = ..., manifest: _Optional[_Union[ModelManifest, _Mapping]] = ..., round: _Optional[int] = ..., rounds_total: _Optional[int] = ..., protocol: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("round", "requester")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    round: int
    requester: str
    def __init__(self, round: _Optional[int] = ..., requester: _Optional[str] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("round", "format", "total_bytes", "digest", "agent_id")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    round: int
    format: str
    total_bytes: int
    digest: str
    agent_id: str
    def __init__(self, round: _Optional[int] = ..., format: _Optional[str] = ..., total_bytes: _Optional[int] = ..., digest: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NeighborStatus(_message.Message):
    __slots__ = ("agent_id", "decision", "ema", "weight", "loss", "reason")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    EMA_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    decision: str
    ema: float
    weight: float
    loss: float
    reason: str
    def __init__(self, agent_id: _Optional[str] = ..., decision: _Optional[str] = ..., ema: _Optional[float] = ..., weight: _Optional[float] = ..., loss: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("agent_id", "round", "rounds_total", "state", "loss", "test_loss", "test_accuracy", "accepted", "filtered", "missing", "neighbors", "role", "rule", "attack_success")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    FILTERED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    ATTACK_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    round: int
    rounds_total: int
    state: str
    loss: float
    test_loss: float
    test_accuracy: float
    accepted: int
    filtered: int
    missing: int
    neighbors: _containers.RepeatedCompositeFieldContainer[NeighborStatus]
    role: str
    rule: str
    attack_success: float
    def __init__(self, agent_id: _Optional[str] = ..., round: _Optional[int] = ..., rounds_total: _Optional[int] = ..., state: _Optional[str] = ..., loss: _Optional[float] = ..., test_loss: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., accepted: _Optional[int] = ..., filtered: _Optional[int] = ..., missing: _Optional[int] = ..., neighbors: _Optional[_Iterable[_Union[NeighborStatus, _Mapping]]] = ..., role: _Optional[str] = ..., rule: _Optional[str] = ..., attack_success: _Optional[float] = ...) -> None: ...
