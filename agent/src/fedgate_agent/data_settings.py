"""From the agent configuration to the data path's settings: the buffer and the windows.

Kept apart from :mod:`fedgate_agent.data_path` so that commands reading the buffer
(``import``, ``windows``, ``status``) do not import the MQTT and OPC-UA clients.
"""

from __future__ import annotations

from fedgate_common.model_spec import ModelSpec

from fedgate_agent.config import AgentConfig
from fedgate_agent.errors import ConfigError
from fedgate_agent.ingest.buffer import BufferSettings, CapPolicy, IngestBuffer
from fedgate_agent.ingest.windows import LabelMode, LabelSpec, WindowSpec
from fedgate_agent.state import BufferStatus

__all__ = ["buffer_settings", "buffer_status", "window_spec"]


def buffer_settings(config: AgentConfig) -> BufferSettings:
    return BufferSettings(
        path=config.buffer_path,
        max_samples=config.ingest.max_samples,
        policy=CapPolicy(config.ingest.cap_policy),
    )


def window_spec(config: AgentConfig, model: ModelSpec) -> WindowSpec:
    """The ``[windows]`` settings for ``model``: its window length and feature count."""
    windows = config.windows
    length = windows.length or model.window
    if length != model.window or len(windows.tags) != model.n_features:
        raise ConfigError(
            f"[windows] gives windows of {length} × {len(windows.tags)} tags but the model "
            f"needs {model.window} × {model.n_features}; set windows.length = 0 and list "
            f"{model.n_features} tags in windows.tags"
        )
    return WindowSpec(
        tags=windows.tags,
        period_s=windows.period_s,
        length=length,
        stride=windows.stride,
        max_gap_s=windows.max_gap_s or None,
        test_fraction=windows.test_fraction,
        n_classes=model.n_classes,
        label=LabelSpec(
            tag=windows.label_tag,
            mode=LabelMode(windows.label_mode),
            uniform=windows.uniform_labels == "on",
            bins=windows.label_bins,
            horizon=windows.horizon,
        ),
    )


def buffer_status(buffer: IngestBuffer) -> BufferStatus:
    """The buffer's size, cap and counters as ``status.json`` shows them."""
    stats = buffer.stats()
    counters = dict(stats.counters)
    return BufferStatus(
        path=str(buffer.settings.path),
        samples=stats.samples,
        max_samples=stats.max_samples,
        policy=str(stats.policy),
        size_bytes=stats.db_bytes,
        counters=counters,
        quarantined=[str(q.moved_to) for q in stats.quarantined],
        newest_ts=max((s.last_ts for s in stats.sources.values()), default=None),
    )
