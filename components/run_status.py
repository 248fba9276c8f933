"""``letrecipes status <output_dir>``: where a run stands, read from its folder alone.

Whether a process trains it now (the run lock's owner, :mod:`run_lock`), its last logged
step, loss, tokens and ETA (metrics.jsonl), its checkpoints and export, and for a run
that stopped, the command that goes on. Nothing is written: a status of a live run on a
shared filesystem is safe to ask from any node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from letrecipes.components.files import describe as describe_os_error
from letrecipes.components.progress import clock
from letrecipes.components.run_folder import (METRICS_FILE, STEP_PREFIX, complete_checkpoints_in, exported_step,
                                              records_from_the_end, step_of)
from letrecipes.components.run_lock import describe, live_owner


def run_status(folder: Path) -> Dict[str, Any]:
    """What a run's folder says about it; ``state`` is ``running``, ``finished``,
    ``stopped``, ``not a run``, or ``unreadable`` (with ``error``: a folder of another
    user's on a shared filesystem, a failing disk), which is said and passed over: the
    other runs of a folder of runs are still listed."""
    try:
        return _run_status(Path(folder))
    except OSError as err:
        return {"output_dir": str(folder), "state": "unreadable", "error": describe_os_error(err)}


def _run_status(folder: Path) -> Dict[str, Any]:
    status: Dict[str, Any] = {"output_dir": str(folder)}
    # a step checkpoint holds a copy of its run's run_info.json: it is part of a run, not one
    in_checkpoint = folder.name.startswith(STEP_PREFIX) and folder.parent.name == "checkpoints"
    if in_checkpoint or not (folder / "run_info.json").is_file() and not (folder / METRICS_FILE).is_file():
        status["state"] = "not a run"
        return status
    try:
        info = json.loads((folder / "run_info.json").read_text())
    except (OSError, ValueError):
        info = {}
    config = (info.get("config") if isinstance(info, dict) else None) or {}
    max_steps = config.get("max_steps") if isinstance(config, dict) else None
    status["max_steps"] = max_steps if _count(max_steps) else None
    eval_every = config.get("eval_every") if isinstance(config, dict) else None
    # a run that does not validate has no val_loss to look for: the search would read its whole log
    trained, validated, status["unreadable_lines"] = _newest_records(
        folder / METRICS_FILE, validates=not (_count(eval_every) and eval_every == 0))
    if trained is not None:
        status["last"] = {k: trained[k] for k in ("step", "loss", "tokens", "tokens_per_s_avg", "eta_s")
                          if _number(trained.get(k))}
        status["last_log_age_s"] = round(time.time() - (folder / METRICS_FILE).stat().st_mtime, 1)
    if validated is not None:
        status["val_loss"] = {"step": validated["step"], "val_loss": validated["val_loss"]}
    steps = complete_checkpoints_in(folder / "checkpoints")
    status["checkpoints"] = [p.name for p in steps]
    status["final"] = (folder / "final" / "config.json").is_file()
    status["final_step"] = exported_step(folder / "final") if status["final"] else None
    # the step reached: a checkpoint can be past the last record (a resume that lowered max_steps to a
    # step with a checkpoint and no log line exports from it at once); before, such a finished run
    # read as stopped at the earlier logged step
    saved = [s for s in map(step_of, steps) if s is not None]
    # and an export's step: with save_every=0, a run whose log was lost (its folder removed while it
    # trained, its records written again at the export) has no other
    exported = [status["final_step"]] if _count(status["final_step"]) else []
    logged = [trained["step"]] if trained is not None else []
    status["step"] = max(logged + saved + exported, default=None)
    if saved and max(saved) > max(logged, default=-1):
        status["saved_step"] = max(saved)
    elif exported and exported[0] > max(logged + saved, default=-1):
        status["exported_step"] = exported[0]
    owner = live_owner(folder)
    if owner is not None:
        status["state"], status["owner"] = "running", owner
    elif status["final"] and status["step"] is not None and status["step"] == status["max_steps"] \
            and status["final_step"] in (None, status["step"]):  # None: an export older than its step's record
        status["state"] = "finished"
    else:
        status["state"] = "stopped"
        status["resume_from"] = str(steps[-1]) if steps else None
    return status


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _newest_records(path: Path, validates: bool) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]], int]:
    """The newest record of a step trained, and of a validation (when ``validates``), read
    from the end of the log; and how many lines passed over on the way are no record. A
    status is read from whatever the folder holds: no metrics file is no record."""
    trained = validated = None
    unreadable = 0
    try:
        for record in records_from_the_end(path):
            if record is None:
                unreadable += 1
                continue
            if not _count(record.get("step")):
                continue
            if trained is None and _number(record.get("loss")) and "event" not in record:
                trained = record
            if validated is None and validates and _number(record.get("val_loss")):
                validated = record
            if trained is not None and (validated is not None or not validates):
                break
    except OSError:
        pass
    return trained, validated, unreadable


def describe_status(status: Dict[str, Any]) -> str:
    """A few lines for a person: state, progress, figures, checkpoints, what to do."""
    lines = [f"{status['output_dir']}: {status['state']}"]
    if status["state"] == "unreadable":
        lines[0] += f" ({status['error']}): passed over"
        return "\n".join(lines)
    if status["state"] == "not a run":
        lines[0] += " (no run_info.json or metrics.jsonl: not a training run's output_dir)"
        return "\n".join(lines)
    if status["state"] == "running":
        lines[0] += f" ({describe(status['owner'])})"
    last, total = status.get("last"), status.get("max_steps")
    if last:
        done = f"step {last['step']}" + (f"/{total} ({100 * last['step'] / total:.0f}%)" if total else "")
        figures = [done, f"loss {last['loss']:.4f}"]
        if "tokens" in last:
            figures.append(f"{last['tokens']:,} tokens")
        if "tokens_per_s_avg" in last:
            figures.append(f"{last['tokens_per_s_avg']:,.0f} tokens/s")
        if status["state"] == "running" and "eta_s" in last:
            figures.append(f"ETA {clock(last['eta_s'])} as of the last log, {clock(status['last_log_age_s'])} ago")
        lines.append("  " + " | ".join(figures))
    else:
        lines.append("  no step logged yet")
    for key, by in (("saved_step", "its newest checkpoint"), ("exported_step", "its final export")):
        if status.get(key) is not None:
            lines.append(f"  step {status[key]}" + (f"/{total}" if total else "") + f" reached by {by} (no log line "
                         "at that step)")
    if status.get("val_loss"):
        lines.append(f"  val_loss {status['val_loss']['val_loss']:.4f} at step {status['val_loss']['step']}")
    kept = status["checkpoints"]
    final_step = status.get("final_step")
    lines.append(f"  checkpoints: {', '.join(kept) if kept else 'none complete'}; final export: "
                 + (("yes" if final_step in (None, status.get("step")) else f"of step {final_step}, an earlier one")
                    if status["final"] else "not yet"))
    if status.get("unreadable_lines"):
        lines.append(f"  {status['unreadable_lines']:,} line(s) of {METRICS_FILE} read are not records (edited or "
                     "damaged): passed over")
    if status["state"] == "stopped":
        lines.append("  resume=true goes on from " + (status["resume_from"] or "step 0 (no complete checkpoint)")
                     + " (the same command as the run's, with resume=true)")
    return "\n".join(lines)
