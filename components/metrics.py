"""Metric sinks: ``metrics.jsonl``, torchtune's metric loggers, a console line; memory figures.

``MetricLogger.log(record)`` writes one JSON object per call to ``<output_dir>/metrics.jsonl``
(:class:`JsonlLogger`, itself a torchtune ``MetricLoggerInterface``) and forwards the
numeric figures to the loggers of the ``metric_logger`` config entry, configured the
torchtune way (``_component_: torchtune.training.metric_logging.WandBLogger``, ...). On
resume the JSONL file first drops the records that the interrupted run wrote after the
checkpoint it resumes from, so it reads as one uninterrupted run.

Values may be tensors (the recipes keep per-step figures on the device so that a step
never waits for the host); they are read only when a record is written.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import math
import os
import resource
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from letrecipes.components.errors import LetRecipesError, LetRecipesWarning
from letrecipes.components.files import cut_at, names_the_open_file
from letrecipes.components.progress import clock
from letrecipes.components.registry import ComponentError
from letrecipes.components.run_folder import METRICS_FILE



def to_python(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record with tensor values read back as Python numbers (one device sync)."""
    keys = [k for k, v in record.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(record)
    values = torch.stack([record[k].detach().reshape(()).double() for k in keys]).tolist()
    return {**record, **dict(zip(keys, values))}


def format_record(record: Dict[str, Any], max_steps: int, fields: Sequence[Tuple[str, str]]) -> str:
    """``step 10/300 | loss 5.6638 | ...``: the ``(key, format)`` fields the record has, in
    order; format ``clock`` writes seconds as ``1h02m03s``."""
    parts = [f"step {record['step']}/{max_steps}"]
    for key, fmt in fields:
        if record.get(key) is not None:
            value = clock(record[key]) if fmt == "clock" else f"{record[key]:{fmt}}"
            parts.append(f"{key.removesuffix('_s') if fmt == 'clock' else key} {value}")
    return " | ".join(parts)


def truncate_after(path: Path, step: int) -> None:
    """Keep the records of ``path`` up to ``step``: the file is cut at the first record past
    it (or the first line a kill cut short), in place and without rewriting a byte, so a
    full disk or a kill here cannot lose the history before it. A whole line that is no
    record (edited in by hand, damaged) is passed over, not taken for the cut: the history
    after it stays."""
    if not path.is_file():
        return
    offset = 0
    with open(path, "rb") as records:
        for line in records:
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            later = record.get("step") if isinstance(record, dict) else None
            if isinstance(later, int) and not isinstance(later, bool) and later > step:
                break
            offset += len(line)
    if offset < path.stat().st_size:
        cut_at(path, offset)


class JsonlLogger:
    """``<output_dir>/metrics.jsonl`` as a torchtune metric logger (it has the methods of
    torchtune's ``MetricLoggerInterface`` protocol, so it goes wherever those go): one JSON object per
    record (``{"step": N, ...}``). It is always on: resume, the study and ``compare_runs``
    read it. ``resume_step``: continue the file of a run resumed at that step (the records
    the interrupted run wrote after it are dropped); None starts a new file."""

    def __init__(self, log_dir: str | Path, resume_step: Optional[int] = None):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(log_dir) / METRICS_FILE
        self.failed: Optional[OSError] = None  # a write failed: its error was said
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        self._file = open(self.path, "a" if resume_step is not None else "w", buffering=1)

    def reopen_if_gone(self) -> bool:
        """Start the file again where it was removed (with its folder) while the run wrote
        it: the records would go on into a file nobody can open. True when it was."""
        if self._file is None or names_the_open_file(self.path, self._file.fileno()):
            return False
        self._file.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        return True

    def log(self, name: str, data: Any, step: int) -> None:
        self.log_dict({name: data}, step)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in payload.items()}
        try:
            self._file.write(json.dumps({"step": step, **clean}) + "\n")
        except OSError as err:  # a full disk meets the write, whose error names no file: the one-line error would not
            err.filename = err.filename or str(self.path)
            self.failed = err
            raise

    def log_config(self, config: Any) -> None:
        pass  # the recipe writes <output_dir>/config.yaml itself

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()  # flushes what a failed write left in the buffer: it fails again
            except OSError as err:
                if self.failed is None:
                    err.filename = err.filename or str(self.path)
                    raise


class MetricLogger:
    """Every record to ``metrics.jsonl`` and to the torchtune metric loggers the config
    names (``metric_logger``: DiskLogger, StdoutLogger, WandBLogger, TensorBoardLogger,
    MLFlowLogger, CometLogger, or your own ``MetricLoggerInterface``), which receive the
    numeric figures of each record at its step. Only the main process logs."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, loggers: Sequence[Any] = (),
                 run_config: Optional[Any] = None, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.jsonl = JsonlLogger(output_dir, resume_step) if enabled else None
        self.loggers = list(loggers) if enabled else []
        for logger in self.loggers:
            if run_config is not None:
                try:
                    logger.log_config(run_config)
                except Exception as err:  # noqa: BLE001 - a logger's config upload must not stop training
                    warnings.warn(f"metric_logger {type(logger).__name__}: could not log the config ({err})",
                                  LetRecipesWarning, stacklevel=2)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = to_python(record)
        step, payload = record["step"], {k: v for k, v in record.items() if k != "step"}
        self.jsonl.log_dict(payload, step)
        numbers = {k: v for k, v in payload.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            for logger in self.loggers:
                logger.log_dict(numbers, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        for logger in self.loggers:
            logger.close()
        self.loggers = []


# Short names for torchtune's loggers: `metric_logger._component_: wandb` is what people type
LOGGER_NAMES = {"disk": "DiskLogger", "stdout": "StdoutLogger", "wandb": "WandBLogger",
                "tensorboard": "TensorBoardLogger", "comet": "CometLogger", "mlflow": "MLFlowLogger"}

# What each of torchtune's loggers needs beyond its package (the usual reasons one fails to start)
LOGGER_FIXES = {
    "WandBLogger": "pip install wandb, then `wandb login` (or WANDB_API_KEY); or mode: offline, which needs neither",
    "TensorBoardLogger": "pip install tensorboard", "CometLogger": "pip install comet_ml and set COMET_API_KEY",
    "MLFlowLogger": "pip install mlflow",
}
LOGGER_PACKAGES = {"WandBLogger": "wandb", "TensorBoardLogger": "tensorboard", "CometLogger": "comet_ml",
                   "MLFlowLogger": "mlflow"}
# A server the logger cannot reach (a compute node without internet): its own fix, not a login's.
UNREACHABLE = ("CommError", "ConnectionError", "ConnectTimeout", "MaxRetryError", "Timeout")
UNREACHABLE_FIXES = {
    "WandBLogger": "W&B's server cannot be reached from this machine (compute nodes often have no internet): "
                   "mode: offline, then `wandb sync <output_dir>/wandb/offline-run-*` from a machine that can reach it",
}


def metric_logger_entries(spec: Any) -> List[Dict[str, Any]]:
    """``metric_logger`` as a list of mappings: one entry or a list, and a short name or dotted
    path alone (``metric_logger: wandb``) is ``{_component_: wandb}``."""
    items = [] if spec is None else list(spec) if isinstance(spec, (list, tuple)) else [spec]
    return [{"_component_": item} if isinstance(item, str) else dict(item) for item in items]


def check_logger_can_start(factory: Any, options: Mapping[str, Any], key: str) -> None:
    """What would stop a logger from starting, found without starting it (no run is created,
    nothing is sent): its package missing, or for W&B online, no credentials on this machine
    (``wandb.init`` would then stop the run, or wait at an interactive prompt, only after
    the corpus is prepared)."""
    name = getattr(factory, "__name__", "")
    package = LOGGER_PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ComponentError(f"{key}: {name} needs the {package} package, which is not installed. Fix: "
                             f"{LOGGER_FIXES[name]}, or remove it from metric_logger (metrics.jsonl is always written).")
    if name == "WandBLogger" and _wandb_has_no_credentials(options):
        raise ComponentError(
            f"{key}: {name} logs online and this machine has no W&B credentials (no WANDB_API_KEY, no `wandb login` "
            "in ~/.netrc): wandb.init would stop the run, or wait at a prompt, once the corpus is prepared. Fix: "
            "`wandb login` (or export WANDB_API_KEY=...) on the machines that train, or log offline "
            f"({key}: {{_component_: wandb, mode: offline}}, then `wandb sync <output_dir>/wandb/offline-run-*`).")


def _wandb_has_no_credentials(options: Mapping[str, Any]) -> bool:
    """Whether W&B would run online without credentials. Read through wandb's own lookup
    (environment, netrc, its settings); with a wandb whose internals differ, False: its
    init decides, as before."""
    mode = str(options.get("mode") or os.environ.get("WANDB_MODE") or "").lower()
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return False
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth import authenticate_session

        settings = wandb_setup.singleton().settings
        if str(settings.mode).lower() in ("offline", "disabled", "dryrun"):  # `wandb offline` was run here
            return False
        return authenticate_session(host=settings.base_url, source="letrecipes", prompt=False,
                                    update_session=False) is None
    except Exception:  # noqa: BLE001 - another wandb version, or a broken install: wandb.init says what it says
        return False


def metric_logger_class(name: Any, key: str = "metric_logger") -> Any:
    """The logger class a ``metric_logger`` entry names (a short name of ``LOGGER_NAMES`` or a
    dotted path); one error naming ``key`` if it cannot be imported or is not a class."""
    from torchtune.config._utils import _get_component_from_path

    fix = (f"Fix: one of {', '.join(LOGGER_NAMES)} (torchtune's loggers), or your own class's dotted path "
           "(torchtune.training.metric_logging.DiskLogger is the long form of disk).")
    path = f"torchtune.training.metric_logging.{LOGGER_NAMES[name.lower()]}" \
        if isinstance(name, str) and name.lower() in LOGGER_NAMES else name
    try:
        factory = _get_component_from_path(path)
    except Exception as err:  # noqa: BLE001 - torchtune raises its own InstantiationError
        raise ComponentError(f"config key {key}._component_={name!r} cannot be imported "
                             f"({str(err).splitlines()[0]}). {fix}") from None
    if not callable(factory):
        raise ComponentError(f"config key {key}._component_={name!r} is a {type(factory).__name__}, "
                             f"not a logger class. {fix}")
    return factory


def build_metric_loggers(spec: Any, legacy_wandb: Optional[Mapping[str, Any]], output_dir: str | Path,
                         log=print) -> List[Any]:
    """The torchtune metric loggers of a ``metric_logger`` config entry (a mapping with
    ``_component_``, or a list of them; ``_component_`` is a short name of ``LOGGER_NAMES`` or a
    dotted path); ``log_dir`` defaults to the run's folder. ``metrics.wandb`` (the older key) becomes a
    ``WandBLogger``, with a note saying what to write instead."""
    specs = metric_logger_entries(spec)
    wandb = dict(legacy_wandb or {})
    if wandb.pop("enabled", False):
        wandb.setdefault("mode", "offline")
        specs.append({"_component_": "torchtune.training.metric_logging.WandBLogger", **wandb})
        log("metrics.wandb is read as metric_logger: {_component_: torchtune.training.metric_logging.WandBLogger, "
            + ", ".join(f"{k}: {v}" for k, v in wandb.items()) + "}: write that instead (metrics.wandb will go)")
    loggers = []
    for entry in specs:
        entry = dict(entry)
        factory = metric_logger_class(entry.pop("_component_"))
        if "log_dir" in inspect.signature(factory).parameters and "log_dir" not in entry and "dir" not in entry:
            entry["log_dir"] = str(output_dir)
        # A logger that fails half-built dies with the exception, and the __del__ of some of
        # torchtune's (TensorBoardLogger) then raises too: a second traceback under the error
        previous, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
        try:
            loggers.append(factory(**entry))
            continue
        except Exception as err:  # noqa: BLE001 - a logger's own setup (a package, a login) failing
            problem = f"{type(err).__name__}: {str(err).splitlines()[0].rstrip('.') if str(err) else ''}"
            unreachable = type(err).__name__ in UNREACHABLE or "timed out" in str(err).lower()
        finally:
            gc.collect()
            sys.unraisablehook = previous
        fixes = UNREACHABLE_FIXES if unreachable and factory.__name__ in UNREACHABLE_FIXES else LOGGER_FIXES
        raise ComponentError(f"metric_logger: {factory.__name__} could not start: {problem}. Fix: "
                             + fixes.get(factory.__name__, "see that logger's documentation")
                             + ", or remove it from metric_logger (metrics.jsonl is always written).")
    return loggers


class StepTimer:
    """Step time without a host sync per step.

    The recipe reads times only at its sync points (log, evaluation, checkpoint steps):
    :meth:`lap` waits for the device once and divides the wall time since :meth:`restart`
    by the steps taken. Named parts of a step (LET: ``teacher``) are timed with CUDA
    events on a GPU (read at the lap, no sync where they are recorded) and with the host
    clock on CPU, where every op has finished when it returns.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0
        self.parts: Dict[str, list] = {}
        self.host_parts: Dict[str, float] = {}  # host time, on a GPU too: waiting for the next batch

    def add_host_time(self, name: str, seconds: float) -> None:
        self.host_parts[name] = self.host_parts.get(name, 0.0) + seconds

    def step_done(self) -> None:
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` of host work since :meth:`restart` out of the lap (a profiler
        writing its trace)."""
        self.start += seconds

    @contextmanager
    def part(self, name: str):
        with torch.profiler.record_function(name):  # the same name in a profiler's trace
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                yield
                end.record()
                self.parts.setdefault(name, []).append((begin, end))
            else:
                begin = time.perf_counter()
                yield
                self.parts.setdefault(name, []).append(time.perf_counter() - begin)

    def lap(self) -> Tuple[float, int, Dict[str, float]]:
        """(seconds since :meth:`restart`, steps taken, seconds per named part); one device sync."""
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.start
        parts = {name: sum(b.elapsed_time(e) / 1000 for b, e in spans) if self.cuda else sum(spans)
                 for name, spans in self.parts.items()}
        for name, seconds in self.host_parts.items():
            parts[name] = parts.get(name, 0.0) + seconds
        return elapsed, self.steps, parts


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Peak resident set size of this process: Linux reports it in KiB, macOS in bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def current_memory_mb(device: torch.device, statm: str = "/proc/self/statm") -> Optional[float]:
    """Allocated CUDA memory, or this process's resident set size on CPU: Linux's /proc, else
    psutil's (macOS has no /proc; psutil comes with torchtune); None where neither tells."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open(statm) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # not installed, or no figure on this system: the caller leaves the figure out
        return None


def read_metric_records(path: str | Path) -> Tuple[List[Dict[str, Any]], int]:
    """A metrics.jsonl's records, in order, and how many of its whole lines are not one (a
    file edited by hand, or damaged: passed over, not a traceback). A last line that is
    not whole (a run writing it now, or killed mid-write) is left out."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    records, unreadable = [], 0
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):  # another JSON value on a line (an edit) is no record
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable


def read_metrics(path: str | Path) -> List[Dict[str, Any]]:
    """A metrics.jsonl's records, in order (:func:`read_metric_records`)."""
    return read_metric_records(path)[0]


def compare_runs(baseline: list, let: list) -> Dict[str, Any]:
    """Step speedup of a LET run over a baseline, from their metrics.jsonl records.

    ``let_steps_to_baseline`` is the first validation step at which LET's validation
    loss is at or below the baseline's final one (None if it never gets there).
    """
    base_val = [(r["step"], r["val_loss"]) for r in baseline if r.get("val_loss") is not None]
    let_val = [(r["step"], r["val_loss"]) for r in let if r.get("val_loss") is not None]
    if not base_val or not let_val:
        raise LetRecipesError("both runs need validation records (set eval_every > 0)")
    base_steps, base_final = base_val[-1]
    reached = next((step for step, loss in let_val if loss <= base_final), None)
    return {
        "baseline_final_val_loss": base_final,
        "let_final_val_loss": let_val[-1][1],
        "baseline_steps": base_steps,
        "let_steps_to_baseline": reached,
        "step_speedup": base_steps / reached if reached else None,
    }
