"""Plans: ordered steps with do/undo/describe, and the executor that journals and rolls back.

A plan has three phases:

``prepare``  reversible steps (each has an undo); a failure undoes the steps already started, in reverse.
``changes``  the catalog changes, applied in ONE transaction together with the plan's "committed" mark:
             this is the point after which the plan only goes forward.
``finish``   forward-only, idempotent steps (remove a file, merge a chain); a crash among them is finished
             by ``snapfw check --repair``, which is why each step is journaled, as JSON, before it runs.

A *plan window* holds a running guest still (paused, or its filesystems frozen) around the steps that must
see its disks at one instant: a prepare step with ``holds`` opens it and a later one with ``releases``
closes it. Whatever fails inside (an error, Ctrl-C), the executor releases every hold first, before any
other undo, so the guest is held no longer than the work needs; a step that would start after the
window's deadline (``seconds``) fails instead. ``check --repair`` rolls back the same way after a crash.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import FileError, Inconsistent, Refused, SnapfwError

FAULT_ENV = "SNAPFW_FAULT"
# The shape of a journaled plan: {"format": 1, "prepare": [step...], "finish": [step...]}, each step
# {"type": "module:Class", "args": {...}}. Entries without "format" (written before it existed) are 1.
# Change it whenever a step's meaning or fields change: a plan is only recovered by a snapfw that reads
# its format, since finishing or undoing steps it misreads could lose data.
JOURNAL_FORMAT = 1


class Step:
    """A unit of work. Subclasses are dataclasses whose fields are JSON values (they are journaled)."""

    bytes_to_copy: int = 0
    # a plan window (see the module docstring): ``holds`` opens one, its undo releases the guest and must
    # be idempotent; ``releases`` closes the innermost open one; ``held_seconds`` is set on the holding
    # step once closed, for the record. The window's ``seconds`` count from the hold's request (a pause or
    # freeze takes effect at once), or from its end with ``held_after_do`` (a memory save: the copy it
    # waits for is not the guest's pause budget)
    holds: bool = False
    held_after_do: bool = False
    releases: bool = False
    # the guest's vCPUs stop for this step's hold (a pause, a memory save): ``held_seconds`` is its pause
    pauses: bool = False
    seconds: float = 0.0
    held_seconds: float | None = None
    # the programs this step (or its undo) runs on this machine: the core checks they are installed before
    # anything runs, as one missing would fail an undo, or a committed plan's finish, halfway
    programs: tuple[str, ...] = ()
    # set on a finish step that `check --repair` runs again after a crash: its first run may have been cut
    # short halfway, which a step that cannot tell from what it finds (applying a qcow2 tag) cleans up then
    resumed: bool = False

    def do(self, ctx) -> None:
        raise NotImplementedError

    def undo(self, ctx) -> None:
        """Reverse :meth:`do`, also after a partial or absent ``do``. Finish steps never need it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be undone")

    def describe(self) -> str:
        raise NotImplementedError

    def argv(self) -> list[str] | None:
        """The external command this step runs, shown by --dry-run."""
        return None

    def writes(self) -> list[str]:
        """The image files this step (or its undo) writes or removes: none may be open in a QEMU other
        than the domain's own, which the core checks before anything runs."""
        return []

    def explain(self, ctx) -> tuple[list[str], str | None]:
        """For --dry-run: the hypervisor calls this step makes (QMP commands, libvirt calls), and whether
        and for how long at most the guest pauses meanwhile (None: a step that touches no running guest).
        The driver words them (``ctx.driver.explain``): the core knows no hypervisor's vocabulary."""
        return [], None

    def to_json(self) -> dict:
        cls = type(self)
        return {"type": f"{cls.__module__}:{cls.__qualname__}", "args": dataclasses.asdict(self)}

    @staticmethod
    def from_json(data: dict) -> "Step":
        """The step ``data`` describes; ValueError if this snapfw has no such step (another version's)."""
        try:
            module, _, qualname = data["type"].partition(":")
            cls = getattr(importlib.import_module(module), qualname, None)
            if isinstance(cls, type) and issubclass(cls, Step):
                return cls(**data["args"])
        except (ImportError, LookupError, TypeError, AttributeError) as e:
            raise ValueError(f"step {str(data)[:80]} does not fit this snapfw ({type(e).__name__}: {e})") from None
        raise ValueError(f"unknown step type {data['type']!r}")


@dataclass
class Plan:
    operation: str
    domain: str
    summary: str
    prepare: list[Step] = field(default_factory=list)
    changes: list[Callable] = field(default_factory=list)
    finish: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # True when every prepare step's undo is harmless if its do never ran (clones' steps): the journal
    # marks them all started with the plan, in its one transaction, instead of one transaction per step
    journal_at_once: bool = False

    def steps(self):
        yield from (("prepare", s) for s in self.prepare)
        yield from (("finish", s) for s in self.finish)

    def as_dict(self, ctx=None) -> dict:
        """The plan as --dry-run and --json show it; with ``ctx`` (a session), each step's hypervisor calls
        and guest pause too, as its driver words them."""
        steps = []
        for ph, s in self.steps():
            step = {"phase": ph, "describe": s.describe(), "argv": s.argv(), "bytes_to_copy": s.bytes_to_copy}
            if ctx is not None:
                calls, pause = s.explain(ctx)
                step.update(calls=calls, pause=pause)
            steps.append(step)
        return {
            "operation": self.operation,
            "domain": self.domain,
            "summary": self.summary,
            "notes": self.notes,
            "bytes_to_copy": sum(s.bytes_to_copy for _, s in self.steps()),
            "steps": steps,
        }


_plans_run = 0  # plans this process has started: the fault hook's optional PLAN field counts them


def _fault(phase: str, idx: int):
    """Test hook: SNAPFW_FAULT=PHASE:INDEX:raise|kill|term[:PLAN] fails, dies, or gets SIGTERM (as from a
    service manager or Ctrl-C) just before that step, of the PLAN-th plan the process runs (default: any;
    `clone --count N` runs one plan per clone). PHASE is prepare, commit, undo or finish; several faults
    are separated by commas (to fail a step and then die while undoing it)."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        want_phase, want_idx, *rest = spec.split(":")
        action, nth = (rest + ["raise", ""][len(rest):])[:2]
        if want_phase == phase and int(want_idx) == idx and nth in ("", str(_plans_run)):
            if action in ("kill", "term"):
                os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)
                return  # SIGTERM: the CLI's handler raises KeyboardInterrupt at once
            raise SnapfwError(f"injected fault before {phase} step {idx}")


def execute(plan: Plan, catalog, ctx) -> None:
    """Run ``plan``: journal, prepare, commit, finish. On failure before the commit, undo and re-raise.

    The journal holds what recovery reads, each mark its own fsynced transaction: a prepare step is
    marked started before it runs (the first one with the plan: nothing runs between them), so an
    interrupted plan undoes exactly those; a finish step is marked done once it ran (the last one by
    clearing the entry), so a committed plan redoes the others. A plan with nothing to prepare is
    journaled by its commit, for its finish steps."""
    global _plans_run
    _plans_run += 1
    plan_id = os.urandom(16).hex()  # uuid4's randomness, without importing uuid (and platform)
    steps = {"format": JOURNAL_FORMAT, "prepare": [s.to_json() for s in plan.prepare],
             "finish": [s.to_json() for s in plan.finish]}
    if plan.prepare:
        catalog.begin_plan(plan_id, plan.domain, plan.operation, steps,
                           range(len(plan.prepare) if plan.journal_at_once else 1))
    started, windows = [], []  # windows: (holding step, its start, its deadline), innermost last
    try:
        for i, step in enumerate(plan.prepare):
            _fault("prepare", i)
            late = [hold for hold, _, deadline in windows if time.monotonic() > deadline]
            if late and not step.releases:
                hold = late[0]
                raise Refused(f"'{hold.describe()}' passed its deadline of {hold.seconds:g} s before "
                              f"'{step.describe()}'; the guest is released and the snapshot undone")
            if i and not plan.journal_at_once:  # the first is marked with the plan
                catalog.mark_step(plan_id, "prepare", i, "started")
            started.append(step)
            ctx.step(step)
            began = time.monotonic()
            try:
                step.do(ctx)
            except SnapfwError as e:
                e.step = e.step or step.describe()
                raise
            except OSError as e:  # a step's own file operation (a name taken meanwhile, a full disk)
                error = FileError.of(e)
                error.step = step.describe()
                raise error from e
            if step.holds:
                since = time.monotonic() if step.held_after_do else began
                windows.append((step, since, since + step.seconds))
            elif step.releases and windows:
                hold, since, _ = windows.pop()
                hold.held_seconds = time.monotonic() - since
        _fault("commit", 0)
        with catalog.write() as changes:
            for change in plan.changes:
                change(changes)
            if plan.finish and plan.prepare:
                changes.set_plan_state(plan_id, "committed")
            elif plan.finish:
                changes.add_plan(plan_id, plan.domain, plan.operation, steps, "committed")
            elif plan.prepare:  # nothing left to finish: the journal entry goes with the commit
                changes.forget_plan(plan_id)
    except BaseException as failure:
        _undo(started, ctx, plan_id if plan.prepare else None, catalog, failure)
        raise
    if plan.finish:
        _finish(plan_id, plan.finish, catalog, ctx, set())
        _forget(catalog, plan_id, "the change is done")


def _forget(catalog, plan_id, outcome: str, failure: BaseException | None = None):
    """Clear the journal entry; if the catalog cannot be written (its filesystem is full), the entry
    stays for `check --repair`, which redoes only idempotent steps, and the error says so."""
    try:
        catalog.forget_plan(plan_id)
    except SnapfwError as e:
        cause = f"{_reason(failure)}; " if failure is not None else ""
        raise Inconsistent(f"{cause}{outcome}, but its journal entry could not be cleared ({e}): run "
                           "`snapfw check --repair` once the catalog can be written") from (failure or e)


def _reason(failure: BaseException) -> str:
    """What went wrong, in words; a KeyboardInterrupt (Ctrl-C, SIGTERM) has none of its own."""
    return str(failure) or "interrupted"


def _undo(started, ctx, plan_id, catalog, failure):
    """Undo the started steps in reverse, releasing every hold on the guest first (resume, thaw): the
    guest runs again while the rest is undone; a hold's undo is idempotent, so running it again is no harm.
    Then clear the plan's journal entry (``plan_id``; None: it has none)."""
    holds = [s for s in reversed(started) if s.holds]
    for i, step in enumerate(holds + [s for s in reversed(started) if not s.holds]):
        try:
            _fault("undo", i)
            step.undo(ctx)
        except Exception as e:
            raise Inconsistent(f"{_reason(failure)}; and undoing '{step.describe()}' failed too ({e}): "
                               "run `snapfw check --repair`") from failure
    if plan_id is not None:
        _forget(catalog, plan_id, "rolled back", failure)


def _finish(plan_id, steps, catalog, ctx, already_done):
    for i, step in enumerate(steps):
        if i in already_done:
            continue
        try:
            _fault("finish", i)
            ctx.step(step)
            step.do(ctx)
            if i < len(steps) - 1:  # the last one's mark is the journal entry's removal, which follows
                catalog.mark_step(plan_id, "finish", i, "done")
        except (Exception, KeyboardInterrupt) as e:
            why = "was interrupted" if isinstance(e, KeyboardInterrupt) else f"failed ({e})"
            raise Inconsistent(f"the change is recorded, but finishing it {why} at '{step.describe()}': "
                               "run `snapfw check --repair` to finish it") from e


def _journaled(plan: dict, phase: str) -> list[Step]:
    """The steps of ``phase`` of an unfinished plan, if this snapfw reads the journal they were written in."""
    what = f"the journal of the interrupted {plan['operation']} of {plan['domain']}"
    entry = plan["steps"]
    version = entry.get("format", 1) if isinstance(entry, dict) else None
    if version != JOURNAL_FORMAT:
        newer = isinstance(version, int) and version > JOURNAL_FORMAT
        raise Inconsistent(f"{what} has format {version}, this snapfw reads format {JOURNAL_FORMAT}: " +
                           ("upgrade snapfw, then run `snapfw check --repair`" if newer else
                            "run `snapfw check --repair` with the snapfw version that started it"))
    try:
        return [Step.from_json(s) for s in entry[phase]]
    except (ValueError, LookupError, TypeError) as e:
        raise Inconsistent(f"{what} cannot be read: {e}; run `snapfw check --repair` with the snapfw version "
                           "that started it") from None


def recover(catalog, ctx, plan: dict) -> str:
    """Finish a committed plan, or roll back one that crashed before its commit. Returns what it did."""
    marks = plan["marks"]
    if plan["state"] == "committed":
        steps = _journaled(plan, "finish")
        done = {i for (ph, i), st in marks.items() if ph == "finish" and st == "done"}
        for step in steps:
            step.resumed = True
        _finish(plan["id"], steps, catalog, ctx, done)
        _forget(catalog, plan["id"], "finished")
        return f"finished {plan['operation']} of {plan['domain']}"
    steps = _journaled(plan, "prepare")
    started = [s for i, s in enumerate(steps) if ("prepare", i) in marks]
    _undo(started, ctx, plan["id"], catalog, Inconsistent(f"interrupted {plan['operation']}"))
    return f"rolled back {plan['operation']} of {plan['domain']}"
