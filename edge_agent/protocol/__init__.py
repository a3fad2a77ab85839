"""The snakelearn wire protocol, shared by agents and the coordinator.

Stdlib + numpy + safetensors only. See ``envelope`` (wire forms), ``messages``
(typed bodies), ``topics`` (MQTT topic names), ``codec`` (tensors) and
``transfer`` (chunked, digest-checked transfers).
"""
