"""`TrainerEngine`'s lean epoch loop against ignite's own: the same events, in the same order,
with the same counters and outputs, in every way a run can go (terminate, terminate_epoch,
interrupt and resume, max_iters, restarted or empty iterators, no data, errors)."""

from __future__ import annotations

import logging
import warnings

import pytest
from ignite.engine import Engine, Events

from tractrain.engine.loop import TrainerEngine

EVENTS = [e for e in Events if e.name != "INTERRUPT"] + [Events.INTERRUPT]


class Twice:
    """Iterable whose first iterator yields ``items`` and later ones nothing (a stream)."""

    def __init__(self, items):
        self.items, self.calls = list(items), 0

    def __iter__(self):
        self.calls += 1
        return iter(self.items if self.calls == 1 else [])


def trace(engine_cls, scenario):
    """Run ``scenario(engine, log)`` on an engine of ``engine_cls`` whose every event appends
    ``(event, epoch, iteration, batch, output)`` to ``log``; returns the log (plus warnings
    and the outcome)."""
    log = []

    def process(engine, batch):
        log.append(("process", engine.state.iteration, batch))
        if batch == "boom":
            raise ValueError("bad batch")
        return {"y": batch}

    engine = engine_cls(process)

    def record(engine, event):  # handler with an extra argument: ignite's general path
        s = engine.state
        log.append((event.name, s.epoch, s.iteration, s.batch, s.output))

    for event in EVENTS:
        if event is not Events.EXCEPTION_RAISED:
            engine.add_event_handler(event, record, event)
    engine.add_event_handler(Events.ITERATION_COMPLETED(every=2),
                             lambda: log.append("every 2"))  # a filter, no engine argument
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e, k=1: log.append(("kw", k)), k=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scenario(engine, log)
            outcome = "ok"
        except Exception as e:  # noqa: BLE001 - compared between the two engines
            outcome = f"{type(e).__name__}: {e}"
    state = engine.state
    return log, [str(w.message) for w in caught], outcome, (state.epoch, state.iteration,
                                                            state.epoch_length, state.max_epochs)


def on(event, when, action):
    """Scenario step: call ``action(engine)`` at ``event`` when ``when(engine.state)``."""
    def attach(engine, log):
        def handler(engine):
            if when(engine.state):
                action(engine)
        engine.add_event_handler(event, handler)
    return attach


def run(*steps, data=range(5), runs=1, **kwargs):
    def scenario(engine, log):
        for step in steps:
            step(engine, log)
        for _ in range(runs):
            engine.run(data() if callable(data) else data, **kwargs)
            log.append(("run returned", engine.state.epoch, engine.state.iteration))
    return scenario


def drop_at_4(engine):
    """Records itself until iteration 4, then removes itself."""
    engine.state.batch = ("seen", engine.state.batch)
    if engine.state.iteration == 4:
        engine.remove_event_handler(drop_at_4, Events.ITERATION_STARTED)


SCENARIOS = {
    "plain": run(max_epochs=3),
    "epoch shorter than data": run(max_epochs=3, epoch_length=3),
    "epoch longer than data": run(max_epochs=2, epoch_length=7),
    "max_iters": run(max_iters=8),
    "no data": run(data=None, max_epochs=2, epoch_length=4),
    "terminate at iteration": run(on(Events.ITERATION_COMPLETED, lambda s: s.iteration == 7,
                                     Engine.terminate), max_epochs=3),
    "terminate at get batch": run(on(Events.GET_BATCH_STARTED, lambda s: s.iteration == 3,
                                     Engine.terminate), max_epochs=3),
    "terminate after get batch": run(on(Events.GET_BATCH_COMPLETED, lambda s: s.iteration == 4,
                                        Engine.terminate), max_epochs=3),
    "terminate epoch": run(on(Events.ITERATION_STARTED, lambda s: s.iteration == 4,
                              Engine.terminate_epoch), max_epochs=3),
    "terminate epoch at get batch": run(on(Events.GET_BATCH_STARTED, lambda s: s.iteration == 6,
                                           Engine.terminate_epoch), max_epochs=3),
    "interrupt before get batch": run(on(Events.GET_BATCH_STARTED, lambda s: s.iteration == 2,
                                         Engine.interrupt), max_epochs=2, runs=2),
    "interrupt at iteration start": run(on(Events.ITERATION_STARTED, lambda s: s.iteration == 8,
                                           Engine.interrupt), max_epochs=2, runs=2),
    "terminate at restart": run(on(Events.DATALOADER_STOP_ITERATION, lambda s: True,
                                   Engine.terminate), max_epochs=2, epoch_length=7),
    "interrupt and resume": run(on(Events.ITERATION_COMPLETED, lambda s: s.iteration in (3, 9),
                                   Engine.interrupt), max_epochs=3, runs=3),
    "interrupt at get batch": run(on(Events.GET_BATCH_COMPLETED, lambda s: s.iteration == 5,
                                     Engine.interrupt), max_epochs=2, runs=2),
    "handler added mid-run": run(on(Events.ITERATION_COMPLETED, lambda s: s.iteration == 3,
                                    lambda e: e.add_event_handler(
                                        Events.GET_BATCH_STARTED, lambda: e.state.output
                                        and e.state.output.update(late=True))),
                                 max_epochs=2),
    "handler removed mid-run": run(
        lambda engine, log: engine.add_event_handler(Events.ITERATION_STARTED, drop_at_4),
        max_epochs=2),
    "stream runs dry": run(data=lambda: Twice(range(3)), max_epochs=2, epoch_length=5),
    "error": run(data=[0, 1, "boom", 3], max_epochs=2),
    "error handled": run(
        lambda engine, log: engine.add_event_handler(
            Events.EXCEPTION_RAISED, lambda e, err: log.append(("handled", str(err)))),
        data=[0, 1, "boom", 3], max_epochs=2),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_lean_loop_replays_ignite(name):
    expected = trace(Engine, SCENARIOS[name])
    assert trace(TrainerEngine, SCENARIOS[name]) == expected
    assert len(expected[0]) > 5  # the scenario did run


def test_debug_logging_uses_ignite_dispatch(caplog):
    """With DEBUG on, ignite's own dispatch runs (its per-event messages are logged)."""
    engine = TrainerEngine(lambda e, b: b)
    engine.logger.setLevel(logging.DEBUG)
    with caplog.at_level(logging.DEBUG, logger=engine.logger.name):
        engine.run([1, 2], max_epochs=1)
    assert any("Firing handlers for event Events.ITERATION_COMPLETED" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("event", [Events.GET_BATCH_STARTED, Events.ITERATION_STARTED])
def test_handler_added_mid_run_to_an_event_without_handlers(event):
    """A handler added during a run to an event that had none runs from the next iteration
    on (as `GracefulStop` adds its per-iteration check when a signal arrives)."""
    def seen_by(engine_cls):
        seen = []
        engine = engine_cls(lambda e, b: b)

        def add(engine):
            if engine.state.iteration == 2:
                engine.add_event_handler(event, lambda e: seen.append(e.state.iteration))
        engine.add_event_handler(Events.ITERATION_COMPLETED, add)
        engine.run(range(4), max_epochs=2)
        return seen

    assert seen_by(TrainerEngine) == seen_by(Engine) != []
