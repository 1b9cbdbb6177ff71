from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("noise_multiplier", "max_grad_norm", "local_steps", "learning_rate", "dp", "blocks", "sample_rate", "privacy_unit", "update_clip", "day_sample_rate")
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_UNIT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_CLIP_FIELD_NUMBER: _ClassVar[int]
    DAY_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    noise_multiplier: float
    max_grad_norm: float
    local_steps: int
    learning_rate: float
    dp: bool
    blocks: _containers.RepeatedScalarFieldContainer[str]
    sample_rate: float
    privacy_unit: str
    update_clip: float
    day_sample_rate: float
    def __init__(self, noise_multiplier: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., local_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., dp: _Optional[bool] = ..., blocks: _Optional[_Iterable[str]] = ..., sample_rate: _Optional[float] = ..., privacy_unit: _Optional[str] = ..., update_clip: _Optional[float] = ..., day_sample_rate: _Optional[float] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("run_id", "server_round", "weights", "spec")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    server_round: int
    weights: _containers.RepeatedCompositeFieldContainer[Tensor]
    spec: TrainSpec
    def __init__(self, run_id: _Optional[str] = ..., server_round: _Optional[int] = ..., weights: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., spec: _Optional[_Union[TrainSpec, _Mapping]] = ...) -> None: ...

class BlockCharge(_message.Message):
    __slots__ = ("block", "epsilon_rdp", "epsilon_prv", "epsilon", "budget", "retired")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RDP_FIELD_NUMBER: _ClassVar[int]
    EPSILON_PRV_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    block: str
    epsilon_rdp: float
    epsilon_prv: float
    epsilon: float
    budget: float
    retired: bool
    def __init__(self, block: _Optional[str] = ..., epsilon_rdp: _Optional[float] = ..., epsilon_prv: _Optional[float] = ..., epsilon: _Optional[float] = ..., budget: _Optional[float] = ..., retired: _Optional[bool] = ...) -> None: ...

class PrivacyReport(_message.Message):
    __slots__ = ("device_id", "run_id", "server_round", "noise_multiplier", "sample_rate", "steps", "delta", "accountant", "epsilon_round_rdp", "epsilon_total", "blocks", "max_grad_norm", "unit", "signature", "payload_json")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_ROUND_RDP_FIELD_NUMBER: _ClassVar[int]
    EPSILON_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    epsilon_round_rdp: float
    epsilon_total: float
    blocks: _containers.RepeatedCompositeFieldContainer[BlockCharge]
    max_grad_norm: float
    unit: str
    signature: bytes
    payload_json: str
    def __init__(self, device_id: _Optional[str] = ..., run_id: _Optional[str] = ..., server_round: _Optional[int] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., delta: _Optional[float] = ..., accountant: _Optional[str] = ..., epsilon_round_rdp: _Optional[float] = ..., epsilon_total: _Optional[float] = ..., blocks: _Optional[_Iterable[_Union[BlockCharge, _Mapping]]] = ..., max_grad_norm: _Optional[float] = ..., unit: _Optional[str] = ..., signature: _Optional[bytes] = ..., payload_json: _Optional[str] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("weights", "report")
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.RepeatedCompositeFieldContainer[Tensor]
    report: PrivacyReport
    def __init__(self, weights: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., report: _Optional[_Union[PrivacyReport, _Mapping]] = ...) -> None: ...

class SecAggStageRequest(_message.Message):
    __slots__ = ("run_id", "server_round", "node_id", "configs", "weights", "spec", "run_name")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIGS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    server_round: int
    node_id: int
    configs: bytes
    weights: _containers.RepeatedCompositeFieldContainer[Tensor]
    spec: TrainSpec
    run_name: str
    def __init__(self, run_id: _Optional[str] = ..., server_round: _Optional[int] = ..., node_id: _Optional[int] = ..., configs: _Optional[bytes] = ..., weights: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., spec: _Optional[_Union[TrainSpec, _Mapping]] = ..., run_name: _Optional[str] = ...) -> None: ...

class SecAggStageReply(_message.Message):
    __slots__ = ("configs", "report")
    CONFIGS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    configs: bytes
    report: PrivacyReport
    def __init__(self, configs: _Optional[bytes] = ..., report: _Optional[_Union[PrivacyReport, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("run_id", "server_round", "weights")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    server_round: int
    weights: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, run_id: _Optional[str] = ..., server_round: _Optional[int] = ..., weights: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class EvaluateReply(_message.Message):
    __slots__ = ("num_examples", "loss", "accuracy", "device_id")
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    num_examples: int
    loss: float
    accuracy: float
    device_id: str
    def __init__(self, num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., device_id: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BlockStatus(_message.Message):
    __slots__ = ("block", "events", "epsilon", "budget", "retired", "unit", "has_broken", "epsilon_broken", "budget_broken")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    HAS_BROKEN_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BROKEN_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BROKEN_FIELD_NUMBER: _ClassVar[int]
    block: str
    events: int
    epsilon: float
    budget: float
    retired: bool
    unit: str
    has_broken: bool
    epsilon_broken: float
    budget_broken: float
    def __init__(self, block: _Optional[str] = ..., events: _Optional[int] = ..., epsilon: _Optional[float] = ..., budget: _Optional[float] = ..., retired: _Optional[bool] = ..., unit: _Optional[str] = ..., has_broken: _Optional[bool] = ..., epsilon_broken: _Optional[float] = ..., budget_broken: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("device_id", "recording", "paused_until", "source", "events_today", "store_bytes", "blocks", "delta", "trainer_ready", "version", "store_writing_stopped", "store_problem")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDING_FIELD_NUMBER: _ClassVar[int]
    PAUSED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_TODAY_FIELD_NUMBER: _ClassVar[int]
    STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TRAINER_READY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STORE_WRITING_STOPPED_FIELD_NUMBER: _ClassVar[int]
    STORE_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    recording: bool
    paused_until: str
    source: str
    events_today: int
    store_bytes: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockStatus]
    delta: float
    trainer_ready: bool
    version: str
    store_writing_stopped: bool
    store_problem: str
    def __init__(self, device_id: _Optional[str] = ..., recording: _Optional[bool] = ..., paused_until: _Optional[str] = ..., source: _Optional[str] = ..., events_today: _Optional[int] = ..., store_bytes: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[BlockStatus, _Mapping]]] = ..., delta: _Optional[float] = ..., trainer_ready: _Optional[bool] = ..., version: _Optional[str] = ..., store_writing_stopped: _Optional[bool] = ..., store_problem: _Optional[str] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("seconds",)
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    def __init__(self, seconds: _Optional[float] = ...) -> None: ...

class PauseReply(_message.Message):
    __slots__ = ("paused_until",)
    PAUSED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    paused_until: str
    def __init__(self, paused_until: _Optional[str] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShowRequest(_message.Message):
    __slots__ = ("day",)
    DAY_FIELD_NUMBER: _ClassVar[int]
    day: str
    def __init__(self, day: _Optional[str] = ...) -> None: ...

class ShowReply(_message.Message):
    __slots__ = ("summary_json",)
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    summary_json: str
    def __init__(self, summary_json: _Optional[str] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("days", "all")
    DAYS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    days: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    def __init__(self, days: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ...) -> None: ...

class ForgetReply(_message.Message):
    __slots__ = ("forgotten", "key_destroyed")
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    KEY_DESTROYED_FIELD_NUMBER: _ClassVar[int]
    forgotten: _containers.RepeatedScalarFieldContainer[str]
    key_destroyed: bool
    def __init__(self, forgotten: _Optional[_Iterable[str]] = ..., key_destroyed: _Optional[bool] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("day",)
    DAY_FIELD_NUMBER: _ClassVar[int]
    day: str
    def __init__(self, day: _Optional[str] = ...) -> None: ...

class ExportReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class PolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyReply(_message.Message):
    __slots__ = ("text", "source")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    source: str
    def __init__(self, text: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...
